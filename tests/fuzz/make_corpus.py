"""Write the fuzz corpus: seed inputs, each with the outcome it must have.

    python -m tests.fuzz.make_corpus            # (re)write the generated entries
    python -m tests.fuzz.make_corpus --check    # exit 1 if the files differ from this script
    python -m tests.fuzz.make_corpus add wire FILE --name NAME --why TEXT
    python -m tests.fuzz.make_corpus add control FILE --name NAME --why TEXT [--bug TEXT]

``tests/fuzz/corpus/wire/*.bin`` are datagrams; ``wire.index.json`` maps each file to the
decoder's verdict ("decoded" or a Reject reason; the signature is checked against any roster
key) and the core's (a fresh n1 that has heard nobody: "accepted" or a reason).
``tests/fuzz/corpus/control/*.bin`` are control-socket lines; ``control.index.json`` maps each
to whether root and an unprivileged user get ``"ok": true``. An entry with ``bug`` documents a
known defect: its expectation is the correct behaviour, and its replay test is a strict xfail.

Everything is deterministic (fixed keys, fixed times, RFC 8032 signatures), so ``--check``
compares bytes. Each generated entry declares its outcome by construction and the generator
refuses to write one whose actual outcome differs, so the index is a specification, not a
recording. Entries added with ``add`` (inputs a long fuzz run found) record their current
outcome, are marked ``"source": "found"`` and are kept when the generated ones are rewritten.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.clusterkit import WALL0
from tests.fuzz.kit import (
    CORPUS,
    HEADER_FIELDS,
    KEYS,
    ROOT,
    STRANGER,
    USER,
    FakeCommands,
    Parts,
    control_server,
    decode,
    feed,
    heartbeat,
    raw_overrides,
    receiver,
    seal,
    sign,
    tlv,
    wire_outcome,
)
from vipd.membership import wire
from vipd.membership.wire import TLV, DecodeError, Flag, Stats
from vipd.placement.overrides import MAX_VERSION, Move, Overrides

#: Ed25519's group order: S and S + L verify the same under a lax verifier.
ED25519_L = 2**252 + 27742317777372353535851937790883648493
MS0 = int(WALL0 * 1000)
DECODER_LEVEL = {
    "oversized",
    "truncated",
    "malformed",
    "bad_magic",
    "bad_version",
    "unknown_key",
    "bad_signature",
}


@dataclass(frozen=True)
class WireSeed:
    name: str
    data: bytes
    core: str  # "accepted" or the reason a fresh receiver gives
    why: str
    wire: str = ""  # the decoder's verdict; by default the core's if the decoder decides it
    #: Part of the decoder's DecodeError detail, to make sure a refusal is the intended one
    #: (checked by the generator, not recorded in the index).
    detail: str = ""
    bug: str = ""  # a known defect: the outcome declared is the correct one, not today's

    @property
    def expected_wire(self) -> str:
        if self.wire:
            return self.wire
        return self.core if self.core in DECODER_LEVEL else "decoded"


@dataclass(frozen=True)
class ControlSeed:
    name: str
    line: bytes
    root: bool  # does root get "ok": true
    user: bool  # does an unprivileged user
    why: str
    bug: str = ""


# --- wire seeds ----------------------------------------------------------------------------


def _body(*items: bytes, base: bool = True) -> bytes:
    """A body: the two digests (unless base=False) and then the given TLVs."""
    head = tlv(TLV.VIEW_DIGEST, b"V" * 8) + tlv(TLV.CONFIG_DIGEST, heartbeat().config_digest)
    return (head if base else b"") + b"".join(items)


def _with_body(body: bytes, *, data: bytes | None = None) -> bytes:
    parts = Parts.of(data if data is not None else sign(heartbeat()))
    parts.body = body
    return parts.seal(KEYS["n2"])


def _header(data: bytes, **fields: int | bytes) -> bytes:
    """Rewrite header fields, nothing else (no re-signing)."""
    header = bytearray(data[: wire.HEADER_LEN])
    for name, value in fields.items():
        offset, fmt = HEADER_FIELDS[name]
        struct.pack_into("!" + fmt, header, offset, value)
    return bytes(header) + data[wire.HEADER_LEN :]


def _padded_to(size: int) -> bytes:
    """A genuine, correctly signed heartbeat of exactly `size` bytes (an unknown TLV pads)."""
    base = sign(heartbeat())
    pad = size - len(base) - 3
    parts = Parts.of(base)
    parts.body += tlv(200, b"\0" * pad)
    data = parts.seal(KEYS["n2"])
    assert len(data) == size
    return data


def wire_seeds() -> list[WireSeed]:
    n2 = KEYS["n2"]
    base = sign(heartbeat())
    signed, sig = base[: -wire.SIGNATURE_LEN], base[-wire.SIGNATURE_LEN :]
    s_value = int.from_bytes(sig[32:], "little")
    malleated = signed + sig[:32] + (s_value + ED25519_L).to_bytes(32, "little")
    flipped = bytearray(base)
    flipped[len(signed) - 1] ^= 0x01
    big = heartbeat(
        group_count=wire.MAX_GROUPS,
        held=frozenset(range(0, wire.MAX_GROUPS, 3)),
        released=frozenset(range(1, 3 * wire.MAX_RELEASED, 3)),
        stats=Stats(1500, 800, 4, 8 << 30, 6 << 30, 12, 4, 100, 2**32 - 1, 900),
        overrides=Overrides(
            MAX_VERSION, "n1", (Move("g-4095", "ü" * 31, "reload"),), ("n3",)
        ).signed(KEYS["n1"], "web"),
        pool_digest=b"P" * 8,
    )
    longest = "ü" * 31 + "x"  # 63 bytes
    s = WireSeed
    return [
        # accepted, of several shapes
        s("accepted-typical", base, "accepted", "6 groups, holds 0 and 5"),
        s("accepted-minimal", sign(heartbeat(group_count=0, held=frozenset())), "accepted", ""),
        s("accepted-digests-only", _with_body(_body()), "accepted", "no HELD TLV: 0 groups"),
        s(
            "accepted-every-tlv",
            sign(
                heartbeat(
                    stats=Stats(load_milli=1500, ncpu=4),
                    overrides=TABLE,
                    released=frozenset({1, 2}),
                    pool_digest=b"P" * 8,
                )
            ),
            "accepted",
            "stats, released, pool digest, a table: moves of both reasons, a drain, UTF-8 names",
        ),
        s("accepted-4096-groups", sign(big), "accepted", "the largest pool, every TLV"),
        s(
            "accepted-overrides-longest-names",
            sign(
                heartbeat(
                    overrides=Overrides(1, longest, (Move(longest, longest),), (longest,)).signed(
                        KEYS["n2"], "web"
                    )
                )
            ),
            "accepted",
            "issuer, group, target and drained node of 63 bytes",
        ),
        s(
            "accepted-overrides-no-entries",
            sign(heartbeat(overrides=Overrides(3, "n1").signed(KEYS["n1"], "web"))),
            "accepted",
            "version 3, nothing moved or drained (the last one undone)",
        ),
        s("accepted-exactly-1200", _padded_to(wire.MAX_DATAGRAM), "accepted", "the size limit"),
        s(
            "accepted-unknown-tlv",
            _with_body(_body(tlv(TLV.HELD, b"\0\6\x84"), tlv(200, b"future"))),
            "accepted",
            "unknown TLV types are skipped",
        ),
        s("accepted-leaving", sign(heartbeat(flags=Flag.LEAVING)), "accepted", ""),
        s("accepted-all-flag-bits", sign(heartbeat(flags=Flag(0xFFFF))), "accepted", ""),
        s("accepted-from-n3", sign(heartbeat("n3")), "accepted", "another sender, another key"),
        s(
            "accepted-config-mismatch",
            sign(heartbeat(config_digest=b"X" * 8)),
            "accepted",
            "accepted, counted as config_mismatch",
        ),
        s(
            "accepted-max-counters",
            sign(heartbeat(incarnation=2**64 - 1, seq=2**64 - 1)),
            "accepted",
            "",
        ),
        s(
            "accepted-skew-29s",
            sign(heartbeat(send_time_ms=MS0 + 29_000)),
            "accepted",
            "inside the 30 s freshness window",
        ),
        # size
        s("oversized-1201", base + bytes(1201 - len(base)), "oversized", ""),
        s("oversized-signed-1201", _padded_to(1201), "oversized", "well formed, signed, 1 too big"),
        s(
            "oversized-2048",
            (b"VIPD\x01\x01" + bytes(2048))[:2048],
            "oversized",
            "the receive buffer",
        ),
        s("truncated-empty", b"", "truncated", ""),
        s("truncated-1-byte", b"V", "truncated", ""),
        s("truncated-header-only", base[: wire.HEADER_LEN], "truncated", ""),
        s("truncated-below-minimum", base[: wire.MIN_DATAGRAM - 1], "truncated", ""),
        s("truncated-last-byte", base[:-1], "truncated", "lengths add up to 1 more"),
        s("truncated-no-signature", base[: -wire.SIGNATURE_LEN], "truncated", ""),
        s(
            "truncated-body-length",
            _header(base, blen=len(Parts.of(base).body) + 1),
            "truncated",
            "blen 1 more than there is",
        ),
        # envelope structure
        s("malformed-trailing-byte", base + b"\0", "malformed", "lengths add up to 1 less"),
        s("malformed-message-type", _header(base, type=2), "malformed", ""),
        s("malformed-cluster-length-0", _header(base, clen=0), "malformed", ""),
        s("malformed-sender-length-64", _header(base, slen=64), "malformed", ""),
        s("malformed-cluster-not-utf8", _names(b"w\xffb", b"n2"), "malformed", ""),
        s("malformed-sender-not-utf8", _names(b"web", b"n\xc3"), "malformed", ""),
        s("bad_magic-lowercase", _header(base, magic=b"vipd"), "bad_magic", ""),
        s(
            "bad_magic-http",
            b"GET / HTTP/1.1\r\nHost: vipd\r\n\r\n".ljust(120, b" "),
            "bad_magic",
            "",
        ),
        s("bad_version-0", _header(base, version=0), "bad_version", ""),
        s("bad_version-2", _header(base, version=2), "bad_version", ""),
        # bodies, correctly signed: decode_body's every refusal
        s("body-empty", _with_body(b""), "malformed", "no TLV at all"),
        s("body-truncated-tlv-header", _with_body(_body(b"\x01\x00")), "malformed", ""),
        s("body-tlv-overrun", _with_body(_body(tlv(9, b"", length=50))), "malformed", ""),
        s("body-tlv-repeated", _with_body(_body(tlv(TLV.VIEW_DIGEST, b"W" * 8))), "malformed", ""),
        s(
            "body-unknown-tlv-repeated",
            _with_body(_body(tlv(200, b""), tlv(200, b""))),
            "malformed",
            "even unknown types appear once",
        ),
        s(
            "body-view-digest-7-bytes",
            _with_body(tlv(1, b"V" * 7) + tlv(2, b"C" * 8)),
            "malformed",
            "",
        ),
        s("body-config-digest-missing", _with_body(tlv(1, b"V" * 8)), "malformed", ""),
        s("body-stats-55-bytes", _with_body(_body(tlv(TLV.STATS, bytes(55)))), "malformed", ""),
        s("body-held-too-short", _with_body(_body(tlv(TLV.HELD, b"\0"))), "malformed", ""),
        s(
            "body-held-count-mismatch",
            _with_body(_body(tlv(TLV.HELD, b"\0\x09\xff"))),
            "malformed",
            "9 groups need 2 bitmap bytes",
        ),
        s(
            "body-held-4097-groups",
            _with_body(_body(tlv(TLV.HELD, struct.pack("!H", 4097) + bytes(513)))),
            "malformed",
            "",
        ),
        s(
            "body-held-bit-past-count",
            _with_body(_body(tlv(TLV.HELD, b"\0\6\x85"))),
            "malformed",
            "bit 7 of 6 groups",
        ),
        s("body-pool-digest-7-bytes", _with_pool(7), "malformed", "", detail="POOL_DIGEST has"),
        s("body-pool-digest-9-bytes", _with_pool(9), "malformed", "", detail="POOL_DIGEST has"),
        # SIGNED_OVERRIDES: Overrides.decode_signed's every refusal
        s(
            "body-overrides-truncated",
            _with_table(TABLE.encode()[:20]),
            "malformed",
            "cut inside the second move",
            detail="truncated name",
        ),
        s(
            "body-overrides-moves-count-past-entries",
            _with_table(raw_overrides(1, b"n2", [(b"g", b"n1", 0)], [b"n3"], move_count=2)),
            "malformed",
            "count 2, one move: the drained list is read as a move",
            detail="name length 0",
        ),
        s(
            "body-overrides-drained-count-past-entries",
            _with_table(raw_overrides(1, b"n2", [], [b"n3"], drained_count=2)),
            "malformed",
            "count 2, one name",
            detail="truncated",
        ),
        s(
            "body-overrides-513-entries",
            _with_table(raw_overrides(1, b"n2", drained_count=513)),
            "malformed",
            "refused before reading one: MAX_ENTRIES is 512",
            detail="513 entries, at most 512",
        ),
        s(
            "body-overrides-group-empty",
            _with_table(raw_overrides(1, b"n2", [(b"", b"n1", 0)])),
            "malformed",
            "",
            detail="name length 0",
        ),
        s(
            "body-overrides-name-64-bytes",
            _with_table(raw_overrides(1, b"n2", [], [b"n" * 64])),
            "malformed",
            "",
            detail="name length 64",
        ),
        s(
            "body-overrides-name-not-utf8",
            _with_table(raw_overrides(1, b"n2", [(b"g", b"n\xff", 0)])),
            "malformed",
            "a move's target",
            detail="not UTF-8",
        ),
        s(
            "body-overrides-reason-2",
            _with_table(raw_overrides(1, b"n2", [(b"g", b"n1", 2)])),
            "malformed",
            "0 is move, 1 is reload",
            detail="unknown move reason 2",
        ),
        s(
            "body-overrides-moves-unsorted",
            _with_table(raw_overrides(1, b"n2", [(b"www-b", b"n1", 0), (b"www-a", b"n1", 0)])),
            "malformed",
            "",
            detail="not sorted or repeated",
        ),
        s(
            "body-overrides-group-repeated",
            _with_table(raw_overrides(1, b"n2", [(b"www-a", b"n1", 0), (b"www-a", b"n3", 1)])),
            "malformed",
            "two moves of one group",
            detail="not sorted or repeated",
        ),
        s(
            "body-overrides-drained-unsorted",
            _with_table(raw_overrides(1, b"n2", [], [b"n3", b"n2"])),
            "malformed",
            "",
            detail="not sorted or repeated",
        ),
        s(
            "body-overrides-drained-repeated",
            _with_table(raw_overrides(1, b"n2", [], [b"n3", b"n3"])),
            "malformed",
            "",
            detail="not sorted or repeated",
        ),
        s(
            "body-overrides-trailing",
            _with_table(TABLE.encode() + b"\0"),
            "malformed",
            "",
            detail="trailing bytes",
        ),
        s(
            "body-overrides-version-0-with-content",
            _with_table(raw_overrides(0, b"n2", [], [b"n3"])),
            "malformed",
            "version 0 is the empty table",
            detail="version 0 is the empty table",
        ),
        s(
            "body-overrides-version-0-empty",
            _with_table(raw_overrides(0, b"")),
            "malformed",
            "the empty table is sent as no TLV at all, and is never signed",
            detail="the empty table (version 0) is not signed",
        ),
        s(
            "body-overrides-signature-short",
            _with_table(b"", signature=bytes(30)),
            "malformed",
            "30 bytes: not even a signature",
            detail="shorter than a signature",
        ),
        s(
            "accepted-retired-unsigned-table",
            _with_body(
                _body(
                    tlv(TLV.HELD, b"\0\6\x84"),
                    tlv(TLV.OVERRIDES, struct.pack("!IB", 4, 2) + b"n1" + bytes(4)),
                )
            ),
            "accepted",
            "TLV 5, the unsigned table of earlier versions: skipped, the table stays empty",
        ),
        s(
            "body-overrides-issuer-empty",
            _with_table(raw_overrides(1, b"")),
            "malformed",
            "a table above version 0 names its issuer (accepted before a fuzz-found fix)",
        ),
        s("body-released-too-short", _with_body(_body(tlv(TLV.RELEASED, b"\0"))), "malformed", ""),
        s(
            "body-released-count-mismatch",
            _with_body(_body(tlv(TLV.HELD, b"\0\6\0"), tlv(TLV.RELEASED, b"\0\2\0\1"))),
            "malformed",
            "",
        ),
        s(
            "body-released-65",
            _with_body(
                _body(
                    tlv(TLV.HELD, struct.pack("!H", 128) + bytes(16)),
                    tlv(TLV.RELEASED, struct.pack("!65H", 65, *range(64))),
                )
            ),
            "malformed",
            "MAX_RELEASED is 64",
        ),
        s(
            "body-released-past-groups",
            _with_body(_body(tlv(TLV.HELD, b"\0\6\0"), tlv(TLV.RELEASED, b"\0\1\0\6"))),
            "malformed",
            "index 6 of 6 groups",
        ),
        # who sends it
        s("wrong_cluster-other", sign(heartbeat(cluster="other")), "wrong_cluster", ""),
        s("wrong_cluster-63-bytes", sign(heartbeat(cluster="c" * 63)), "wrong_cluster", ""),
        s(
            "unknown_sender-own-key",
            sign(heartbeat("mallory"), STRANGER),
            "unknown_sender",
            "not in the roster (nor is its key)",
            wire="unknown_key",
        ),
        s(
            "unknown_sender-member-key",
            sign(heartbeat("mallory"), n2),
            "unknown_sender",
            "signed by n2 for a name not in the roster",
        ),
        s("own_name", sign(heartbeat("n1"), n2), "own_name", "claims to be the receiver"),
        s("unknown_key-stranger", sign(heartbeat(), STRANGER), "unknown_key", ""),
        s(
            "unknown_key-another-member",
            sign(heartbeat(), KEYS["n3"]),
            "unknown_key",
            "n3 cannot speak for n2",
            wire="decoded",
        ),
        s("bad_signature-body-bit", bytes(flipped), "bad_signature", ""),
        s("bad_signature-zeroed", signed + bytes(64), "bad_signature", ""),
        s(
            "bad_signature-malleated-s",
            malleated,
            "bad_signature",
            "S + L: the same signature to a lax verifier",
        ),
        s(
            "bad_signature-forged-key-id",
            _forged(signed),
            "bad_signature",
            "the stranger signs, claiming n2's key id",
        ),
        s(
            "bad_signature-no-domain",
            signed + n2.sign(signed),
            "bad_signature",
            "signed without the domain prefix",
        ),
        s(
            "bad_signature-other-datagram",
            signed + sign(heartbeat(seq=2))[-wire.SIGNATURE_LEN :],
            "bad_signature",
            "the signature of seq 2",
        ),
        # when
        s("replay-zero", sign(heartbeat(incarnation=0, seq=0)), "replay", "not after (0, 0)"),
        s("stale-31s-old", sign(heartbeat(send_time_ms=MS0 - 31_000)), "stale", ""),
        s("stale-1h-ahead", sign(heartbeat(send_time_ms=MS0 + 3_600_000)), "stale", ""),
        s("stale-epoch", sign(heartbeat(send_time_ms=0)), "stale", ""),
        s("stale-max", sign(heartbeat(send_time_ms=2**64 - 1)), "stale", ""),
    ]


def _names(cluster: bytes, sender: bytes) -> bytes:
    parts = Parts.of(sign(heartbeat()))
    parts.cluster, parts.sender = cluster, sender
    return parts.seal(KEYS["n2"])


#: A table with moves of both reasons, a drained node and UTF-8 names (the seeds' base).
TABLE = Overrides(
    9, "n3", (Move("www-a", "n1"), Move("www-b", "nœud", "reload"), Move("名前", "n2")), ("n2",)
).signed(KEYS["n3"], "web")


def _with_table(raw: bytes, *, signature: bytes = bytes(wire.SIGNATURE_LEN)) -> bytes:
    """A correctly signed heartbeat whose SIGNED_OVERRIDES TLV holds the table content `raw`
    and then `signature` (which the decoder parses but does not check)."""
    value = raw + signature
    return _with_body(_body(tlv(TLV.HELD, b"\0\6\x84"), tlv(TLV.SIGNED_OVERRIDES, value)))


def _with_pool(size: int) -> bytes:
    return _with_body(_body(tlv(TLV.HELD, b"\0\6\x84"), tlv(TLV.POOL_DIGEST, b"P" * size)))


def _forged(signed: bytes) -> bytes:
    return seal(signed, STRANGER)


# --- control seeds -------------------------------------------------------------------------


def control_seeds() -> list[ControlSeed]:
    c = ControlSeed
    status = b'{"cmd":"status"}'
    return [
        c("status", status + b"\n", True, True, "read-only: anyone"),
        c("move", b'{"cmd":"move"}\n', True, False, "mutating: root or the admin group"),
        c("status-extra-keys", b'{"cmd":"status","x":[1,{"y":null}],"":""}', True, True, ""),
        c("status-padded", b" " * 1000 + status + b"\r\n", True, True, "JSON whitespace"),
        c("duplicate-cmd-last-wins", b'{"cmd":"move","cmd":"status"}', True, True, ""),
        c("duplicate-cmd-move-wins", b'{"cmd":"status","cmd":"move"}', True, False, ""),
        c("utf8-bom", b"\xef\xbb\xbf" + status, True, True, "json.loads accepts a BOM"),
        c("utf16", status.decode().encode("utf-16-le"), True, True, "json.loads detects it"),
        c("utf32", status.decode().encode("utf-32-be"), True, True, ""),
        c("float-overflow", b'{"cmd":"status","x":1e999999}', True, True, "inf"),
        c("nan", b'{"cmd":"status","x":NaN}', True, True, ""),
        c("nested-100-in-request", _nested(b'{"cmd":"status","x":', 100, b"}"), True, True, ""),
        c("empty", b"", False, False, "EOF in the middle of nothing"),
        c("newline", b"\n", False, False, ""),
        c("not-json", b"hello\n", False, False, ""),
        c("array", b"[1,2]", False, False, ""),
        c("number", b"5", False, False, ""),
        c("string", b'"status"', False, False, ""),
        c("null", b"null", False, False, ""),
        c("cmd-int", b'{"cmd":5}', False, False, ""),
        c("cmd-null", b'{"cmd":null}', False, False, ""),
        c("cmd-list", b'{"cmd":["status"]}', False, False, ""),
        c("cmd-unknown", b'{"cmd":"nope"}', False, False, ""),
        c("cmd-case", b'{"cmd":"STATUS"}', False, False, ""),
        c("cmd-nul", b'{"cmd":"status\\u0000"}', False, False, ""),
        c("cmd-lone-surrogate", b'{"cmd":"\\ud800"}', False, False, "echoed back as repr"),
        c("two-objects", status + status, False, False, "extra data"),
        c("int-5000-digits", b'{"cmd":"status","n":' + b"9" * 5000 + b"}", False, False, ""),
        c("invalid-utf8", b'{"cmd":"st\xffatus"}', False, False, ""),
        c("overlong-utf8", b'{"cmd":"\xc0\xaf"}', False, False, ""),
        c("surrogate-utf8", b'{"cmd":"\xed\xa0\x80"}', False, False, "CESU surrogate"),
        c("nul-bytes", b"\0" * 64, False, False, ""),
        c("nested-100-array", _nested(b"", 100, b""), False, False, "not an object"),
        c("deep-array-2000", b"[" * 2000, False, False, "nested too deeply"),
        c(
            "deep-in-request-2000",
            b'{"cmd":"status","x":' + b'{"a":' * 2000,
            False,
            False,
            "nested too deeply",
        ),
    ]


def _nested(head: bytes, depth: int, tail: bytes) -> bytes:
    return head + b"[" * depth + b"]" * depth + tail


# --- outcomes, index, files ----------------------------------------------------------------


def control_outcome(line: bytes) -> tuple[bool, bool] | str:
    """(root ok, user ok), or the name of the exception handle_line raised."""

    async def run() -> tuple[bool, bool]:
        server = control_server(Path("/nonexistent/ctl.sock"), FakeCommands())
        root = await server.handle_line(line, ROOT)
        user = await server.handle_line(line, USER)
        return bool(root["ok"]), bool(user["ok"])

    try:
        return asyncio.run(run())
    except Exception as e:
        return type(e).__name__


def core_outcome(data: bytes) -> str:
    return feed(receiver(), data)


def wire_detail(data: bytes) -> str:
    """The detail of the decoder's DecodeError ("" if it decodes)."""
    try:
        decode(data)
    except DecodeError as e:
        return e.detail
    return ""


