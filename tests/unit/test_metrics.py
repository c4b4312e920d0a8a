"""The Prometheus exporter renders the daemon's status snapshot."""

from __future__ import annotations

import urllib.request

from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from vipd.host.metrics import StatusCollector, serve

STATUS = {
    "node": "n1",
    "incarnation": 42,
    "ready": True,
    "mature": True,
    "leaving": False,
    "passive": False,
    "holddown": False,
    "view": {"digest": "ab", "members": ["n1", "n2"]},
    "members": [
        {"name": "n1", "state": "self", "age": 0.0, "config_digest_ok": True},
        {"name": "n2", "state": "alive", "age": 0.05, "config_digest_ok": True},
        {"name": "n3", "state": "dead", "age": 9.5, "config_digest_ok": False},
    ],
    "pool": [{"group": "www1", "held_here": True}, {"group": "www2", "held_here": False}],
    "counters": {
        "rx_accepted": 7,
        "claims": 1,
        "conflicts": 2,
        "defences": 1,
        "rejected": {"bad_signature": 3, "replay": 0},
        "hooks": {"run": 4, "failed": 1, "timed_out": 0, "dropped": 0},
    },
    "announcements": {"203.0.113.11/32": 10},
}


def render(status: dict[str, object] | None) -> str:
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
    ):
        assert line in text, line


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
