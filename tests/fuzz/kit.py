"""What the fuzz tests, the corpus generator and ``bench/fuzz.py`` share.

- A fixed three-node cluster whose keys come from fixed seeds: Ed25519 signatures are
  deterministic (RFC 8032), so every heartbeat built here, and the saved corpus, is the same
  byte for byte on every run. ``n1`` receives, ``n2`` and ``n3`` send.
- Genuine heartbeats of many shapes, and helpers to take a datagram apart and re-sign it.
- A mutation engine. Every generator takes a `random.Random`: hypothesis hands one over with
  ``st.randoms()`` (so it drives, replays and shrinks every choice), the bulk tests and the
  long run use a seeded one.
- The checks themselves (`WireHarness`, `ControlHarness`), so the tests and the long run
  assert the same things.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import hashlib
import json
import os
import random
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, settings

from tests.clusterkit import WALL0, Node, config_dict
from vipd.config import parse_config
from vipd.host.control import Caller, Command, ControlServer
from vipd.host.keys import public_key_bytes
from vipd.kernel.heartbeats import MAX_READS_PER_WAKEUP, RECV_BUFFER
from vipd.membership import wire
from vipd.membership.core import MembershipCore, View
from vipd.membership.events import DuplicateNode, PacketRejected, ViewChanged
from vipd.membership.wire import TLV, DecodeError, Flag, Heartbeat, Reject, Stats
from vipd.placement.overrides import (
    MAX_ENTRIES,
    MAX_VERSION,
    REASONS,
    SIGNATURE_LEN,
    Move,
    Overrides,
    OverridesError,
)

CORPUS = Path(__file__).parent / "corpus"
GROUPS = 6
NOW = 1.0  # the receiver's monotonic clock; WALL0 is its wall clock
SOURCE = "198.51.100.12"
NAMES = ("n1", "n2", "n3")
SENDERS = ("n2", "n3")
HEADER_FIELDS = {  # name -> (offset, struct format) inside the 40-byte header
    "magic": (0, "4s"),
    "version": (4, "B"),
    "type": (5, "B"),
    "flags": (6, "H"),
    "incarnation": (8, "Q"),
    "seq": (16, "Q"),
    "send_time": (24, "Q"),
    "key_id": (32, "4s"),
    "clen": (36, "B"),
    "slen": (37, "B"),
    "blen": (38, "H"),
}


#: VIPD_FUZZ_SCALE multiplies every property test's example count (default 1: the CI run).
#: VIPD_FUZZ_RANDOM=1 draws new examples each run (and keeps failures in .hypothesis/).
SCALE = float(os.environ.get("VIPD_FUZZ_SCALE", "1"))
RANDOM = os.environ.get("VIPD_FUZZ_RANDOM", "") == "1"


def fuzz_settings(examples: int) -> settings:
    """CI: a fixed set of examples (derandomized, so a run is reproducible and never flaky)
    and no example database (nothing to replay: the same examples run every time; inputs
    worth keeping go into the corpus instead)."""
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        derandomize=not RANDOM,
        database=settings().database if RANDOM else None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def corpus(target: str) -> dict[str, bytes]:
    """file name -> bytes, for every file of a corpus (tests/fuzz/corpus/<target>/)."""
    return {p.name: p.read_bytes() for p in sorted((CORPUS / target).glob("*.bin"))}


def corpus_index(target: str) -> dict[str, dict[str, Any]]:
    index: dict[str, dict[str, Any]] = json.loads((CORPUS / f"{target}.index.json").read_text())
    return index


def fixed_key(label: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(
        hashlib.sha256(b"vipd-fuzz-key\0" + label.encode()).digest()
    )


KEYS = {name: fixed_key(name) for name in NAMES}
STRANGER = fixed_key("mallory")  # in nobody's roster
ROSTER_KEYS: tuple[bytes, ...] = tuple(public_key_bytes(KEYS[n]) for n in NAMES)


@functools.cache
def cluster() -> dict[str, Node]:
    return {
        name: Node(parse_config(config_dict(name, KEYS, GROUPS), Path("fuzz.toml")), KEYS[name])
        for name in NAMES
    }


def receiver() -> MembershipCore:
    """A fresh core for n1, at NOW / WALL0, that has heard nobody yet."""
    return cluster()["n1"].core(now=NOW, incarnation=1)


def config_digest() -> bytes:
    return cluster()["n1"].config.digest


# --- genuine heartbeats ------------------------------------------------------------------


def heartbeat(
    sender: str = "n2", *, seq: int = 1, incarnation: int = 7, **fields: Any
) -> Heartbeat:
    values: dict[str, Any] = {
        "cluster": "web",
        "sender": sender,
        "incarnation": incarnation,
        "seq": seq,
        "send_time_ms": int(WALL0 * 1000),
        "flags": Flag.READY,
        "view_digest": b"V" * wire.DIGEST_LEN,
        "config_digest": config_digest(),
        "group_count": GROUPS,
        "held": frozenset({0, 5}),
    }
    values.update(fields)
    return Heartbeat(**values)


def sign(hb: Heartbeat, key: Ed25519PrivateKey | None = None) -> bytes:
    """Encode and sign, by default with the sender's own key."""
    key = key if key is not None else KEYS.get(hb.sender, STRANGER)
    return wire.encode(hb, key, public_key_bytes(key))


