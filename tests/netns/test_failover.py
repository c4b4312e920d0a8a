"""Failover on a real kernel: three vipd daemons in namespaces, a client probing the pool.

Ownership is always read from the kernel's address tables in each node namespace, and what
the client sees (gratuitous ARP / NA frames, its neighbour table, ICMP replies) is checked
from the client namespace. Measured outages are printed (run with -s to see them) and
attached to the report as properties.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest

from vipd.config import Timing, load_config
from vipd.lab.arpwatch import announcements, load_events
from vipd.lab.cluster import Background, LabCluster
from vipd.lab.probe import last_success, load_records, lost, outage

pytestmark = pytest.mark.netns

RecordProperty = Callable[[str, object], None]
LEAVE_WAIT = 10.0  # s: a graceful stop waits for peers (bounded by the handover timeout)


def timing(cluster: LabCluster) -> Timing:
    return load_config(cluster.config_path(cluster.nodes[0])).timing


def most_loaded(cluster: LabCluster) -> str:
    held = cluster.holdings()
    return max(sorted(held), key=lambda n: len(held[n]))


def client_follows(cluster: LabCluster, owners: dict[str, str]) -> bool:
    """The client's neighbour entry for every address names its holder's MAC."""
    macs = {n: cluster.lab.mac(n) for n in set(owners.values())}
    return all(cluster.lab.client_neigh(v) == macs[o] for v, o in owners.items())


def report(record_property: RecordProperty, name: str, values: dict[str, float]) -> None:
    text = ", ".join(f"{v}={ms * 1000:.0f}ms" for v, ms in sorted(values.items()))
    print(f"\n{name}: {text}")
    record_property(name, text)


def stop_probe(cluster: LabCluster, probe: Background, targets: list[str], after: float) -> None:
    """Let every target answer once more after `after`, then stop the prober."""

    def answered_again() -> bool:
        records = load_records(probe.path)
        return all((last_success(records, v) or 0.0) > after for v in targets)

    cluster.wait_for(answered_again, 10.0, f"probes to {targets} to succeed again")
    probe.stop()


def test_every_address_has_one_holder_and_daemons_agree(cluster: LabCluster) -> None:
    owners = cluster.wait_converged(balanced=True)
    held = cluster.holdings()
    assert sorted(len(h) for h in held.values()) == [2, 2, 2], held
    for node in cluster.nodes:
        status = cluster.status(node)
        assert status["ready"], f"{node} is not ready: {status}"
        assert sorted(status["view"]["members"]) == sorted(cluster.nodes), status["view"]
        assert cluster.status_owners(node) == owners, f"{node}'s view of the pool"
        for entry in status["pool"]:
            here = {a.split("/")[0] for a in entry["addresses"]} <= held[node]
            assert entry["held_here"] == here, f"{node}: held_here wrong for {entry}"
    # Every daemon reports the same view digest: they act on one agreed view.
    digests = {cluster.status(n)["view"]["digest"] for n in cluster.nodes}
    assert len(digests) == 1, digests


@pytest.mark.lab(ipv6=True)
def test_cut_link_moves_addresses_and_client_follows(
    cluster: LabCluster, record_property: RecordProperty
) -> None:
    lab = cluster.lab
    before = cluster.wait_converged()
    arp = cluster.start_arpwatch()
    probe = cluster.start_probe()
    # Cut the holder of the IPv6 group so both GARP and unsolicited NA are exercised.
    victim = before["2001:db8:1::17"]
    moved = sorted(v for v, o in before.items() if o == victim)
    survivors = [n for n in cluster.nodes if n != victim]

    t_cut = time.monotonic()
    lab.cut_link(victim)
    after = cluster.wait_converged(survivors, timeout=10.0)
    t_moved = time.monotonic()

    # Only the victim's addresses move (minimal movement, I6).
    for v, o in before.items():
        if o != victim:
            assert after[v] == o, f"{v} moved from live {o} to {after[v]}"
    new_macs = {v: lab.mac(after[v]) for v in moved}

    def announced() -> bool:
        events = load_events(arp.path)
        return all(announcements(events, v, since=t_cut, mac=new_macs[v]) for v in moved)

    cluster.wait_for(
        announced,
        5.0,
        f"gratuitous ARP/NA for {moved} from their new holders",
        last=lambda: [e for e in load_events(arp.path) if e["t"] >= t_cut],
    )
    cluster.wait_for(
        lambda: client_follows(cluster, after),
        5.0,
        "the client's neighbour entries to name the new holders",
        last=lambda: {v: lab.client_neigh(v) for v in after},
    )
    stop_probe(cluster, probe, moved, after=t_moved)
    arp.stop()

    records = load_records(probe.path)
    end = max(r["t"] for r in records)
    outages = {v: outage(records, v, t_cut, end) for v in cluster.vips}
    report(record_property, "link_cut_outage", {v: outages[v] for v in moved})
    t = timing(cluster)
    for v in moved:
        # Detection (dead_after) + agreement + claim + announce; the client's 10 ms probes
        # see all of it. Generous bound for a loaded 2-core machine.
        assert outages[v] < t.dead_after + 1.5, f"{v}: outage {outages[v]:.3f}s"
    for v in cluster.vips:
        if v not in moved:
            assert outages[v] < 0.3, f"{v} was not moved but saw a {outages[v]:.3f}s outage"


def test_sigkill_handover_and_stale_copies_removed_on_restart(
    cluster: LabCluster, record_property: RecordProperty
) -> None:
    lab = cluster.lab
    before = cluster.wait_converged()
    probe = cluster.start_probe()
    victim = most_loaded(cluster)
    moved = sorted(v for v, o in before.items() if o == victim)
    survivors = [n for n in cluster.nodes if n != victim]

    t_kill = time.monotonic()
    cluster.stop(victim, signal.SIGKILL)
    taken = cluster.wait_converged(survivors, timeout=10.0)
    t_taken = time.monotonic()
    # Nothing removed the dead daemon's addresses: the host still has them. That is the
    # situation the restart must clean up.
    stale = lab.addresses(victim) & set(moved)
    assert stale == set(moved), f"precondition: {victim} should still hold {moved}, has {stale}"
    cluster.wait_for(
        lambda: client_follows(cluster, taken),
        5.0,
        "the client to follow the survivors' announcements",
        last=lambda: {v: lab.client_neigh(v) for v in taken},
    )
    report(record_property, "sigkill_takeover", {"detect+claim": t_taken - t_kill})

    cluster.start(victim)
    final = cluster.wait_converged(timeout=15.0, balanced=True)
    # The restarted node holds exactly what the agreed view gives it; stale copies are gone.
    assert lab.addresses(victim) & set(cluster.vips) == {v for v, o in final.items() if o == victim}
    for node in cluster.nodes:
        assert cluster.status_owners(node) == final, f"{node} disagrees with the kernel"
    cluster.wait_for(
        lambda: client_follows(cluster, final),
        5.0,
        "the client to follow the final holders",
        last=lambda: {v: lab.client_neigh(v) for v in final},
    )
    stop_probe(cluster, probe, cluster.vips, after=time.monotonic())
    records = load_records(probe.path)
    outages = {v: outage(records, v, t_kill, max(r["t"] for r in records)) for v in moved}
    report(record_property, "sigkill_outage", outages)


def test_sigterm_hands_over_without_loss(
    cluster: LabCluster, record_property: RecordProperty
) -> None:
    lab = cluster.lab
    t = timing(cluster)
    before = cluster.wait_converged()
    arp = cluster.start_arpwatch()
    probe = cluster.start_probe()
    victim = most_loaded(cluster)
    moved = sorted(v for v, o in before.items() if o == victim)
    survivors = [n for n in cluster.nodes if n != victim]

    t_term = time.monotonic()
    cluster.send_signal(victim, signal.SIGTERM)
    after = cluster.wait_converged(survivors, timeout=LEAVE_WAIT)
    cluster.wait_for(
        lambda: not cluster.running(victim),
        LEAVE_WAIT,
        f"vipd on {victim} to exit after SIGTERM",
        nodes=[victim],
    )
    assert not lab.addresses(victim) & set(cluster.vips), f"{victim} left addresses behind"
    new_macs = {v: lab.mac(after[v]) for v in moved}

    def first_announcements() -> dict[str, float] | None:
        events = load_events(arp.path)
        found = {v: announcements(events, v, since=t_term, mac=new_macs[v]) for v in moved}
        return {v: a[0]["t"] - t_term for v, a in found.items()} if all(found.values()) else None

    handover = cluster.wait_for(first_announcements, 5.0, f"announcements of {moved}")
    report(record_property, "sigterm_handover", handover)
    # A graceful leave is announced, not detected: the peers must act on the LEAVING
    # heartbeat, far sooner than dead_after.
    bound = 4 * t.heartbeat_interval
    slow = {v: h for v, h in handover.items() if h > bound}
    assert not slow, f"handover slower than {bound:.2f}s (dead_after {t.dead_after}s): {slow}"

    cluster.wait_for(lambda: client_follows(cluster, after), 5.0, "the client to follow")
    stop_probe(cluster, probe, moved, after=time.monotonic())
    arp.stop()
    records = load_records(probe.path)
    end = max(r["t"] for r in records)
    losses = {v: lost(records, v, t_term, end) for v in cluster.vips}
    report(record_property, "sigterm_outage", {v: outage(records, v, t_term, end) for v in moved})
    assert not any(losses.values()), f"probes lost during a graceful handover (I2): {losses}"


def test_restarted_node_rejoins_and_pool_rebalances(
    cluster: LabCluster, record_property: RecordProperty
) -> None:
    victim = "n2"
    others = [n for n in cluster.nodes if n != victim]
    cluster.stop(victim, signal.SIGTERM)
    cluster.wait_converged(others, timeout=10.0, balanced=True)
    assert all(len(h) == 3 for h in cluster.holdings(others).values()), cluster.holdings()

    probe = cluster.start_probe()
    t_start = time.monotonic()
    cluster.start(victim)
    final = cluster.wait_converged(timeout=15.0, balanced=True)
    t_balanced = time.monotonic()
    held = cluster.holdings()
    assert {n: len(h) for n, h in held.items()} == {n: 2 for n in cluster.nodes}, held
    for node in cluster.nodes:
        status = cluster.status(node)
        assert sorted(status["view"]["members"]) == sorted(cluster.nodes), (node, status["view"])
        assert cluster.status_owners(node) == final
    cluster.wait_for(lambda: client_follows(cluster, final), 5.0, "the client to follow")
    stop_probe(cluster, probe, cluster.vips, after=time.monotonic())
    records = load_records(probe.path)
    end = max(r["t"] for r in records)
    report(record_property, "rejoin_rebalance", {"start->balanced": t_balanced - t_start})
    # Moving addresses to a joining node is a planned change: make-before-break (I2).
    losses = {v: lost(records, v, t_start, end) for v in cluster.vips}
    assert not any(losses.values()), f"probes lost while rebalancing onto {victim}: {losses}"


def test_partition_heal_leaves_one_holder_that_reannounces(
    cluster: LabCluster, record_property: RecordProperty
) -> None:
    """A blocked switch port (carrier up: the node cannot tell) isolates n1; after the heal
    exactly one holder per address remains, the assignment is the pre-partition one (same
    members, same placement) and the client is told where every address lives."""
    lab = cluster.lab
    t = timing(cluster)
    before = cluster.wait_converged(balanced=True)
    victim = "n1"
    survivors = [n for n in cluster.nodes if n != victim]
    lab.block_port(victim)
    cluster.wait_converged(survivors, timeout=10.0)
    # The isolated side acts on its own view too (what it does is the partition policy).
    cluster.wait_for(
        lambda: all(
            m["state"] == "dead" for m in cluster.status(victim)["members"] if m["name"] != victim
        ),
        10.0,
        f"{victim} to declare its unreachable peers dead",
    )

    arp = cluster.start_arpwatch()
    probe = cluster.start_probe()
    t_heal = time.monotonic()
    lab.unblock_port(victim)
    final = cluster.wait_converged(timeout=10.0, balanced=True)
    t_done = time.monotonic()
    assert final == before, "same members, same config: the placement must be the same (I4)"
    cluster.wait_for(
        lambda: client_follows(cluster, final),
        5.0,
        "the client's neighbour entries to name the holders after the heal",
        last=lambda: {v: lab.client_neigh(v) for v in final},
    )
    mine = [v for v, o in final.items() if o == victim]
    cluster.wait_for(
        lambda: all(
            announcements(load_events(arp.path), v, since=t_heal, mac=lab.mac(victim)) for v in mine
        ),
        5.0,
        f"{victim} to re-announce {mine} after the heal",
    )
    stop_probe(cluster, probe, cluster.vips, after=t_done)
    arp.stop()
    records = load_records(probe.path)
    end = max(r["t"] for r in records)
    outages = {v: outage(records, v, t_heal, end) for v in cluster.vips}
    report(record_property, "partition_heal", {"converged": t_done - t_heal})
    report(record_property, "partition_heal_outage", outages)
    # Not a planned change, so a few lost probes are tolerated; but a heal must cost no more
    # than a few heartbeats, never anything like a failover (dead_after).
    bound = 3 * t.heartbeat_interval
    assert max(outages.values()) < bound, f"heal outage above {bound:.2f}s: {outages}"
