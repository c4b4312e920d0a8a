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
from dataclasses import dataclass, field
from typing import Any

REASONS = ("move", "reload")
MAX_NAME = 63
#: Far beyond any real use, and what a heartbeat could carry at all.
MAX_ENTRIES = 512


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
        return hashlib.sha256(b"vipd-overrides-v1\0" + self.encode()).digest()[:8]

    # -- changes (each returns a new table, version one above `seen`) ---------------------

    def _next(self, by: str, moves: Iterable[Move], drained: Iterable[str]) -> Overrides:
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

    def with_drain(self, node: str, drained: bool, *, by: str) -> Overrides:
        names = set(self.drained)
        (names.add if drained else names.discard)(node)
        return self._next(by, self.moves, names)

    # -- wire -----------------------------------------------------------------------------

    def encode(self) -> bytes:
        """u32 version, name issuer, u16 moves x (name group, name target, u8 reason),
        u16 drained x name; a name is u8 length + UTF-8."""
        out = [struct.pack("!I", self.version), _name(self.issuer, allow_empty=True)]
        out.append(struct.pack("!H", len(self.moves)))
        for m in self.moves:
            out += [_name(m.group), _name(m.target), bytes([REASONS.index(m.reason)])]
        out.append(struct.pack("!H", len(self.drained)))
        out += [_name(n) for n in self.drained]
        return b"".join(out)

    @classmethod
    def decode(cls, raw: bytes) -> Overrides:
        """Raises OverridesError on anything but a well-formed, canonical table."""
        reader = _Reader(raw)
        (version,) = reader.unpack("!I")
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
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> Overrides:
        """The file `to_json` wrote; anything else raises OverridesError (a damaged file must
        never stop the daemon, which then starts with an empty table)."""
        try:
            data: Any = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise OverridesError(f"not JSON: {e}") from None
        if not isinstance(data, dict) or set(data) != {"version", "issuer", "moves", "drained"}:
            raise OverridesError("expected an object with version, issuer, moves, drained")
        version, issuer, moves, drained = (
            data["version"],
            data["issuer"],
            data["moves"],
            data["drained"],
        )
        if type(version) is not int or not 0 <= version < 2**32:
            raise OverridesError(f"version {version!r} is not an integer 0..2**32-1")
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
        return cls.decode(table.encode())  # the wire's checks: bounds, order, uniqueness


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
