"""The heartbeat wire format: versioned, network byte order, strictly bounded, Ed25519-signed.

Layout (all integers big-endian)::

    offset size  field
    0      4     magic b"VIPD"
    4      1     version (1)
    5      1     message type (1 = heartbeat)
    6      2     flags (Flag)
    8      8     incarnation (rises on every restart)
    16     8     sequence number (rises on every message within an incarnation)
    24     8     send time, ms since the Unix epoch
    32     4     key id: first 4 bytes of SHA-256 of the signing public key
    36     1     cluster name length C (1..63)
    37     1     sender name length S (1..63)
    38     2     body length B
    40     C     cluster name (UTF-8)
    40+C   S     sender name (UTF-8)
    ..     B     body: TLVs (type u8, length u16, value); unknown types are skipped
    ..     64    Ed25519 signature over DOMAIN + every byte before it

Body TLVs (each at most once): VIEW_DIGEST (8 bytes), CONFIG_DIGEST (8 bytes), HELD (u16 group
count + bitmap of held group indices), STATS (fixed struct), SIGNED_OVERRIDES (the operator's
table with its issuer's signature, `vipd.placement.overrides.Overrides.encode_signed`; the
unsigned OVERRIDES of earlier versions is retired and skipped), RELEASED (u16 count + u16
group indices, at most MAX_RELEASED: groups this node let go of lately, so their owner knows
clients may still point here and announces them again), POOL_DIGEST (8 bytes: which pool the
HELD and RELEASED indices refer to; a peer in the middle of a pool reload may run another one).
New fields are new TLV types: older nodes skip them, so the format does not change.

Decoding happens in two steps so a flood of junk is cheap: `parse_envelope` checks size and
structure with no crypto (the core then checks cluster, sender and replay window), and only
then `verify_and_decode` spends a signature check and parses the body.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from vipd.placement.overrides import Overrides, OverridesError

MAGIC = b"VIPD"
VERSION = 1
MSG_HEARTBEAT = 1
MAX_DATAGRAM = 1200  # fits any path MTU >= 1280 (IPv6 minimum) without fragmentation
SIGNATURE_LEN = 64
DOMAIN = b"vipd-heartbeat-v1\0"  # domain separation: these signatures sign nothing else
MAX_NAME = 63
MAX_GROUPS = 4096
MAX_RELEASED = 64
NONCE_LEN = 8
DIGEST_LEN = 8

_HEADER = struct.Struct("!4sBBHQQQ4sBBH")
HEADER_LEN = _HEADER.size  # 40
MIN_DATAGRAM = HEADER_LEN + 2 + SIGNATURE_LEN


class Flag(enum.IntFlag):
    # APPEND-ONLY: these bits go on the wire, and nodes of different versions share a cluster
    # during a rolling upgrade. A bit once shipped is never renumbered, renamed or reused; a new
    # flag takes a new, unused bit; a retired one stays reserved. Pinned in test_wire_enums.py.
    NONE = 0
    JOINING = 1  # listening, not yet taking addresses
    READY = 2  # takes part in placement
    DRAINING = 4  # member, but holds nothing (operator drain)
    LEAVING = 8  # graceful stop: take my addresses now
    HOLDDOWN = 16  # flapped recently: member, but placed only if nobody else can be
    # No state_dir: the incarnation is the start time in ms and goes back with the clock.
    EPHEMERAL = 32
    DUPLICATE = 64  # another instance runs under this name and key: holds nothing


_KNOWN_FLAGS = int(
    Flag.JOINING
    | Flag.READY
    | Flag.DRAINING
    | Flag.LEAVING
    | Flag.HOLDDOWN
    | Flag.EPHEMERAL
    | Flag.DUPLICATE
)


class TLV(enum.IntEnum):
    # APPEND-ONLY: the type byte of a body TLV on the wire. Older nodes skip unknown types, so a
    # reused or renumbered type would be misread by them as the old field. A type once shipped is
    # never renumbered, renamed or reused; a new TLV takes a new number; a retired one stays
    # reserved. Pinned in test_wire_enums.py.
    VIEW_DIGEST = 1
    CONFIG_DIGEST = 2
    HELD = 3
    STATS = 4
    OVERRIDES = 5  # retired: the unsigned u32 table of earlier versions; ignored when heard
    RELEASED = 6
    POOL_DIGEST = 7
    SIGNED_OVERRIDES = 8  # the operator table with its issuer's signature
    NONCE = 9  # 8 random bytes per run: tells two instances of one node apart


class Reject(enum.StrEnum):
    """Why a datagram was refused. Each reason is its own counter."""

    # APPEND-ONLY: the values are metric label values (and show in logs and events), so dashboards
    # and alerts key on them. A reason once shipped is never renamed, given another value or
    # reused for another meaning; a new reason gets a new value; a retired one stays reserved.
    # Pinned in test_wire_enums.py.
    OVERSIZED = "oversized"
    TRUNCATED = "truncated"
    MALFORMED = "malformed"
    BAD_MAGIC = "bad_magic"
    BAD_VERSION = "bad_version"
    WRONG_CLUSTER = "wrong_cluster"
    UNKNOWN_SENDER = "unknown_sender"
    OWN_NAME = "own_name"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    REPLAY = "replay"
    STALE = "stale"
    SOURCE_NOT_ALLOWED = "source_not_allowed"  # outside cluster.accept_from (never parsed)
    RATE_LIMITED = "rate_limited"  # its source ran out of rejection budget (never parsed)
    DUPLICATE = "duplicate"  # a second copy of a datagram just accepted (not charged)
    DUPLICATE_NODE = "duplicate_node"  # from another instance of this node (not charged)


class DecodeError(Exception):
    def __init__(self, reason: Reject, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


_STATS = struct.Struct("!IHHQQIIIII")


@dataclass(frozen=True)
class Stats:
    """A node's load figures (mod_backhand's stats announcer)."""

    load_milli: int = 0  # 1-minute load average x 1000
    cpu_idle_permille: int = 0  # idle CPU, 0..1000
    ncpu: int = 0
    mem_total: int = 0  # bytes
    mem_available: int = 0  # bytes
    busy_workers: int = 0
    idle_workers: int = 0
    arriba: int = 0  # relative speed (mod_backhand)
    requests: int = 0  # requests proxied/served since start (wraps at 2**32)
    request_mean_us: int = 0

    def pack(self) -> bytes:
        return _STATS.pack(
            self.load_milli,
            self.cpu_idle_permille,
            self.ncpu,
            self.mem_total,
            self.mem_available,
            self.busy_workers,
            self.idle_workers,
            self.arriba,
            self.requests,
            self.request_mean_us,
        )


@dataclass(frozen=True)
class Heartbeat:
    cluster: str
    sender: str
    incarnation: int
    seq: int
    send_time_ms: int
    flags: Flag = Flag.NONE
    view_digest: bytes = b"\0" * DIGEST_LEN
    config_digest: bytes = b"\0" * DIGEST_LEN
    group_count: int = 0
    held: frozenset[int] = frozenset()
    stats: Stats | None = None
    overrides: Overrides = field(default_factory=Overrides)
    released: frozenset[int] = frozenset()  # group indices released lately (< group_count)
    nonce: bytes = b""  # NONCE_LEN random bytes per run, or empty (an older sender)
    pool_digest: bytes | None = None  # None: the sender did not say (unknown pool)


@dataclass(frozen=True)
class Envelope:
    """A structurally valid datagram whose signature is not yet checked."""

    version: int
    msg_type: int
    flags: Flag
    incarnation: int
    seq: int
    send_time_ms: int
    key_id: bytes
    cluster: str
    sender: str
    body: bytes
    signed: bytes
    signature: bytes


def key_id(public_key: bytes) -> bytes:
    return hashlib.sha256(public_key).digest()[:4]


# --- encoding ----------------------------------------------------------------------------


def _tlv(kind: TLV, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def _bitmap(group_count: int, held: frozenset[int]) -> bytes:
    bits = bytearray((group_count + 7) // 8)
    for i in held:
        if not 0 <= i < group_count:
            raise ValueError(f"held group index {i} outside 0..{group_count - 1}")
        bits[i >> 3] |= 0x80 >> (i & 7)
    return struct.pack("!H", group_count) + bytes(bits)


def _name(text: str, what: str) -> bytes:
    raw = text.encode()
    if not 1 <= len(raw) <= MAX_NAME:
        raise ValueError(f"{what} {text!r} must be 1..{MAX_NAME} bytes")
    return raw


def encode(hb: Heartbeat, key: Ed25519PrivateKey, public_key: bytes) -> bytes:
    """Serialize and sign. Raises ValueError for a local bug (e.g. too large)."""
    if not 0 <= hb.group_count <= MAX_GROUPS:
        raise ValueError(f"group_count {hb.group_count} outside 0..{MAX_GROUPS}")
    body = b"".join(
        [
            _tlv(TLV.VIEW_DIGEST, hb.view_digest),
            _tlv(TLV.CONFIG_DIGEST, hb.config_digest),
            _tlv(TLV.HELD, _bitmap(hb.group_count, hb.held)),
        ]
    )
    if hb.stats is not None:
        body += _tlv(TLV.STATS, hb.stats.pack())
    if hb.released:
        if len(hb.released) > MAX_RELEASED or not all(0 <= i < hb.group_count for i in hb.released):
            raise ValueError(f"released {sorted(hb.released)} out of range")
        indices = sorted(hb.released)
        body += _tlv(TLV.RELEASED, struct.pack(f"!H{len(indices)}H", len(indices), *indices))
    if hb.overrides.version:
        try:
            body += _tlv(TLV.SIGNED_OVERRIDES, hb.overrides.encode_signed())
        except OverridesError as e:
            raise ValueError(str(e)) from None
    if hb.pool_digest is not None:
        body += _tlv(TLV.POOL_DIGEST, hb.pool_digest)
    if hb.nonce:
        if len(hb.nonce) != NONCE_LEN:
            raise ValueError(f"nonce of {len(hb.nonce)} bytes, not {NONCE_LEN}")
        body += _tlv(TLV.NONCE, hb.nonce)
    cluster = _name(hb.cluster, "cluster")
    sender = _name(hb.sender, "sender")
    header = _HEADER.pack(
        MAGIC,
        VERSION,
        MSG_HEARTBEAT,
        hb.flags,
        hb.incarnation,
        hb.seq,
        hb.send_time_ms,
        key_id(public_key),
        len(cluster),
        len(sender),
        len(body),
    )
    signed = header + cluster + sender + body
    if len(signed) + SIGNATURE_LEN > MAX_DATAGRAM:
        raise ValueError(f"heartbeat of {len(signed) + SIGNATURE_LEN} bytes exceeds {MAX_DATAGRAM}")
    return signed + key.sign(DOMAIN + signed)


# --- decoding ----------------------------------------------------------------------------


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError(Reject.MALFORMED, f"{what} is not UTF-8") from None


def parse_envelope(data: bytes) -> Envelope:
    """Cheap structural checks, no crypto. Raises DecodeError."""
    if len(data) > MAX_DATAGRAM:
        raise DecodeError(Reject.OVERSIZED, f"{len(data)} bytes > {MAX_DATAGRAM}")
    if len(data) < MIN_DATAGRAM:
        raise DecodeError(Reject.TRUNCATED, f"{len(data)} bytes < {MIN_DATAGRAM}")
    (magic, version, msg_type, flags, inc, seq, sent, kid, clen, slen, blen) = _HEADER.unpack_from(
        data
    )
    if magic != MAGIC:
        raise DecodeError(Reject.BAD_MAGIC, "not a vipd datagram")
    if version != VERSION:
        raise DecodeError(Reject.BAD_VERSION, f"version {version}, this node speaks {VERSION}")
    if msg_type != MSG_HEARTBEAT:
        raise DecodeError(Reject.MALFORMED, f"unknown message type {msg_type}")
    if not (1 <= clen <= MAX_NAME and 1 <= slen <= MAX_NAME):
        raise DecodeError(Reject.MALFORMED, "name length out of range")
    end = HEADER_LEN + clen + slen + blen
    if end + SIGNATURE_LEN != len(data):
        reason = Reject.TRUNCATED if end + SIGNATURE_LEN > len(data) else Reject.MALFORMED
        raise DecodeError(
            reason, f"lengths add up to {end + SIGNATURE_LEN}, datagram has {len(data)}"
        )
    cluster = _text(data[HEADER_LEN : HEADER_LEN + clen], "cluster name")
    sender = _text(data[HEADER_LEN + clen : HEADER_LEN + clen + slen], "sender name")
    return Envelope(
        version=version,
        msg_type=msg_type,
        # Unknown bits are dropped here, before any signature check: an IntFlag built from
        # undefined bits is a new pseudo-member cached for the life of the process, so junk
        # with every flag value would grow memory (~27 MB), one datagram at a time.
        flags=Flag(flags & _KNOWN_FLAGS),
        incarnation=inc,
        seq=seq,
        send_time_ms=sent,
        key_id=kid,
        cluster=cluster,
        sender=sender,
        body=data[HEADER_LEN + clen + slen : end],
        signed=data[:end],
        signature=data[end:],
    )


def verify(env: Envelope, public_keys: tuple[bytes, ...]) -> None:
    """Check the signature with the sender's key named by key id. Raises DecodeError."""
    for raw in public_keys:
        if key_id(raw) == env.key_id:
            try:
                Ed25519PublicKey.from_public_bytes(raw).verify(env.signature, DOMAIN + env.signed)
            except InvalidSignature:
                raise DecodeError(
                    Reject.BAD_SIGNATURE, f"signature of {env.sender!r} does not verify"
                ) from None
            return
    raise DecodeError(
        Reject.UNKNOWN_KEY, f"key id {env.key_id.hex()} is not one of {env.sender!r}'s"
    )