def seal(signed: bytes, key: Ed25519PrivateKey) -> bytes:
    """Append a valid signature over ``signed`` (whatever its structure)."""
    return signed + key.sign(wire.DOMAIN + signed)


@dataclass
class Parts:
    """A datagram taken apart: the header (mutable) and the three variable fields."""

    header: bytearray
    cluster: bytes
    sender: bytes
    body: bytes

    @classmethod
    def of(cls, data: bytes) -> Parts:
        env = wire.parse_envelope(data)
        c = wire.HEADER_LEN + len(env.cluster.encode())
        s = c + len(env.sender.encode())
        return cls(
            bytearray(data[: wire.HEADER_LEN]), data[wire.HEADER_LEN : c], data[c:s], env.body
        )

    def set(self, name: str, value: int | bytes) -> Parts:
        offset, fmt = HEADER_FIELDS[name]
        struct.pack_into("!" + fmt, self.header, offset, value)
        return self

    def signed(self, *, fix_lengths: bool = True) -> bytes:
        if fix_lengths:
            self.set("clen", len(self.cluster) & 0xFF)
            self.set("slen", len(self.sender) & 0xFF)
            self.set("blen", len(self.body) & 0xFFFF)
        return bytes(self.header) + self.cluster + self.sender + self.body

    def seal(self, key: Ed25519PrivateKey | None = None, *, fix_lengths: bool = True) -> bytes:
        key = key if key is not None else KEYS["n2"]
        return seal(self.signed(fix_lengths=fix_lengths), key)


def tlv(kind: int, value: bytes, length: int | None = None) -> bytes:
    return struct.pack("!BH", kind, len(value) if length is None else length) + value


def split_tlvs(body: bytes) -> list[tuple[int, bytes]]:
    """The TLVs of a body, leniently: stops at the first one that does not fit."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos + 3 <= len(body):
        kind, length = struct.unpack_from("!BH", body, pos)
        if pos + 3 + length > len(body):
            break
        out.append((kind, body[pos + 3 : pos + 3 + length]))
        pos += 3 + length
    return out


def _name(rng: random.Random, size: int) -> str:
    alphabet = "abcxyz-_.09" if rng.random() < 0.7 else "aéü名🙂\u200b"
    return "".join(rng.choice(alphabet) for _ in range(size))


def _names(rng: random.Random, n: int) -> list[str]:
    """n distinct names in a table's canonical order (sorted), now and then 63 bytes long."""
    out: set[str] = set()
    while len(out) < n:
        if rng.random() < 0.05:
            out.add("x" * 62 + rng.choice("abc"))  # the longest name a table can carry
        else:
            out.add(_name(rng, rng.randint(1, 12)))  # at most 48 bytes
    return sorted(out)


def random_overrides(rng: random.Random) -> Overrides:
    """A valid operator table: now and then the empty one (version 0), else a few moves of
    both reasons and a few drained nodes, canonical (sorted, unique)."""
    if rng.random() < 0.3:
        return Overrides()
    groups = _names(rng, rng.choice((0, 1, 2, 4, rng.randint(0, 12))))
    moves = tuple(Move(g, _name(rng, rng.randint(1, 8)), rng.choice(REASONS)) for g in groups)
    drained = tuple(_names(rng, rng.choice((0, 0, 1, 3))))
    version = rng.choice((1, 2, 2**32, MAX_VERSION, rng.randrange(1, 1 << 64)))
    # Any 64 bytes: the decoder parses the signature, the core checks it.
    signature = rng.randbytes(SIGNATURE_LEN)
    return Overrides(version, _names(rng, 1)[0], moves, drained, signature)


def signed_value(table: Overrides) -> bytes:
    """A SIGNED_OVERRIDES value for any table, the empty one included (which a node never
    sends, so the decoder must refuse it)."""
    return table.encode() + (table.signature or bytes(SIGNATURE_LEN))


