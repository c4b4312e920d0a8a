"""Source filtering (cluster.accept_from) and the per-source rejection budget, in the core:
both happen before a datagram is parsed, and every datagram is counted under one reason."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path

import pytest

from tests.clusterkit import WALL0, Node, config_dict, make_cluster
from tests.unit.test_wire import genuine
from vipd.config import ConfigError, parse_config
from vipd.membership import admission
from vipd.membership.core import MembershipCore

PEER = "198.51.100.12"
OUTSIDER = "192.0.2.66"  # TEST-NET-1: only ever a source string here, never sent to


def core_accepting(nodes: dict[str, Node], networks: list[str] | None) -> MembershipCore:
    accept = None if networks is None else tuple(ipaddress.ip_network(n) for n in networks)
    n1 = nodes["n1"]
    return Node(replace(n1.config, accept_from=accept), n1.key).core()


def counted(core: MembershipCore) -> int:
    return sum(core.rejected.values()) + core.counters["rx_accepted"]


def test_a_source_outside_accept_from_is_dropped_before_parsing() -> None:
    nodes = make_cluster(2)
    core = core_accepting(nodes, ["198.51.100.0/24", "2001:db8::/32"])
    good = genuine(nodes["n2"], seq=1)
    core.receive(good, OUTSIDER, now=1.0, wall=WALL0)
    core.receive(b"junk", OUTSIDER, now=1.0, wall=WALL0)  # not even looked at: no "truncated"
    assert core.rejected["source_not_allowed"] == 2 and core.rejected["truncated"] == 0
    assert core.counters["rx_accepted"] == 0
    core.receive(good, PEER, now=1.0, wall=WALL0)
    core.receive(genuine(nodes["n2"], seq=2), "2001:db8::12", now=1.0, wall=WALL0)
    assert core.counters["rx_accepted"] == 2


def test_a_junk_flood_costs_a_lookup_per_datagram_once_its_budget_is_spent() -> None:
    nodes = make_cluster(2)
    core = core_accepting(nodes, None)
    n = 10_000
    for i in range(n):  # 10,000 datagrams within one second from one source
        core.receive(b"VIPD" + bytes(200), OUTSIDER, now=1.0 + i / n, wall=WALL0)
        if i == n // 2:  # a genuine peer, from its own address, gets through mid-flood
            core.receive(genuine(nodes["n2"], seq=1), PEER, now=1.5, wall=WALL0)
    assert core.counters["rx_accepted"] == 1
    parsed = core.rejected["bad_version"]
    # The burst, then the refill over the second: everything else dropped unread.
    assert admission.REJECT_BURST <= parsed <= admission.REJECT_BURST + admission.REJECT_RATE + 1
    assert core.rejected["rate_limited"] == n - parsed
    assert counted(core) == n + 1
    # One event per dry spell, not one per dropped datagram.
    reasons = []
    while (e := core.next_event()) is not None:
        reasons.append(getattr(e, "reason", None))
    assert reasons.count("rate_limited") == 1
    # Two seconds later the bucket has refilled: the source is parsed again.
    core.receive(b"VIPD" + bytes(200), OUTSIDER, now=3.0, wall=WALL0)
    assert core.rejected["bad_version"] == parsed + 1


def test_a_genuine_peer_is_never_charged() -> None:
    nodes = make_cluster(2)
    core = core_accepting(nodes, None)
    for seq in range(1, 1001):  # far past the burst, all at one instant
        core.receive(genuine(nodes["n2"], seq=seq), PEER, now=1.0, wall=WALL0)
    assert core.counters["rx_accepted"] == 1000 and core.rejected["rate_limited"] == 0


def test_spoofed_sources_cannot_grow_the_budget_table_without_bound() -> None:
    gate = admission.Admission(None)
    for i in range(3 * admission.MAX_SOURCES):
        gate.charge(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", now=1.0)
    assert len(gate._buckets) <= admission.MAX_SOURCES


def test_accept_from_config() -> None:
    keys = make_cluster(2)
    raw = {n: x.key for n, x in keys.items()}
    data = config_dict("n1", raw, 3)
    data["cluster"]["accept_from"] = ["198.51.100.0/24", "2001:db8::/32"]
    config = parse_config(data, Path("t.toml"))
    assert config.accept_from == (
        ipaddress.ip_network("198.51.100.0/24"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    data["cluster"]["accept_from"] = ["198.51.100.1/24"]  # host bits set: a typo, say so
    with pytest.raises(ConfigError, match=r"cluster\.accept_from\[0\]"):
        parse_config(data, Path("t.toml"))
    data["cluster"]["accept_from"] = "198.51.100.0/24"
    with pytest.raises(ConfigError, match="not a non-empty list"):
        parse_config(data, Path("t.toml"))
    # Unicast: by default only the roster's addresses may talk to us.
    data = config_dict("n1", raw, 3)
    data["cluster"]["transport"] = "unicast"
    for i, entry in enumerate(data["roster"]):
        entry["address"] = f"198.51.100.{11 + i}"
    config = parse_config(data, Path("t.toml"))
    assert config.accept_from == (
        ipaddress.ip_network("198.51.100.11/32"),
        ipaddress.ip_network("198.51.100.12/32"),
    )


def test_a_network_that_duplicates_every_frame_costs_a_genuine_peer_nothing() -> None:
    """Issue 11 item 11: duplicated frames (a bridge loop, a bonding mix-up) are copies of
    genuine datagrams, not attacks. Under the `fast` rate (about 67 heartbeats a second) with
    every frame delivered twice, half the copies late, the peer is never rate-limited, every
    original is accepted, and the copies are counted as duplicates, not charged as replays."""
    nodes = make_cluster(2)
    core = core_accepting(nodes, None)
    interval, originals = 0.015, 700  # about 10 s
    late: bytes | None = None
    for seq in range(1, originals + 1):
        now = 1.0 + seq * interval
        data = genuine(nodes["n2"], seq=seq)
        core.receive(data, PEER, now=now, wall=WALL0)
        if late is not None:  # last one's copy, arriving after this one (reordered)
            core.receive(late, PEER, now=now, wall=WALL0)
            late = None
        if seq % 2:
            core.receive(data, PEER, now=now, wall=WALL0)
        else:
            late = data
    assert core.counters["rx_accepted"] == originals
    assert core.rejected["rate_limited"] == 0
    assert core.rejected["duplicate"] == originals - 1 and core.rejected["replay"] == 0
    assert counted(core) == 2 * originals - 1


def test_a_copy_sent_again_and_again_is_a_replay_and_is_charged() -> None:
    """A copy is free once: the same datagram resent more often (an attacker replaying the
    peer's latest heartbeat from its address) is a replay, charged like any rejection."""
    nodes = make_cluster(2)
    core = core_accepting(nodes, None)
    data = genuine(nodes["n2"], seq=1)
    for i in range(3 * int(admission.REJECT_BURST)):
        core.receive(data, PEER, now=1.0 + i / 10_000, wall=WALL0)
    assert core.counters["rx_accepted"] == 1 and core.rejected["duplicate"] == 1
    assert core.rejected["replay"] >= admission.REJECT_BURST
    assert core.rejected["rate_limited"] > 0
    # An old capture (not one of the last few datagrams) is a replay even the first time.
    old = genuine(nodes["n2"], seq=2)
    for seq in range(3, 40):
        core.receive(genuine(nodes["n2"], seq=seq), "198.51.100.13", now=5.0, wall=WALL0)
    core.receive(old, "198.51.100.13", now=5.0, wall=WALL0)
    assert core.rejected["duplicate"] == 1
