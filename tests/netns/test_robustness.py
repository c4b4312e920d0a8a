"""What an operator will do to a running daemon, on the real kernel: delete an address by
hand, configure an interface that does not exist, read the status."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.netns.conftest import running
from vipd.config import load_config
from vipd.lab.cluster import LabCluster
from vipd.lab.topology import Lab

pytestmark = pytest.mark.netns


def test_address_deleted_by_hand_is_restored(cluster: LabCluster) -> None:
    owners = cluster.wait_converged()
    vip, holder = sorted(owners.items())[0]
    repairs = cluster.status(holder)["counters"].get("drift_repairs", 0)  # absent until one
    cluster.lab.exec(holder, ["ip", "addr", "del", f"{vip}/32", "dev", "eth0"])
    # No check that the address is gone: the netlink event makes the daemon put it back
    # within about a millisecond, before a second `ip` could look. The repair counter and
    # the log line show that the deletion happened and was repaired.
    interval = load_config(cluster.config_path(holder)).timing.reconcile_interval
    cluster.wait_for(
        lambda: (
            vip in cluster.lab.addresses(holder)
            and cluster.status(holder)["counters"].get("drift_repairs", 0) > repairs
        ),
        interval + 2.0,
        f"{holder} to restore {vip} within one reconcile interval",
        nodes=[holder],
    )
    assert cluster.wait_converged() == owners  # repaired in place: nothing else moved
    log = cluster.log_path(holder).read_text()
    assert any("drift" in line and f"{vip}/32" in line for line in log.splitlines())


@pytest.fixture
def ghost_cluster(lab: Lab, request: pytest.FixtureRequest) -> Iterator[LabCluster]:
    """Group www6 is configured on an interface that exists on no node."""
    c = LabCluster(lab)
    for node in c.nodes:
        path = c.config_path(node)
        text = path.read_text()
        block = '[[pool]]\nname = "www6"\ninterface = "eth0"'
        assert block in text
        path.write_text(text.replace(block, '[[pool]]\nname = "www6"\ninterface = "ghost0"'))
    with running(c, request, converge=False) as started:
        yield started


def test_missing_pool_interface_is_reported_and_the_rest_is_served(
    ghost_cluster: LabCluster,
) -> None:
    c = ghost_cluster
    served = [v for v in c.vips if v != "203.0.113.16"]

    def everything_else_held() -> bool:
        own = c.ownership()
        return all(len(own.get(v, [])) == 1 for v in served)

    c.wait_for(everything_else_held, 15.0, "the other groups to have one holder each")
    owner = c.status(c.nodes[0])["pool"][5]["owner"]
    assert owner in c.nodes

    def reported() -> bool:
        return bool(c.status(owner)["counters"].get("claim_errors", 0) >= 1)

    c.wait_for(reported, 10.0, f"{owner} to count the failed claim", nodes=[owner])
    log = c.log_path(owner).read_text()
    assert "claim_failed" in log and "ghost0" in log, c.log_tail(owner)
    for node in c.nodes:
        assert c.running(node), f"{node} died over a missing interface"
    assert "203.0.113.16" not in set().union(*c.holdings().values())


def test_vipctl_status_against_a_live_daemon(cluster: LabCluster) -> None:
    owners = cluster.wait_converged(balanced=True)
    sock = str(cluster.socket_path("n1"))
    vipctl = [sys.executable, "-m", "vipd.vipctl", "--socket", sock, "status"]
    text = subprocess.run(vipctl, capture_output=True, text=True, check=True).stdout
    assert "node n1  cluster" in text and "ready" in text
    for node in cluster.nodes:
        assert f"\n{node} " in text  # one row per member
    for vip, owner in owners.items():
        row = next(line for line in text.splitlines() if f"{vip}/32" in line)
        assert f" {owner} " in row, row
    parsed = json.loads(
        subprocess.run([*vipctl, "--json"], capture_output=True, text=True, check=True).stdout
    )
    assert {g["group"]: g["owner"] for g in parsed["pool"]} == {
        entry["group"]: entry["owner"] for entry in cluster.status("n1")["pool"]
    }
    missing = subprocess.run(
        [sys.executable, "-m", "vipd.vipctl", "--socket", "/nonexistent/s", "status"],
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0
    assert "no control socket at /nonexistent/s: is vipd running?" in missing.stderr


def test_sighup_reloads_and_a_refused_reload_keeps_the_daemon_running(
    cluster: LabCluster,
) -> None:
    owners = cluster.wait_converged(balanced=True)
    cluster.send_signal("n2", signal.SIGHUP)  # nothing changed: a reload of nothing
    cluster.wait_for(
        lambda: "reloaded" in cluster.log_path("n2").read_text(),
        5.0,
        "n2 to log its reload",
        nodes=["n2"],
    )
    config = cluster.config_path("n2")
    config.write_text(config.read_text().replace('profile = "lan"', 'profile = "fast"'))
    cluster.send_signal("n2", signal.SIGHUP)  # a change that needs a restart: refused
    cluster.wait_for(
        lambda: "reload_failed" in cluster.log_path("n2").read_text(),
        5.0,
        "n2 to log that the reload was refused",
        nodes=["n2"],
    )
    assert "timing" in cluster.log_path("n2").read_text().split("reload_failed", 1)[1]
    assert cluster.running("n2")
    assert cluster.wait_converged() == owners


def test_metrics_are_served_on_loopback_inside_the_node(cluster: LabCluster) -> None:
    cluster.wait_converged(balanced=True)
    held = cluster.holdings()["n1"]

    def scrape() -> str:
        with cluster.lab.socket("n1", socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(("127.0.0.1", 9477))
            sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def held_in(text: str) -> int:
        lines = text.splitlines()
        return sum(1 for x in lines if x.startswith("vipd_group_held{") and x.endswith(" 1.0"))

    def converged_snapshot() -> str | None:
        text = scrape()
        return text if "vipd_view_members 3.0" in text and held_in(text) == len(held) else None

    # The snapshot is published once a second: one taken after the view agreed may still
    # predate the claims (they follow a few ms later). Wait for one taken after both.
    text = cluster.wait_for(converged_snapshot, 5.0, "a snapshot of the converged view")
    assert "vipd_heartbeats_received_total" in text
    assert held_in(text) == len(held) == 2