def random_heartbeat(
    rng: random.Random, sender: str = "n2", seq: int = 1, incarnation: int = 7
) -> Heartbeat:
    """A valid heartbeat of a random shape (sizes from empty to the 1200-byte limit)."""
    count = rng.choice((0, 1, GROUPS, 7, 8, 9, 64, rng.randrange(4097), wire.MAX_GROUPS))
    held: frozenset[int] = frozenset()
    released: frozenset[int] = frozenset()
    if count:
        held = frozenset(rng.sample(range(count), rng.randrange(count + 1)))
        released = frozenset(
            rng.sample(range(count), rng.randrange(min(count, wire.MAX_RELEASED) + 1))
        )
    stats = None
    if rng.random() < 0.5:
        stats = Stats(
            *(rng.randrange(1 << bits) for bits in (32, 16, 16, 64, 64, 32, 32, 32, 32, 32))
        )
    hb = heartbeat(
        sender,
        seq=seq,
        incarnation=incarnation,
        send_time_ms=int(WALL0 * 1000) + rng.randint(-20_000, 20_000),
        flags=Flag(rng.choice((Flag.READY, Flag.JOINING, Flag.LEAVING, rng.randrange(1 << 16)))),
        view_digest=rng.randbytes(wire.DIGEST_LEN),
        config_digest=config_digest() if rng.random() < 0.8 else rng.randbytes(wire.DIGEST_LEN),
        group_count=count,
        held=held,
        released=released,
        stats=stats,
        overrides=random_overrides(rng),
        pool_digest=rng.randbytes(wire.DIGEST_LEN) if rng.random() < 0.6 else None,
    )
    for smaller in (
        hb,
        replace(hb, stats=None, released=frozenset()),  # keep the table if it fits
        heartbeat(sender, seq=seq, group_count=count, held=held),
    ):
        try:
            sign(smaller)
        except ValueError:  # too large for one datagram: drop optional parts
            continue
        return smaller
    raise AssertionError("a bare heartbeat always fits")


def raw_overrides(
    version: int = 1,
    issuer: bytes = b"n2",
    moves: Sequence[tuple[bytes, bytes, int]] = (),
    drained: Sequence[bytes] = (),
    *,
    move_count: int | None = None,
    drained_count: int | None = None,
    signature: bytes | None = None,
) -> bytes:
    """A table's wire form with nothing checked (names as raw bytes, any reason code,
    any order, counts that may lie): to build the ones Overrides.encode would not. With a
    `signature`, the SIGNED_OVERRIDES value (content, then those bytes)."""
    out = [struct.pack("!QB", version, len(issuer)), issuer]
    out.append(struct.pack("!H", len(moves) if move_count is None else move_count))
    for group, target, code in moves:
        out += [bytes([len(group)]), group, bytes([len(target)]), target, bytes([code])]
    out.append(struct.pack("!H", len(drained) if drained_count is None else drained_count))
    for name in drained:
        out += [bytes([len(name)]), name]
    if signature is not None:
        out.append(signature)
    return b"".join(out)


# --- mutation engine ---------------------------------------------------------------------

INTERESTING = (
    0,
    1,
    2,
    7,
    8,
    0x3F,
    0x40,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0xFFFF,
    0x10000,
    2**63,
    2**64 - 1,
)

Mutator = Callable[[random.Random, bytearray, bytes], None]


def _interesting(rng: random.Random, bits: int) -> int:
    if rng.random() < 0.3:
        return rng.randrange(1 << bits)
    return rng.choice(INTERESTING) & ((1 << bits) - 1)


def _junk(rng: random.Random) -> bytes:
    size = rng.choice((1, 2, 3, 8, 64, rng.randint(1, 1300)))
    fill = rng.random()
    if fill < 0.3:
        return bytes([rng.choice((0, 0xFF))]) * size
    return rng.randbytes(size)


def _flip(rng: random.Random, b: bytearray, other: bytes) -> None:
    if b:
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)


def _set_byte(rng: random.Random, b: bytearray, other: bytes) -> None:
    if b:
        b[rng.randrange(len(b))] = _interesting(rng, 8)


def _truncate(rng: random.Random, b: bytearray, other: bytes) -> None:
    cut = rng.choice(
        (len(b) - 1, len(b) - wire.SIGNATURE_LEN, wire.HEADER_LEN, rng.randint(0, len(b)))
    )
    del b[max(cut, 0) :]


def _extend(rng: random.Random, b: bytearray, other: bytes) -> None:
    b += _junk(rng)


def _insert(rng: random.Random, b: bytearray, other: bytes) -> None:
    pos = rng.randint(0, len(b))
    b[pos:pos] = _junk(rng)


def _delete(rng: random.Random, b: bytearray, other: bytes) -> None:
    if b:
        start = rng.randrange(len(b))
        del b[start : start + rng.choice((1, 2, 4, rng.randint(1, len(b))))]


def _splice(rng: random.Random, b: bytearray, other: bytes) -> None:
    i, j = rng.randint(0, len(b)), rng.randint(0, len(other))
    b[i:] = other[j:] if rng.random() < 0.5 else other[:j]


def _duplicate(rng: random.Random, b: bytearray, other: bytes) -> None:
    if b:
        start = rng.randrange(len(b))
        chunk = b[start : start + rng.randint(1, 64)]
        pos = rng.randint(0, len(b))
        b[pos:pos] = chunk


