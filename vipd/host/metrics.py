"""Prometheus metrics, served on 127.0.0.1 by default.

The exporter runs in prometheus_client's own HTTP thread. It never touches the daemon's live
state: the event loop publishes a snapshot (a `vipd.node.status.Status`, the tree `vipctl status`
shows) and a scrape renders the latest one, so a slow scraper cannot stall heartbeats.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from vipd.node.status import Status

#: status counter name -> (metric name without _total, help)
COUNTERS = {
    "rx_accepted": ("vipd_heartbeats_received", "Valid heartbeats received from peers."),
    "tx_heartbeats": ("vipd_heartbeats_sent", "Heartbeats sent."),
    "tx_errors": ("vipd_send_errors", "Heartbeat sends that failed (per destination)."),
    "claims": ("vipd_address_claims", "Addresses added to the kernel."),
    "claim_errors": ("vipd_address_claim_errors", "Address claims the kernel refused."),
    "releases": ("vipd_address_releases", "Addresses removed from the kernel."),
    "drift_repairs": ("vipd_drift_repairs", "Kernel address tables found changed by others."),
    "reannouncements": ("vipd_reannouncements", "Groups announced again (overlap seen)."),
    "members_lost": ("vipd_members_lost", "Peers lost after dead_after without a heartbeat."),
    "loop_stalls": ("vipd_loop_stalls", "Times this daemon's own event loop ran late."),
    "config_mismatch": ("vipd_config_mismatches", "Peers seen with a different config digest."),
    "self_disruptions": ("vipd_self_disruptions", "Times this node was cut off (flaps)."),
    "holddowns": ("vipd_holddowns", "Times this node held itself out of placement."),
    "conflicts": ("vipd_address_conflicts", "Frames from another MAC claiming an owned address."),
    "defences": ("vipd_address_defences", "Owned addresses announced again after a conflict."),
    "refreshes": ("vipd_announce_refreshes", "Addresses announced by the periodic refresh."),
    "notify_sent": ("vipd_notify_frames", "Directed frames sent to the notify list."),
    "notify_dropped": ("vipd_notify_dropped", "Notify frames dropped (queue full)."),
    "task_failures": ("vipd_task_failures", "Internal tasks that failed and were restarted."),
    "overrides_refused": (
        "vipd_overrides_refused",
        "Operator tables refused: issuer not in the roster, bad signature, version jump.",
    ),
    "duplicate_nodes": (
        "vipd_duplicate_nodes",
        "Other instances seen running under this node's name and key (a cloned machine).",
    ),
}


class StatusCollector(Collector):
    def __init__(self) -> None:
        self._status: Status | None = None

    def publish(self, status: Status) -> None:
        self._status = status  # one reference swap: the scrape thread sees old or new

    def collect(self) -> Iterator[Metric]:
        s = self._status
        if s is None:
            return
        counters = s.counters
        for key, (name, text) in COUNTERS.items():
            yield CounterMetricFamily(name, text, value=counters.value(key))
        hooks = CounterMetricFamily(
            "vipd_hooks", "Hook runs, by outcome (run counts every attempt).", labels=["outcome"]
        )
        for outcome, n in sorted(counters.hooks.items()):
            hooks.add_metric([outcome], n)
        yield hooks
        rejected = CounterMetricFamily(
            "vipd_datagrams_rejected", "Datagrams refused, by reason.", labels=["reason"]
        )
        for reason, count in sorted(counters.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected

        for name, text, value in (
            ("vipd_ready", "1 once the startup wait is over.", s.ready),
            ("vipd_mature", "1 once the node may take addresses.", s.mature),
            ("vipd_leaving", "1 during a graceful stop.", s.leaving),
            ("vipd_config_passive", "1 if another config digest wins.", s.passive),
            ("vipd_holddown", "1 while held out of placement.", s.holddown),
            (
                "vipd_duplicate",
                "1 while another instance of this node is heard (this one holds nothing).",
                "duplicate" in s.members[0].flags if s.members else False,  # [0]: this node
            ),
            ("vipd_view_members", "Members in this node's placement view.", len(s.view.members)),
            ("vipd_incarnation", "This daemon's incarnation.", s.incarnation),
        ):
            yield GaugeMetricFamily(name, text, value=float(value))

        up = GaugeMetricFamily(
            "vipd_member_up", "1 if the member is heard (joining or alive).", labels=["member"]
        )
        age = GaugeMetricFamily(
            "vipd_member_last_heard_seconds",
            "Seconds since the last valid heartbeat.",
            labels=["member"],
        )
        config_ok = GaugeMetricFamily(
            "vipd_member_config_match",
            "1 if the member's config digest equals ours.",
            labels=["member"],
        )
        for m in s.members:
            up.add_metric([m.name], 1.0 if m.state in ("self", "alive", "joining") else 0.0)
            if m.age is not None:
                age.add_metric([m.name], m.age)
            config_ok.add_metric([m.name], 1.0 if m.config_digest_ok else 0.0)
        yield from (up, age, config_ok)

        held = GaugeMetricFamily(
            "vipd_group_held", "1 if this node holds every address of the group.", labels=["group"]
        )
        for g in s.pool:
            held.add_metric([g.group], 1.0 if g.held_here else 0.0)
        yield held
        frames = CounterMetricFamily(
            "vipd_announce_frames",
            "Gratuitous ARP / NA frames sent, by address.",
            labels=["address"],
        )
        for address, count in sorted(s.announcements.items()):
            frames.add_metric([address], count)
        yield frames


def serve(listen: str, collector: StatusCollector) -> Any:
    """Start the exporter on "host:port"; returns the HTTP server (call .shutdown())."""
    host, _, port = listen.rpartition(":")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    return server
