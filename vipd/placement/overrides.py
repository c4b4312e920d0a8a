"""Operator overrides: moves, drains and reload pins, as one versioned, replicated document.

Pure: no IO, no clock. The whole table is one value with a version; every change (a
`vipctl move`, `drain`, `undrain`, `rebalance`, or a reload that pins groups in place) makes
a new table whose version is one more than the newest seen, stamped with the node that made
it. Heartbeats carry the table (signed, like everything in them); a node adopts any table
newer than its own, by ``(version, issuer)``, so every node converges on the same table and
the same placement. Two edits made at once on two nodes get the same version: the issuer
name breaks the tie and the other edit is lost (both are logged; `vipctl status` shows the
table in force). The daemon persists the table in ``state_dir`` so it survives restarts; a
node that comes back with an older table adopts the newer one from the first heartbeat.

Each table is signed by its issuer (Ed25519, the issuer's own roster key), and the signature
travels with it: a table relayed by any member is adopted only if it verifies under the key of
the member named as issuer, so nobody can publish a table in another member's name or alter
one in transit (`vipd.membership.core` checks it; docs/security.md says what is left). Versions
are u64 and a peer's table may be at most `MAX_VERSION_STEP` ahead of ours, so no member can
push the version to where no edit could follow it.

Moves are per group name (not pool index), so a table stays meaningful across pool reloads;
entries naming a group or node that this node's config does not have are ignored by
placement (a rolling config change) but kept and passed on.

A move pins a group on a node while that node is placeable (alive, not drained); otherwise
placement decides, and the pin applies again when the node is back. ``reason`` says where
the pin came from: "move" (an operator) or "reload" (a pool reload kept the group where it
was, see `vipd.placement.controller.Controller.reload_pins`; `vipctl rebalance` clears those).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

REASONS = ("move", "reload")
MAX_NAME = 63
#: Far beyond any real use, and what a heartbeat could carry at all.
MAX_ENTRIES = 512
MAX_VERSION = 2**64 - 1
#: How far ahead of ours a peer's table may be. Every honest edit is one above the newest
#: table its node had seen, so a node only falls this far behind by missing a million edits;
#: a member that jumps further is refused, and at most 2**44 accepted jumps stand between
#: version 0 and MAX_VERSION (centuries at one per heartbeat).
MAX_VERSION_STEP = 2**20
SIGNATURE_LEN = 64
#: Domain separation: a table signature signs nothing else (not a heartbeat, not another
#: cluster's table).
SIGN_DOMAIN = b"vipd-overrides-sig-v1\0"


class OverridesError(ValueError):
    """A table that cannot be decoded (wire or file)."""


@dataclass(frozen=True)
class Move:
    group: str
    target: str
    reason: str = "move"


@dataclass(frozen=True)
class Overrides:
    version: int = 0
    issuer: str = ""
    moves: tuple[Move, ...] = ()  # sorted by group, one per group
    drained: tuple[str, ...] = ()  # sorted node names
    #: The issuer's Ed25519 signature over `signed_bytes` (empty: not signed yet, a table
    #: being made here). Not part of equality: the content is what placement agrees on.
    signature: bytes = field(default=b"", compare=False)
    _by_group: dict[str, Move] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_group", {m.group: m for m in self.moves})

    # -- queries --------------------------------------------------------------------------

    def newer_than(self, other: Overrides) -> bool:
        return (self.version, self.issuer) > (other.version, other.issuer)

    def move_of(self, group: str) -> Move | None:
        return self._by_group.get(group)

    def pins(self) -> dict[str, str]:
        """group -> target for every move (reload pins included)."""
        return {m.group: m.target for m in self.moves}

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(b"vipd-overrides-v2\0" + self.encode()).digest()[:8]

    # -- signature ------------------------------------------------------------------------

    def signed_bytes(self, cluster: str) -> bytes:
        return SIGN_DOMAIN + _name(cluster) + self.encode()

    def signed(self, key: Ed25519PrivateKey, cluster: str) -> Overrides:
        """This table with its issuer's signature (the caller is the issuer)."""
        return replace(self, signature=key.sign(self.signed_bytes(cluster)))

    def verifies(self, public_keys: Iterable[bytes], cluster: str) -> bool:
        """Whether the signature is the issuer's, by one of the issuer's roster keys."""
        if len(self.signature) != SIGNATURE_LEN:
            return False
        message = self.signed_bytes(cluster)
        for raw in public_keys:
            try:
                Ed25519PublicKey.from_public_bytes(raw).verify(self.signature, message)
            except (InvalidSignature, ValueError):
                continue
            return True
        return False

    # -- changes (each returns a new table, version one above `seen`) ---------------------

    def _next(self, by: str, moves: Iterable[Move], drained: Iterable[str]) -> Overrides:
        if self.version >= MAX_VERSION:
            raise OverridesError(
                f"the operator table is at the last version ({MAX_VERSION}); no edit can follow"
            )
        return Overrides(
            version=self.version + 1,
            issuer=by,
            moves=tuple(sorted(moves, key=lambda m: m.group)),
            drained=tuple(sorted(set(drained))),
        )

    def with_move(
        self, group: str, target: str | None, *, by: str, reason: str = "move"
    ) -> Overrides:
        """Pin `group` on `target`, or (target None) clear its pin: automatic placement."""
        rest = [m for m in self.moves if m.group != group]
        if target is not None:
            rest.append(Move(group, target, reason))
        return self._next(by, rest, self.drained)

    def with_moves(self, pins: Mapping[str, str], *, by: str, reason: str) -> Overrides:
        rest = [m for m in self.moves if m.group not in pins]
        rest += [Move(g, t, reason) for g, t in pins.items()]
        return self._next(by, rest, self.drained)

    def without_reason(self, reason: str, *, by: str) -> Overrides:
        return self._next(by, [m for m in self.moves if m.reason != reason], self.drained)

    def reissued(self, *, by: str) -> Overrides:
        """The same moves and drains as a new edit (to sign them with another key)."""
        return self._next(by, self.moves, self.drained)

    def with_drain(self, node: str, drained: bool, *, by: str) -> Overrides:
        names = set(self.drained)
        (names.add if drained else names.discard)(node)
        return self._next(by, self.moves, names)

    # -- wire -----------------------------------------------------------------------------

    def encode(self) -> bytes:
        """The content: u64 version, name issuer, u16 moves x (name group, name target,
        u8 reason), u16 drained x name; a name is u8 length + UTF-8."""
        if not 0 <= self.version <= MAX_VERSION:
            raise OverridesError(f"version {self.version} is not 0..{MAX_VERSION}")
        out = [struct.pack("!Q", self.version), _name(self.issuer, allow_empty=True)]
        out.append(struct.pack("!H", len(self.moves)))
        for m in self.moves:
            out += [_name(m.group), _name(m.target), bytes([REASONS.index(m.reason)])]
        out.append(struct.pack("!H", len(self.drained)))
        out += [_name(n) for n in self.drained]
        return b"".join(out)

    def encode_signed(self) -> bytes:
        """What a heartbeat carries: the content, then the 64-byte signature."""
        if len(self.signature) != SIGNATURE_LEN:
            raise OverridesError("an unsigned table cannot be sent")
        return self.encode() + self.signature

    @classmethod
    def decode_signed(cls, raw: bytes) -> Overrides:
        """The inverse of `encode_signed` (the signature is parsed, not checked)."""
        if len(raw) < SIGNATURE_LEN:
            raise OverridesError("shorter than a signature")
        table = cls.decode(raw[:-SIGNATURE_LEN])
        if table.version == 0:
            raise OverridesError("the empty table (version 0) is not signed")
        return replace(table, signature=raw[-SIGNATURE_LEN:])

    @classmethod
    def decode(cls, raw: bytes) -> Overrides:
        """Raises OverridesError on anything but a well-formed, canonical table."""
        reader = _Reader(raw)
        (version,) = reader.unpack("!Q")
        issuer = reader.name(allow_empty=version == 0)
        moves = []
        for _ in range(reader.count()):
            group, target = reader.name(), reader.name()
            (code,) = reader.unpack("!B")
            if code >= len(REASONS):
                raise OverridesError(f"unknown move reason {code}")
            moves.append(Move(group, target, REASONS[code]))
        drained = [reader.name() for _ in range(reader.count())]
        reader.end()
        groups = [m.group for m in moves]
        if groups != sorted(set(groups)) or drained != sorted(set(drained)):
            raise OverridesError("entries not sorted or repeated")
        if version == 0 and (issuer or moves or drained):
            raise OverridesError("version 0 is the empty table")
        return cls(version, issuer, tuple(moves), tuple(drained))

    # -- persistence ----------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": self.version,
                "issuer": self.issuer,
                "moves": [
                    {"group": m.group, "target": m.target, "reason": m.reason} for m in self.moves
                ],
                "drained": list(self.drained),
                "signature": self.signature.hex(),
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> Overrides:
        """The file `to_json` wrote; anything else raises OverridesError (a damaged file must
        never stop the daemon, which then starts with an empty table). A file written before
        tables were signed has no "signature" and loads unsigned (see `MembershipCore.
        set_overrides` for what the node does with it)."""
        try:
            data: Any = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise OverridesError(f"not JSON: {e}") from None
        keys = {"version", "issuer", "moves", "drained"}
        if not isinstance(data, dict) or set(data) - {"signature"} != keys:
            raise OverridesError(
                "expected an object with version, issuer, moves, drained, signature"
            )
        version, issuer, moves, drained = (
            data["version"],
            data["issuer"],
            data["moves"],
            data["drained"],
        )
        try:
            signature = bytes.fromhex(data.get("signature", ""))
        except (TypeError, ValueError):
            raise OverridesError("signature is not a hex string") from None
        if signature and len(signature) != SIGNATURE_LEN:
            raise OverridesError(f"signature is {len(signature)} bytes, not {SIGNATURE_LEN}")
        if signature and version == 0:
            raise OverridesError("the empty table (version 0) is not signed")
        if type(version) is not int or not 0 <= version <= MAX_VERSION:
            raise OverridesError(f"version {version!r} is not an integer 0..2**64-1")
        if not isinstance(issuer, str):
            raise OverridesError("issuer is not a string")
        if not isinstance(moves, list) or not isinstance(drained, list):
            raise OverridesError("moves and drained must be lists")
        if len(moves) > MAX_ENTRIES or len(drained) > MAX_ENTRIES:
            raise OverridesError(f"more than {MAX_ENTRIES} entries")
        parsed: list[Move] = []
        for m in moves:
            if not isinstance(m, dict) or set(m) != {"group", "target", "reason"}:
                raise OverridesError("a move must have exactly group, target and reason")
            if not all(isinstance(v, str) for v in m.values()) or m["reason"] not in REASONS:
                raise OverridesError(f"bad move {m!r}")
            parsed.append(Move(m["group"], m["target"], m["reason"]))
        if not all(isinstance(n, str) for n in drained):
            raise OverridesError("drained names must be strings")
        table = cls(version, issuer, tuple(parsed), tuple(drained))
        # The wire's checks: bounds, order, uniqueness.
        return replace(cls.decode(table.encode()), signature=signature)