def _header_field(rng: random.Random, b: bytearray, other: bytes) -> None:
    if len(b) < wire.HEADER_LEN:
        return
    name = rng.choice(list(HEADER_FIELDS))
    offset, fmt = HEADER_FIELDS[name]
    if fmt == "4s":
        value: int | bytes = rng.choice((b"VIPD", b"vipd", b"\0\0\0\0", rng.randbytes(4)))
    else:
        value = _interesting(rng, 8 * struct.calcsize(fmt))
    struct.pack_into("!" + fmt, b, offset, value)


def _lengths(rng: random.Random, b: bytearray, other: bytes) -> None:
    """Rewrite a length field, and sometimes resize the datagram so the lengths add up again
    (the envelope then parses, with the signature read from the wrong place)."""
    if len(b) < wire.HEADER_LEN:
        return
    offset, fmt = rng.choice(((36, "B"), (37, "B"), (38, "H")))
    old = struct.unpack_from("!" + fmt, b, offset)[0]
    new = rng.choice(
        (old + 1, old - 1, 0, 1, wire.MAX_NAME, wire.MAX_NAME + 1, _interesting(rng, 16))
    )
    new &= (1 << (8 * struct.calcsize(fmt))) - 1
    struct.pack_into("!" + fmt, b, offset, new)
    if rng.random() < 0.5:
        clen, slen, blen = b[36], b[37], struct.unpack_from("!H", b, 38)[0]
        want = wire.HEADER_LEN + clen + slen + blen + wire.SIGNATURE_LEN
        if want < len(b):
            del b[want:]
        else:
            b += bytes(want - len(b))


RAW_MUTATORS: tuple[Mutator, ...] = (
    _flip,
    _flip,
    _set_byte,
    _truncate,
    _extend,
    _insert,
    _delete,
    _splice,
    _duplicate,
    _header_field,
    _header_field,
    _lengths,
    _lengths,
)


def mutate(rng: random.Random, data: bytes, other: bytes = b"") -> bytes:
    """One to five random byte-level mutations (no re-signing)."""
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 5))):
        rng.choice(RAW_MUTATORS)(rng, b, other)
    return bytes(b)


_BAD_NAMES = (b"", b"x" * 64, b"n\xff", b"\xc3", b"\xed\xa0\x80")  # empty, long, not UTF-8


def mutate_overrides(rng: random.Random, value: bytes) -> bytes:
    """Structure-aware edits of a SIGNED_OVERRIDES value: each of the rules of a canonical
    table (Overrides.decode_signed) broken on its own, from a table that was valid. A value
    that is not a valid table any more gets byte-level edits."""
    try:
        table = Overrides.decode_signed(value)
    except OverridesError:
        return mutate(rng, value)
    signature = table.signature
    version, issuer = table.version, table.issuer.encode()
    moves = [(m.group.encode(), m.target.encode(), REASONS.index(m.reason)) for m in table.moves]
    drained = [n.encode() for n in table.drained]
    move_count: int | None = None
    drained_count: int | None = None
    edit = rng.randrange(13)
    if edit == 0:
        version = rng.choice((0, 1, 2**32 - 1, MAX_VERSION))
    elif edit == 1:  # the empty table, sent as a TLV
        version, issuer, moves, drained = 0, b"", [], []
    elif edit == 2:
        issuer = rng.choice((*_BAD_NAMES, b"i" * 63))
    elif edit == 3:  # a bad name or reason code in a move (read before the order is checked)
        bad = rng.choice(_BAD_NAMES)
        entry = rng.choice(((bad, b"n1", 0), (b"g", bad, 1), (b"g", b"n1", rng.choice((2, 255)))))
        moves.insert(rng.randint(0, len(moves)), entry)
    elif edit == 4:
        drained.insert(rng.randint(0, len(drained)), rng.choice(_BAD_NAMES))
    elif edit == 5 and moves:  # a group twice, or out of order
        moves.insert(rng.randrange(len(moves) + 1), rng.choice(moves))
    elif edit == 6 and len(moves) > 1:
        i = rng.randrange(len(moves) - 1)
        moves[i], moves[i + 1] = moves[i + 1], moves[i]
    elif edit == 7 and drained:
        drained.insert(rng.randrange(len(drained) + 1), rng.choice(drained))
    elif edit == 8 and len(drained) > 1:
        drained.reverse()
    elif edit == 9:  # counts that lie, or pass the limit
        which = rng.randrange(2)
        have = (len(moves), len(drained))[which]
        count = rng.choice((have + 1, max(have - 1, 0), MAX_ENTRIES + 1, 0xFFFF))
        move_count, drained_count = (count, None) if which == 0 else (None, count)
    if edit == 12:  # a signature cut short, or one byte too long
        signature = rng.choice((signature[: rng.randrange(SIGNATURE_LEN)], signature + b"\0"))
    raw = raw_overrides(
        version,
        issuer,
        moves,
        drained,
        move_count=move_count,
        drained_count=drained_count,
        signature=signature,
    )
    if edit == 10:
        raw += rng.randbytes(rng.choice((1, 2, 5)))  # trailing bytes
    elif edit == 11:
        raw = raw[: rng.randrange(len(raw))]  # truncated
    return raw