def wire_entry(seed: WireSeed) -> dict[str, Any]:
    entry: dict[str, Any] = {"wire": seed.expected_wire, "core": seed.core, "why": seed.why}
    if seed.bug:
        entry["bug"] = seed.bug
    entry["source"] = "generated"
    return entry


def control_entry(seed: ControlSeed) -> dict[str, Any]:
    entry: dict[str, Any] = {"root": seed.root, "user": seed.user, "why": seed.why}
    if seed.bug:
        entry["bug"] = seed.bug
    entry["source"] = "generated"
    return entry


def verify_seeds() -> list[str]:
    """Every generated seed has the outcome it declares (known bugs: the opposite)."""
    problems = []
    names: set[str] = set()
    for ws in wire_seeds():
        if ws.name in names:
            problems.append(f"wire/{ws.name}: duplicate name")
        names.add(ws.name)
        got = (wire_outcome(ws.data), core_outcome(ws.data))
        want = (ws.expected_wire, ws.core)
        if ws.bug and got == want:
            problems.append(f"wire/{ws.name}: its bug is fixed; drop 'bug' from the seed")
        elif not ws.bug and got != want:
            problems.append(f"wire/{ws.name}: declared {want}, got {got}")
        elif ws.detail and ws.detail not in wire_detail(ws.data):
            problems.append(f"wire/{ws.name}: refused for {wire_detail(ws.data)!r}")
    for cs in control_seeds():
        result = control_outcome(cs.line)
        declared = (cs.root, cs.user)
        if cs.bug and result == declared:
            problems.append(f"control/{cs.name}: its bug is fixed; drop 'bug' from the seed")
        elif not cs.bug and result != declared:
            problems.append(f"control/{cs.name}: declared {declared}, got {result}")
    return problems