def _name(text: str, *, allow_empty: bool = False) -> bytes:
    raw = text.encode()
    if len(raw) > MAX_NAME or (not raw and not allow_empty):
        raise OverridesError(f"name {text!r} must be 1..{MAX_NAME} bytes")
    return bytes([len(raw)]) + raw


class _Reader:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.pos = 0

    def unpack(self, fmt: str) -> tuple[int, ...]:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.raw):
            raise OverridesError("truncated")
        values = struct.unpack_from(fmt, self.raw, self.pos)
        self.pos += size
        return values

    def count(self) -> int:
        (n,) = self.unpack("!H")
        if n > MAX_ENTRIES:
            raise OverridesError(f"{n} entries, at most {MAX_ENTRIES}")
        return n

    def name(self, *, allow_empty: bool = False) -> str:
        (length,) = self.unpack("!B")
        if length > MAX_NAME or (length == 0 and not allow_empty):
            raise OverridesError(f"name length {length}")
        if self.pos + length > len(self.raw):
            raise OverridesError("truncated name")
        chunk = self.raw[self.pos : self.pos + length]
        self.pos += length
        try:
            return chunk.decode("utf-8")
        except UnicodeDecodeError:
            raise OverridesError("name is not UTF-8") from None

    def end(self) -> None:
        if self.pos != len(self.raw):
            raise OverridesError("trailing bytes")