def _mutate_value(rng: random.Random, kind: int, value: bytes) -> bytes:
    """Structure-aware edits of one TLV value: the counts and entries decode_body checks."""
    v = bytearray(value)
    choice = rng.random()
    if choice < 0.4 and kind == TLV.SIGNED_OVERRIDES:
        return mutate_overrides(rng, value)
    if choice < 0.05 and kind in (TLV.HELD, TLV.RELEASED):
        return value[: rng.choice((0, 1))]  # shorter than its count
    if choice < 0.25 and kind in (TLV.HELD, TLV.RELEASED) and len(v) >= 2:
        count = rng.choice((0, 1, 8, 9, 64, 65, 4096, 4097, 0xFFFF, _interesting(rng, 16)))
        struct.pack_into("!H", v, 0, count)
        if rng.random() < 0.5 and kind == TLV.HELD:
            del v[2:]
            v += bytes([0xFF]) * ((count + 7) // 8)
        elif rng.random() < 0.5 and kind == TLV.RELEASED:
            del v[2:]
            v += b"".join(struct.pack("!H", rng.randrange(16)) for _ in range(min(count, 600)))
    elif choice < 0.5 and kind == TLV.HELD and len(v) > 2:
        v[-1] |= rng.choice((1, 0x0F, 0xFF))  # bits past the group count
    elif choice < 0.65:
        v = bytearray(mutate(rng, bytes(v)))
    elif choice < 0.8:
        del v[rng.randint(0, len(v)) :]
    else:
        v += rng.randbytes(rng.choice((1, 2, 7, rng.randint(1, 64))))
    return bytes(v)


def mutate_body(rng: random.Random, body: bytes) -> bytes:
    """TLV-aware mutations of a heartbeat body."""
    items = split_tlvs(body)
    for _ in range(rng.choice((1, 1, 2, 3))):
        op = rng.randrange(10)
        i = rng.randrange(len(items)) if items else 0
        if op == 0 and items:
            del items[i]
        elif op == 1 and items:
            items.insert(rng.randint(0, len(items)), items[i])
        elif op == 2 and items:
            items[i] = (rng.choice((0, 7, 8, 200, 255, rng.randrange(256))), items[i][1])
        elif op == 3 and items:
            items[i] = (items[i][0], _mutate_value(rng, items[i][0], items[i][1]))
        elif op == 4:
            items.insert(
                rng.randint(0, len(items)),
                (rng.randrange(max(TLV) + 1, 256), rng.randbytes(rng.randint(0, 40))),
            )
        elif op == 5 and len(items) > 1:
            j = rng.randrange(len(items))
            items[i], items[j] = items[j], items[i]
        elif op == 6:  # a known type with a value of a telling size
            size = rng.choice((0, 1, 2, 3, 7, 8, 9, 55, 56, 57))
            items.insert(rng.randint(0, len(items)), (rng.choice(list(TLV)), rng.randbytes(size)))
        elif op == 7 and items:
            items[i] = (rng.choice(list(TLV)), items[i][1])
        elif op == 9:  # the operator table, broken one rule at a time (or added, then broken)
            at = [j for j, (k, _) in enumerate(items) if k == TLV.SIGNED_OVERRIDES]
            if at:
                items[at[0]] = (TLV.SIGNED_OVERRIDES, mutate_overrides(rng, items[at[0]][1]))
            else:
                raw = mutate_overrides(rng, signed_value(random_overrides(rng)))
                items.insert(rng.randint(0, len(items)), (TLV.SIGNED_OVERRIDES, raw))
        # op 8: leave the TLVs as they are (only the edits below, if any)
    # A byte-level mutation may resize a value past what a TLV length can say: cut it there.
    out = b"".join(tlv(k, v[:0xFFFF]) for k, v in items)
    if rng.random() < 0.2 and items:  # a TLV whose declared length lies
        k, v = items[-1]
        out += tlv(k, v, length=rng.choice((len(v) + 1, 0xFFFF, max(len(v) - 1, 0))))
    if rng.random() < 0.1:
        out += rng.randbytes(rng.randint(1, 2))  # a truncated TLV header
    return out


# --- a mixture of datagrams, as a flood would bring them ----------------------------------


def envelope_shaped(rng: random.Random) -> bytes:
    """Random content in a header that passes the cheap checks (magic, version, type, and
    lengths that add up): lands on the cluster, sender, replay and signature checks."""
    if rng.random() < 0.5:  # a real cluster and sender: on to the replay and signature checks
        names = b"web" + rng.choice((b"n2", b"n3"))
        clen, slen = 3, 2
    else:
        clen, slen = rng.randint(1, wire.MAX_NAME), rng.randint(1, wire.MAX_NAME)
        names = rng.randbytes(clen + slen)
    blen = rng.randint(0, wire.MAX_DATAGRAM - wire.HEADER_LEN - clen - slen - wire.SIGNATURE_LEN)
    header = wire._HEADER.pack(
        wire.MAGIC,
        wire.VERSION,
        wire.MSG_HEARTBEAT,
        rng.randrange(1 << 16),
        rng.randrange(1 << 64),
        rng.randrange(1 << 64),
        rng.choice((int(WALL0 * 1000), rng.randrange(1 << 64))),
        rng.choice((wire.key_id(ROSTER_KEYS[1]), rng.randbytes(4))),
        clen,
        slen,
        blen,
    )
    return header + names + rng.randbytes(blen + wire.SIGNATURE_LEN)


@dataclass
class Flood:
    """Generates datagrams of every kind for one receiver, with rising sequence numbers so
    that genuine ones stay acceptable."""

    rng: random.Random
    seq: int = 1000
    sent: list[bytes] = field(default_factory=list)

    def genuine(self) -> bytes:
        self.seq += 1
        sender = self.rng.choice(SENDERS)
        data = sign(random_heartbeat(self.rng, sender, self.seq))
        self.sent.append(data)
        del self.sent[:-64]
        return data

    def other(self) -> bytes:
        return self.rng.choice(self.sent) if self.sent else b""

    def next(self) -> bytes:
        rng = self.rng
        kind = rng.random()
        if kind < 0.08:
            return rng.randbytes(rng.choice((0, 1, 40, 105, 106, rng.randint(0, RECV_BUFFER))))
        if kind < 0.15:
            return envelope_shaped(rng)
        if kind < 0.25:
            return self.genuine()
        if kind < 0.55:
            return mutate(rng, self.genuine(), self.other())
        if kind < 0.75:
            parts = Parts.of(self.genuine())
            parts.set("seq", self.seq)
            parts.body = mutate_body(rng, parts.body)
            return parts.seal(KEYS[parts.sender.decode()])
        if kind < 0.82:  # mutated, then the last 64 bytes replaced by a valid signature
            data = mutate(rng, self.genuine(), self.other())
            if len(data) > wire.SIGNATURE_LEN:
                data = seal(data[: -wire.SIGNATURE_LEN], rng.choice((KEYS["n2"], KEYS["n3"])))
            return data
        if kind < 0.86:
            return self.other()  # a replay
        if kind < 0.9:
            self.seq += 1
            return sign(heartbeat("n2", seq=self.seq), rng.choice((STRANGER, KEYS["n3"])))
        if kind < 0.92:
            self.seq += 1
            who = rng.choice((("other", "n2"), ("web", "mallory"), ("web", "n1")))
            return sign(heartbeat(who[1], seq=self.seq, cluster=who[0]), KEYS["n2"])
        if kind < 0.94:  # another instance of the receiver: its name, its key, another nonce
            self.seq += 1
            nonce = rng.randbytes(wire.NONCE_LEN)
            return sign(heartbeat("n1", seq=self.seq, nonce=nonce), KEYS["n1"])
        self.seq += 1
        skew = rng.choice((-1, 1)) * rng.choice((31_000, 3_600_000, int(WALL0 * 1000)))
        return sign(
            heartbeat(rng.choice(SENDERS), seq=self.seq, send_time_ms=int(WALL0 * 1000) + skew)
        )


# --- the checks --------------------------------------------------------------------------


def decode(data: bytes, keys: tuple[bytes, ...] = ROSTER_KEYS) -> Heartbeat:
    """The decoder on its own: structure, signature (any roster key), body."""
    env = wire.parse_envelope(data)
    wire.verify(env, keys)
    return wire.decode_body(env)


def wire_outcome(data: bytes) -> str:
    """ "decoded", or the Reject reason the decoder gives."""
    try:
        decode(data)
    except DecodeError as e:
        return e.reason.value
    return "decoded"


def check_overrides(table: Overrides) -> None:
    """What every decoded table must be: canonical (the one encoding of its content), every
    name 1..63 bytes (the issuer empty only in the empty table), known reasons, bounded."""
    assert Overrides.decode(table.encode()) == table
    assert 0 <= table.version <= MAX_VERSION
    if table.version == 0:
        assert table == Overrides() and not table.signature, table
    else:
        assert len(table.signature) in (0, SIGNATURE_LEN), table  # 0: a file from before
        if table.signature:
            assert Overrides.decode_signed(table.encode_signed()) == table
    assert len(table.issuer.encode()) <= wire.MAX_NAME
    assert table.issuer or table.version == 0, table
    groups = [m.group for m in table.moves]
    assert groups == sorted(set(groups)), groups
    assert list(table.drained) == sorted(set(table.drained)), table.drained
    assert len(table.moves) <= MAX_ENTRIES and len(table.drained) <= MAX_ENTRIES
    assert all(m.reason in REASONS for m in table.moves)
    names = [*groups, *(m.target for m in table.moves), *table.drained]
    assert all(1 <= len(n.encode()) <= wire.MAX_NAME for n in names), names


def check_heartbeat(hb: Heartbeat) -> None:
    """What every decoded heartbeat must satisfy, however strange its body."""
    assert 0 <= hb.group_count <= wire.MAX_GROUPS
    assert all(0 <= i < hb.group_count for i in hb.held)
    assert all(0 <= i < hb.group_count for i in hb.released)
    assert len(hb.released) <= wire.MAX_RELEASED
    assert len(hb.view_digest) == len(hb.config_digest) == wire.DIGEST_LEN
    assert hb.pool_digest is None or len(hb.pool_digest) == wire.DIGEST_LEN
    check_overrides(hb.overrides)
    assert 1 <= len(hb.cluster.encode()) <= wire.MAX_NAME
    assert 1 <= len(hb.sender.encode()) <= wire.MAX_NAME


def check_decoder(data: bytes) -> str:
    """Run the decoder the way the core does, plus decode_body on every structurally valid
    envelope whether its signature holds or not. Only DecodeError may come out; the outcome
    is "decoded" or a reason. Any other exception propagates (that is the finding)."""
    try:
        env = wire.parse_envelope(data)
    except DecodeError as e:
        assert isinstance(e.reason, Reject)
        if len(data) > wire.MAX_DATAGRAM:
            assert e.reason is Reject.OVERSIZED
        elif len(data) < wire.MIN_DATAGRAM:
            assert e.reason is Reject.TRUNCATED
        return e.reason.value
    assert wire.MIN_DATAGRAM <= len(data) <= wire.MAX_DATAGRAM
    assert env.signed + env.signature == data and len(env.signature) == wire.SIGNATURE_LEN
    try:
        check_heartbeat(wire.decode_body(env))  # unverified: must still only raise DecodeError
    except DecodeError as e:
        assert e.reason is Reject.MALFORMED
    try:
        wire.verify(env, ROSTER_KEYS)
        hb = wire.decode_body(env)
    except DecodeError as e:
        return e.reason.value
    check_heartbeat(hb)
    return "decoded"


def snapshot(core: MembershipCore) -> tuple[View, dict[str, Any], frozenset[int]]:
    """View, a deep copy of the peers and held groups. Frozensets (held and released, up to
    4,096 indices a peer) are immutable and shared instead of copied: deepcopy would copy
    them element by element, which made this most of a flood test's time."""
    shared = {
        id(v): v
        for peer in core.peers.values()
        for v in getattr(peer, "__dict__", {}).values()
        if isinstance(v, frozenset)
    }
    return core.view, copy.deepcopy(core.peers, shared), core.held


#: Rejections the core reports once per dry spell, not once per datagram (see admission).
QUIET_REASONS = frozenset({"rate_limited"})
#: Refused as a peer's heartbeat, yet verified news about ourselves: another instance of this
#: node runs, so we leave our own view (and say so once). Peer records stay as they were.
SELF_REASONS = frozenset({"duplicate_node"})


def feed(core: MembershipCore, data: bytes, *, source: str = SOURCE, now: float = NOW) -> str:
    """core.receive with its accounting checked: exactly one of rx_accepted or one reason's
    counter moves by one, and a rejection leaves view and peers as they were and queues one
    PacketRejected with the same reason (at most one for QUIET_REASONS). Returns "accepted"
    or the reason."""
    before_rejected = Counter(core.rejected)
    before_accepted = core.counters["rx_accepted"]
    before = snapshot(core)
    queued = len(core._events)
    core.receive(data, source, now=now, wall=WALL0)
    moved = Counter(core.rejected) - before_rejected
    accepted = core.counters["rx_accepted"] - before_accepted
    assert sum(moved.values()) + accepted == 1, (moved, accepted)
    assert set(core.rejected) == {r.value for r in Reject}, "a counter outside Reject"
    if accepted:
        return "accepted"
    (reason,) = moved
    after = snapshot(core)
    if reason in SELF_REASONS:
        assert after[1:] == before[1:], f"a rejected datagram ({reason}) changed a peer"
        assert core.duplicate
        queued += sum(
            isinstance(e, DuplicateNode | ViewChanged) for e in list(core._events)[queued:]
        )
    else:
        assert after == before, f"a rejected datagram ({reason}) changed the core"
    new = len(core._events) - queued
    assert new == 1 or (reason in QUIET_REASONS and new == 0), (reason, new)
    if new:
        event = core._events[-1]
        assert isinstance(event, PacketRejected) and event.reason == reason
    return reason


def drain(core: MembershipCore) -> int:
    n = 0
    while core.next_event() is not None:
        n += 1
    return n


#: Where test datagrams come from: 64 addresses on the cluster's segment.
SOURCES = tuple(f"198.51.100.{i}" for i in range(10, 74))


@dataclass
class Receiver:
    """One long-lived receiver fed the way the daemon feeds it: events drained after every
    MAX_READS_PER_WAKEUP datagrams (the daemon's read batch). Datagrams come from SOURCES in
    turn and the clock moves `step` seconds per datagram, so each source sees about 1.5
    datagrams a second: a per-source budget for rejections never runs dry and every
    datagram reaches the decoder."""

    core: MembershipCore = field(default_factory=receiver)
    now: float = NOW
    step: float = 0.01
    fed: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)

    def __call__(self, data: bytes) -> str:
        self.now += self.step
        outcome = feed(self.core, data, source=SOURCES[self.fed % len(SOURCES)], now=self.now)
        self.fed += 1
        self.outcomes[outcome] += 1
        if self.fed % MAX_READS_PER_WAKEUP == 0:
            drain(self.core)
        return outcome