def index_path(target: str) -> Path:
    return CORPUS / f"{target}.index.json"


def load_index(target: str) -> dict[str, dict[str, Any]]:
    path = index_path(target)
    if not path.exists():
        return {}
    index: dict[str, dict[str, Any]] = json.loads(path.read_text())
    return index


def generated() -> dict[str, tuple[dict[str, bytes], dict[str, dict[str, Any]]]]:
    """target -> (file name -> bytes, file name -> index entry), for the generated seeds."""
    wire_files = {f"{s.name}.bin": s.data for s in wire_seeds()}
    wire_index = {f"{s.name}.bin": wire_entry(s) for s in wire_seeds()}
    control_files = {f"{s.name}.bin": s.line for s in control_seeds()}
    control_index = {f"{s.name}.bin": control_entry(s) for s in control_seeds()}
    return {"wire": (wire_files, wire_index), "control": (control_files, control_index)}


def differences() -> list[str]:
    """How the corpus on disk differs from the generator (empty: up to date)."""
    out = []
    for target, (files, index) in generated().items():
        on_disk = load_index(target)
        for name, data in files.items():
            path = CORPUS / target / name
            if not path.exists() or path.read_bytes() != data:
                out.append(f"{target}/{name}: file differs or is missing")
            if on_disk.get(name) != index[name]:
                out.append(f"{target}/{name}: index entry differs or is missing")
        for name, entry in on_disk.items():
            if entry.get("source") == "generated" and name not in files:
                out.append(f"{target}/{name}: no longer generated")
            if not (CORPUS / target / name).exists():
                out.append(f"{target}/{name}: indexed but missing")
        for path in sorted((CORPUS / target).glob("*.bin")):
            if path.name not in on_disk:
                out.append(f"{target}/{path.name}: not in the index")
    return out