def decode_body(env: Envelope) -> Heartbeat:
    """Parse the TLV body of a verified envelope. Raises DecodeError(MALFORMED)."""
    fields: dict[int, bytes] = {}
    body = env.body
    pos = 0
    while pos < len(body):
        if pos + 3 > len(body):
            raise DecodeError(Reject.MALFORMED, "truncated TLV header")
        kind, length = struct.unpack_from("!BH", body, pos)
        pos += 3
        if pos + length > len(body):
            raise DecodeError(Reject.MALFORMED, f"TLV {kind} overruns the body")
        if kind in fields:
            raise DecodeError(Reject.MALFORMED, f"TLV {kind} repeated")
        fields[kind] = body[pos : pos + length]
        pos += length

    def fixed(kind: TLV, size: int) -> bytes | None:
        value = fields.get(kind)
        if value is not None and len(value) != size:
            raise DecodeError(Reject.MALFORMED, f"{kind.name} has {len(value)} bytes, not {size}")
        return value

    view = fixed(TLV.VIEW_DIGEST, DIGEST_LEN)
    config = fixed(TLV.CONFIG_DIGEST, DIGEST_LEN)
    stats_raw = fixed(TLV.STATS, _STATS.size)
    pool = fixed(TLV.POOL_DIGEST, DIGEST_LEN)
    nonce = fixed(TLV.NONCE, NONCE_LEN)
    group_count, held = _parse_held(fields.get(TLV.HELD))
    overrides = _parse_overrides(fields.get(TLV.SIGNED_OVERRIDES))
    released = _parse_released(fields.get(TLV.RELEASED), group_count)
    if view is None or config is None:
        raise DecodeError(Reject.MALFORMED, "view or config digest missing")
    return Heartbeat(
        cluster=env.cluster,
        sender=env.sender,
        incarnation=env.incarnation,
        seq=env.seq,
        send_time_ms=env.send_time_ms,
        flags=env.flags,
        view_digest=view,
        config_digest=config,
        group_count=group_count,
        held=held,
        stats=Stats(*_STATS.unpack(stats_raw)) if stats_raw is not None else None,
        overrides=overrides,
        released=released,
        pool_digest=pool,
        nonce=nonce or b"",
    )