@dataclass
class WireHarness:
    """The decoder checks, then the same input through a Receiver: as is, and re-signed with
    n2's key after its sequence number (if it has one) is set above any seen so far, so that
    whatever structure the input has also meets verify, decode_body and the core's _apply."""

    receiver: Receiver = field(default_factory=Receiver)
    seq: int = 1 << 40
    #: A new receiver every this many inputs: one datagram with the largest incarnation and
    #: sequence number (the corpus has one) would otherwise make n2 unacceptable for good.
    renew_every: int = 5000
    outcomes: Counter[str] = field(default_factory=Counter)
    inputs: int = 0

    def __call__(self, data: bytes) -> None:
        self.inputs += 1
        if self.inputs % self.renew_every == 0:
            self.outcomes.update(self.receiver.outcomes)
            self.receiver = Receiver()
        check_decoder(data)
        self.receiver(data)
        if len(data) > wire.SIGNATURE_LEN:
            signed = bytearray(data[: -wire.SIGNATURE_LEN])
            if len(signed) >= wire.HEADER_LEN:
                self.seq += 1
                struct.pack_into("!Q", signed, HEADER_FIELDS["seq"][0], self.seq)
            resigned = seal(bytes(signed), KEYS["n2"])
            check_decoder(resigned)
            self.receiver(resigned)

    def totals(self) -> Counter[str]:
        return self.outcomes + self.receiver.outcomes