def write() -> None:
    for target, (files, index) in generated().items():
        directory = CORPUS / target
        directory.mkdir(parents=True, exist_ok=True)
        old = load_index(target)
        for name, entry in old.items():
            if entry.get("source") == "generated" and name not in files:
                (directory / name).unlink(missing_ok=True)
        merged = {n: e for n, e in old.items() if e.get("source") != "generated"}
        merged.update(index)
        for name, data in files.items():
            (directory / name).write_bytes(data)
        _write_index(target, merged)


def _write_index(target: str, index: dict[str, dict[str, Any]]) -> None:
    lines = [
        f"{json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in sorted(index.items())
    ]
    index_path(target).write_text("{\n" + ",\n".join(lines) + "\n}\n")


def add(target: str, source: Path, name: str, why: str, bug: str) -> str:
    """Add a found input under its current outcome (or, with bug, the correct one)."""
    data = source.read_bytes()
    file = f"{name}.bin"
    entry: dict[str, Any]
    if target == "wire":
        entry = {"wire": wire_outcome(data), "core": core_outcome(data), "why": why}
    else:
        result = control_outcome(data)
        if isinstance(result, str):
            if not bug:
                raise SystemExit(f"handle_line raises {result}: describe it with --bug")
            result = (False, False)  # what it should answer: an error reply
        entry = {"root": result[0], "user": result[1], "why": why}
        if bug:
            entry["bug"] = bug
    entry["source"] = "found"
    index = load_index(target)
    index[file] = entry
    (CORPUS / target / file).write_bytes(data)
    _write_index(target, index)
    return f"{target}/{file}: {entry}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare, exit 1 on change")
    sub = parser.add_subparsers(dest="command")
    adding = sub.add_parser("add", help="add an input a fuzz run found")
    adding.add_argument("target", choices=("wire", "control"))
    adding.add_argument("file", type=Path)
    adding.add_argument("--name", required=True)
    adding.add_argument("--why", default="")
    adding.add_argument("--bug", default="", help="a known defect this input shows")
    args = parser.parse_args(argv)
    problems = verify_seeds()
    if problems:
        print("generated seeds do not have their declared outcome:", *problems, sep="\n  ")
        return 1
    if args.command == "add":
        print(add(args.target, args.file, args.name, args.why, args.bug))
        return 0
    if args.check:
        diff = differences()
        print(*(diff or ["corpus up to date"]), sep="\n")
        return 1 if diff else 0
    write()
    counts = {t: len(load_index(t)) for t in ("wire", "control")}
    print(f"wrote {CORPUS}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