def _parse_held(value: bytes | None) -> tuple[int, frozenset[int]]:
    if value is None:
        return 0, frozenset()
    if len(value) < 2:
        raise DecodeError(Reject.MALFORMED, "HELD too short")
    (count,) = struct.unpack_from("!H", value)
    if count > MAX_GROUPS or len(value) != 2 + (count + 7) // 8:
        raise DecodeError(Reject.MALFORMED, f"HELD bitmap does not match {count} groups")
    held = frozenset(i for i in range(count) if value[2 + (i >> 3)] & (0x80 >> (i & 7)))
    if count % 8 and value[-1] & (0xFF >> (count % 8)):
        raise DecodeError(Reject.MALFORMED, "HELD has bits set past the group count")
    return count, held


def _parse_overrides(value: bytes | None) -> Overrides:
    if value is None:
        return Overrides()
    try:
        table = Overrides.decode_signed(value)
    except OverridesError as e:
        raise DecodeError(Reject.MALFORMED, f"SIGNED_OVERRIDES: {e}") from None
    return table


def _parse_released(value: bytes | None, group_count: int) -> frozenset[int]:
    if value is None:
        return frozenset()
    if len(value) < 2:
        raise DecodeError(Reject.MALFORMED, "RELEASED too short")
    (count,) = struct.unpack_from("!H", value)
    if count > MAX_RELEASED or len(value) != 2 + 2 * count:
        raise DecodeError(Reject.MALFORMED, f"RELEASED does not hold {count} indices")
    indices = struct.unpack_from(f"!{count}H", value, 2)
    if any(i >= group_count for i in indices):
        raise DecodeError(Reject.MALFORMED, f"RELEASED index past the {group_count} groups")
    return frozenset(indices)
