"""The wire codec, and every kind of bad datagram as a counted rejection in the core."""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.clusterkit import WALL0, Node, make_cluster
from vipd.host.keys import public_key_bytes
from vipd.membership import wire
from vipd.membership.core import MembershipCore
from vipd.membership.events import PacketRejected
from vipd.membership.wire import Flag, Heartbeat, Stats
from vipd.placement.overrides import Move, Overrides


def heartbeat(**overrides: object) -> Heartbeat:
    fields: dict[str, object] = {
        "cluster": "web",
        "sender": "n2",
        "incarnation": 7,
        "seq": 1,
        "send_time_ms": int(WALL0 * 1000),
        "flags": Flag.READY,
        "view_digest": b"V" * 8,
        "config_digest": b"C" * 8,
        "group_count": 6,
        "held": frozenset({0, 5}),
    }
    fields.update(overrides)
    return Heartbeat(**fields)  # type: ignore[arg-type]


Pair = tuple[MembershipCore, Node]
KEY = Ed25519PrivateKey.generate()
PUB = public_key_bytes(KEY)


def roundtrip(hb: Heartbeat) -> Heartbeat:
    data = wire.encode(hb, KEY, PUB)
    env = wire.parse_envelope(data)
    wire.verify(env, (PUB,))
    return wire.decode_body(env)


def test_round_trip_keeps_every_field() -> None:
    hb = heartbeat(
        stats=Stats(load_milli=1500, cpu_idle_permille=800, ncpu=4, mem_total=8 << 30),
        overrides=Overrides(
            2**40, "n3", (Move("www-a", "n1"), Move("www-b", "n2", "reload")), ("n3",)
        ).signed(KEY, "web"),
        flags=Flag.READY | Flag.DRAINING,
        released=frozenset({1, 2}),
        pool_digest=b"P" * 8,
    )
    back = roundtrip(hb)
    assert back == hb
    assert back.overrides.signature == hb.overrides.signature
    assert back.overrides.verifies([PUB], "web")


def test_released_is_bounded_and_checked_against_the_group_count() -> None:
    with pytest.raises(ValueError):
        wire.encode(heartbeat(released=frozenset({6})), KEY, PUB)  # past the 6 groups
    with pytest.raises(ValueError):
        too_many = frozenset(range(wire.MAX_RELEASED + 1))
        wire.encode(heartbeat(group_count=100, released=too_many), KEY, PUB)
    # A signed heartbeat whose RELEASED names a group past HELD's count is malformed.
    body = (
        struct.pack("!BH", wire.TLV.VIEW_DIGEST, 8)
        + b"V" * 8
        + struct.pack("!BH", wire.TLV.CONFIG_DIGEST, 8)
        + b"C" * 8
        + struct.pack("!BHH", wire.TLV.HELD, 3, 6)
        + b"\0"
        + struct.pack("!BHHH", wire.TLV.RELEASED, 4, 1, 6)
    )
    env = wire.parse_envelope(wire.encode(heartbeat(), KEY, PUB))
    bad = wire.Envelope(**{**env.__dict__, "body": body})
    with pytest.raises(wire.DecodeError, match="RELEASED index"):
        wire.decode_body(bad)


@given(
    held=st.frozensets(st.integers(0, 4095), max_size=4096),
    inc=st.integers(0, 2**64 - 1),
    seq=st.integers(0, 2**64 - 1),
    flags=st.integers(0, 15),
)
@settings(max_examples=60, deadline=None)
def test_round_trip_property(held: frozenset[int], inc: int, seq: int, flags: int) -> None:
    hb = heartbeat(group_count=4096, held=held, incarnation=inc, seq=seq, flags=Flag(flags))
    assert roundtrip(hb) == hb


def test_full_pool_of_4096_groups_fits_one_datagram() -> None:
    hb = heartbeat(
        sender="n" * 63,
        cluster="c" * 63,
        group_count=4096,
        held=frozenset(range(4096)),
        stats=Stats(),
        overrides=Overrides(
            2**64 - 1,
            "n" * 10,
            tuple(Move(f"group-{i:04d}", "n" * 10) for i in range(10)),
            ("n" * 10,),
        ).signed(KEY, "c" * 63),
        pool_digest=b"P" * 8,
    )
    assert len(wire.encode(hb, KEY, PUB)) <= wire.MAX_DATAGRAM


def test_encoder_refuses_to_exceed_the_datagram_limit() -> None:
    too_many = Overrides(1, "n1", tuple(Move(f"{i:063d}", "t" * 63) for i in range(40))).signed(
        KEY, "web"
    )
    with pytest.raises(ValueError, match="exceeds"):
        wire.encode(heartbeat(group_count=4096, overrides=too_many), KEY, PUB)


# --- rejections, counted by the core -----------------------------------------------------


@pytest.fixture()
def pair() -> tuple[MembershipCore, Node]:
    nodes = make_cluster(2, groups=6)
    return nodes["n1"].core(), nodes["n2"]


def genuine(node: Node, seq: int = 1, incarnation: int = 7, **kw: object) -> bytes:
    hb = heartbeat(
        seq=seq,
        incarnation=incarnation,
        config_digest=node.config.digest,
        **kw,
    )
    return wire.encode(hb, node.key, node.public_key)


