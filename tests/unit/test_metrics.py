"""The Prometheus exporter renders the daemon's status snapshot."""

from __future__ import annotations

import urllib.request

from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from vipd.host.metrics import StatusCollector, serve
from vipd.node.status import (
    CounterStatus,
    GroupStatus,
    MemberStatus,
    OverridesStatus,
    Status,
    ViewStatus,
)


def member(name: str, state: str, age: float | None, config_ok: bool = True) -> MemberStatus:
    return MemberStatus(
        name=name,
        state=state,
        age=age,
        incarnation=1,
        flags=("ready",),
        config_digest_ok=config_ok,
        pool_digest="00",
        drained=False,
    )


def group(name: str, held_here: bool) -> GroupStatus:
    return GroupStatus(
        group=name,
        interface="eth0",
        addresses=("203.0.113.11/32",),
        owner="n1",
        held_here=held_here,
        override=None,
        prefer=(),
    )


STATUS = Status(
    node="n1",
    cluster="c",
    incarnation=42,
    ready=True,
    mature=True,
    leaving=False,
    passive=False,
    holddown=False,
    holding="",
    config_digest="cd",
    view=ViewStatus(digest="ab", members=("n1", "n2")),
    members=(
        member("n1", "self", 0.0),
        member("n2", "alive", 0.05),
        member("n3", "dead", 9.5, config_ok=False),
        member("n4", "unknown", None),
    ),
    pool=(group("www1", True), group("www2", False)),
    overrides=OverridesStatus(version=0, issuer="", moves=(), drained=()),
    counters=CounterStatus(
        plain={"rx_accepted": 7, "claims": 1, "conflicts": 2, "defences": 1, "task_failures": 1},
        rejected={"bad_signature": 3, "replay": 0},
        hooks={"run": 4, "failed": 1, "timed_out": 0, "dropped": 0},
        notify_sent=5,
        notify_dropped=0,
    ),
    announcements={"203.0.113.11/32": 10},
)


def render(status: Status | None) -> str:
    collector = StatusCollector()
    if status is not None:
        collector.publish(status)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry).decode()


def test_snapshot_becomes_metrics() -> None:
    text = render(STATUS)
    for line in (
        "vipd_heartbeats_received_total 7.0",
        "vipd_address_claims_total 1.0",
        "vipd_members_lost_total 0.0",
        'vipd_datagrams_rejected_total{reason="bad_signature"} 3.0',
        'vipd_member_up{member="n2"} 1.0',
        'vipd_member_up{member="n3"} 0.0',
        'vipd_member_config_match{member="n3"} 0.0',
        'vipd_group_held{group="www1"} 1.0',
        'vipd_group_held{group="www2"} 0.0',
        "vipd_view_members 2.0",
        'vipd_announce_frames_total{address="203.0.113.11/32"} 10.0',
        "vipd_config_passive 0.0",
        "vipd_address_conflicts_total 2.0",
        "vipd_address_defences_total 1.0",
        'vipd_hooks_total{outcome="failed"} 1.0',
        'vipd_hooks_total{outcome="run"} 4.0',
        "vipd_notify_frames_total 5.0",
        "vipd_notify_dropped_total 0.0",
        "vipd_task_failures_total 1.0",
        "vipd_overrides_refused_total 0.0",
        "vipd_duplicate_nodes_total 0.0",
        "vipd_duplicate 0.0",
        'vipd_member_last_heard_seconds{member="n2"} 0.05',
        'vipd_member_up{member="n4"} 0.0',
    ):
        assert line in text, line
    assert 'vipd_member_last_heard_seconds{member="n4"}' not in text  # never heard


def test_nothing_before_the_first_snapshot() -> None:
    assert "vipd_" not in render(None)


def test_http_exporter_on_loopback() -> None:
    collector = StatusCollector()
    collector.publish(STATUS)
    server = serve("127.0.0.1:0", collector)
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            body = reply.read().decode()
        assert "vipd_heartbeats_received_total 7.0" in body
    finally:
        server.shutdown()