# --- control protocol ---------------------------------------------------------------------

ROOT = Caller(pid=1, uid=0, gid=0)
USER = Caller(pid=2, uid=12345, gid=12345)


@dataclass
class FakeCommands:
    """A read-only and a mutating command; records who ran the mutating one."""

    moved_by: list[Caller] = field(default_factory=list)

    async def status(self, request: dict[str, Any], caller: Caller) -> dict[str, Any]:
        return {"uid": caller.uid, "keys": sorted(request)}

    async def move(self, request: dict[str, Any], caller: Caller) -> str:
        self.moved_by.append(caller)
        return "moved"

    def table(self) -> dict[str, Command]:
        return {"status": Command(self.status), "move": Command(self.move, mutating=True)}


def control_server(path: Path, fake: FakeCommands) -> ControlServer:
    return ControlServer(path, 0o600, None, fake.table())


def expected_ok(line: bytes, caller: Caller) -> bool | None:
    """What handle_line should answer, from json.loads alone (None: json.loads itself
    raises something other than ValueError, e.g. RecursionError)."""
    try:
        request = json.loads(line)
    except ValueError:
        return False
    except Exception:
        return None
    if not isinstance(request, dict) or request.get("cmd") not in ("status", "move"):
        return False
    return request["cmd"] == "status" or caller.uid == 0