def rejections(core: MembershipCore) -> list[str]:
    out = []
    while (e := core.next_event()) is not None:
        if isinstance(e, PacketRejected):
            out.append(e.reason)
    return out


def deliver(core: MembershipCore, data: bytes) -> list[str]:
    core.receive(data, "198.51.100.12", now=1.0, wall=WALL0)
    return rejections(core)


def test_genuine_heartbeat_is_accepted(pair: Pair) -> None:
    core, n2 = pair
    assert deliver(core, genuine(n2)) == []
    assert core.counters["rx_accepted"] == 1
    assert core.peers["n2"].held == frozenset({0, 5})


def test_truncated(pair: Pair) -> None:
    core, n2 = pair
    data = genuine(n2)
    assert deliver(core, data[:30]) == ["truncated"]
    assert deliver(core, data[:-1]) == ["truncated"]
    assert core.rejected["truncated"] == 2


def test_oversized(pair: Pair) -> None:
    core, n2 = pair
    assert deliver(core, genuine(n2) + b"\0" * 1200) == ["oversized"]
    assert core.rejected["oversized"] == 1


def test_wrong_version_and_magic(pair: Pair) -> None:
    core, n2 = pair
    data = bytearray(genuine(n2))
    data[4] = 2
    assert deliver(core, bytes(data)) == ["bad_version"]
    data[0:4] = b"XXXX"
    assert deliver(core, bytes(data)) == ["bad_magic"]


def test_unsigned(pair: Pair) -> None:
    core, n2 = pair
    data = genuine(n2)
    # The signature stripped: the lengths no longer add up.
    assert deliver(core, data[: -wire.SIGNATURE_LEN]) == ["truncated"]
    # A zeroed signature: structurally fine, cryptographically not.
    assert deliver(core, data[: -wire.SIGNATURE_LEN] + b"\0" * 64) == ["bad_signature"]


def test_wrongly_signed_with_a_forged_key_id(pair: Pair) -> None:
    core, n2 = pair
    attacker = Ed25519PrivateKey.generate()
    # Signed by the attacker but claiming n2's key id.
    data = wire.encode(heartbeat(config_digest=n2.config.digest), attacker, n2.public_key)
    assert deliver(core, data) == ["bad_signature"]
    # Signed by the attacker with its own key id: not one of n2's keys.
    data = wire.encode(
        heartbeat(config_digest=n2.config.digest), attacker, public_key_bytes(attacker)
    )
    assert deliver(core, data) == ["unknown_key"]
    assert core.peers["n2"].state.value == "unknown"


def test_tampered_body(pair: Pair) -> None:
    core, n2 = pair
    data = bytearray(genuine(n2))
    data[-wire.SIGNATURE_LEN - 1] ^= 0x01  # flip a bit of the held bitmap
    assert deliver(core, bytes(data)) == ["bad_signature"]


def test_unknown_sender_wrong_cluster_own_name(pair: Pair) -> None:
    core, n2 = pair
    stranger = wire.encode(heartbeat(sender="mallory"), KEY, PUB)
    assert deliver(core, stranger) == ["unknown_sender"]
    other = wire.encode(heartbeat(cluster="other"), n2.key, n2.public_key)
    assert deliver(core, other) == ["wrong_cluster"]
    me = wire.encode(heartbeat(sender="n1"), n2.key, n2.public_key)
    assert deliver(core, me) == ["own_name"]


def test_replay_is_rejected_by_incarnation_and_seq(pair: Pair) -> None:
    core, n2 = pair
    first, second = genuine(n2, seq=1), genuine(n2, seq=2)
    assert deliver(core, first) == []
    assert deliver(core, second) == []
    # One copy of a recent datagram is the network duplicating it; the next is a replay.
    assert deliver(core, first) == ["duplicate"]  # older seq
    assert deliver(core, first) == ["replay"]
    assert deliver(core, second) == ["duplicate"]  # same seq
    assert deliver(core, second) == ["replay"]
    assert deliver(core, genuine(n2, seq=2, send_time_ms=int(WALL0 * 1000) + 1)) == ["replay"]
    restarted = genuine(n2, seq=1, incarnation=8)
    assert deliver(core, restarted) == []  # a higher incarnation resets seq
    assert deliver(core, genuine(n2, seq=99, incarnation=7)) == ["replay"]  # old incarnation
    assert core.rejected["replay"] == 4 and core.rejected["duplicate"] == 2


def test_stale_send_time(pair: Pair) -> None:
    core, n2 = pair
    old = genuine(n2, send_time_ms=int((WALL0 - 3600) * 1000))
    assert deliver(core, old) == ["stale"]


def test_malformed_body_after_a_valid_signature(pair: Pair) -> None:
    core, n2 = pair
    good = wire.parse_envelope(genuine(n2))
    # Rebuild with a TLV that overruns the body, correctly signed: still refused.
    body = good.body + struct.pack("!BH", 9, 50)
    header = bytearray(good.signed[: wire.HEADER_LEN])
    struct.pack_into("!H", header, 38, len(body))
    signed = bytes(header) + good.signed[wire.HEADER_LEN : wire.HEADER_LEN + 5] + body
    data = signed + n2.key.sign(wire.DOMAIN + signed)
    assert deliver(core, data) == ["malformed"]