def check_reply(reply: Any) -> bool:
    """A reply is {"ok": true, "result": ...} or {"ok": false, "error": str}, and the
    server can send it (JSON-serializable)."""
    assert isinstance(reply, dict), reply
    assert isinstance(reply.get("ok"), bool), reply
    if reply["ok"]:
        assert set(reply) == {"ok", "result"}, reply
    else:
        assert set(reply) == {"ok", "error"} and isinstance(reply["error"], str), reply
    json.dumps(reply)
    return bool(reply["ok"])


@dataclass
class ControlHarness:
    """handle_line on one event loop, as ROOT and as an unprivileged USER."""

    fake: FakeCommands = field(default_factory=FakeCommands)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    outcomes: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.server = control_server(Path("/nonexistent/ctl.sock"), self.fake)

    def close(self) -> None:
        self.loop.close()

    def __call__(self, line: bytes) -> None:
        for caller in (ROOT, USER):
            moves = len(self.fake.moved_by)
            reply = self.loop.run_until_complete(self.server.handle_line(line, caller))
            ok = check_reply(reply)
            want = expected_ok(line, caller)
            assert want is None or ok == want, (line[:200], caller, reply)
            ran = len(self.fake.moved_by) - moves
            assert ran == 0 or (caller == ROOT and ran == 1), "mutating command ran for a user"
            self.outcomes[f"{'root' if caller == ROOT else 'user'}_{'ok' if ok else 'error'}"] += 1
