"""Failover outage as a client sees it, in a real namespace lab (root).

For each timing profile, a 3-node lab runs; in every trial the node holding the most addresses
is failed one of three ways, a client pings every address every `--interval` seconds, and the
outage of a moved address is the longest gap between successful replies after the fault:

- link:  the node's switch port goes down (the machine is gone); healed by bringing it up
         with a freshly started vipd, as a machine that was gone comes back rebooted. (The same
         daemon rejoining counts as a flap: cut twice within flap_window, the node would sit
         out the next trials in hold-down, by design.)
- kill:  SIGKILL of the node's vipd (daemon crash, host alive); healed by restarting vipd.
         The host's kernel still holds and answers for the addresses until peers announce
         them, so clients see almost no outage; the restarted vipd removes the stale copies.
- term:  SIGTERM (graceful stop: make-before-break); healed by restarting vipd.

Each trial's figure is its worst moved address. Prints a table (median / p95 / max over the
trials) and exits 0.

With `--loss N`, a second table: for each profile, a converged 3-node cluster runs for
`--loss-duration` seconds with N % random loss on every switch port (nftables, `Lab.set_loss`),
and the false failovers are counted: every rise of any daemon's `members_lost` (no node is
really down), plus how often the kernel ownership (sampled every 50 ms) left the placement.

Usage: sudo .venv/bin/python bench/failover.py [--runs 10] [--interval 0.005] [--loss 20]
(`--runs 0 --loss 20` measures loss only.)
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vipd.lab.cluster import LabCluster
from vipd.lab.probe import last_success, load_records, lost, outage
from vipd.lab.topology import Lab, new_prefix


@dataclass
class Result:
    profile: str
    scenario: str
    outages: list[float] = field(default_factory=list)
    lost_probes: list[int] = field(default_factory=list)


@dataclass
class LossResult:
    profile: str
    percent: float
    seconds: float
    members_lost: int  # summed over the daemons: each rise is one false failover
    disturbances: int  # stretches of samples in which the kernel ownership left the placement
    samples: int
    heartbeat_loss: float  # measured: 1 - accepted / sent by the peers, mean over receivers
    loop_stalls: int

    @property
    def per_minute(self) -> float:
        return self.members_lost * 60.0 / self.seconds


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _fault(cluster: LabCluster, how: str, node: str) -> Callable[[], object]:
    """Inject the fault; return the function that undoes it."""
    lab = cluster.lab
    if how == "link":
        lab.cut_link(node)

        def heal() -> None:
            cluster.stop(node, signal.SIGKILL)  # while still cut off: it never rejoins
            lab.restore_link(node)
            cluster.start(node)

        return heal
    if how == "kill":
        cluster.stop(node, signal.SIGKILL)
    else:
        cluster.send_signal(node, signal.SIGTERM)
    return lambda: cluster.start(node)


def trial(cluster: LabCluster, how: str, interval: float) -> tuple[float, int]:
    before = cluster.wait_converged(timeout=20.0, balanced=True)
    held = cluster.holdings()
    victim = max(sorted(held), key=lambda n: len(held[n]))
    moved = sorted(v for v, owner in before.items() if owner == victim)
    survivors = [n for n in cluster.nodes if n != victim]
    probe = cluster.start_probe(moved, interval=interval)
    try:
        t_fault = time.monotonic()
        undo = _fault(cluster, how, victim)
        cluster.wait_converged(survivors, timeout=15.0)
        if how == "term":
            cluster.wait_for(lambda: not cluster.running(victim), 15.0, f"{victim} to exit")

        def answered_again() -> bool:
            records = load_records(probe.path)
            return all((last_success(records, v) or 0.0) > time.monotonic() - 0.2 for v in moved)

        cluster.wait_for(answered_again, 10.0, f"probes to {moved} to succeed again")
        end = time.monotonic()
    finally:
        probe.stop()
    records = load_records(probe.path)
    worst = max(outage(records, v, t_fault, end) for v in moved)
    lost_probes = sum(lost(records, v, t_fault, end) for v in moved)
    undo()
    cluster.wait_answering([victim])
    return worst, lost_probes


def run_profile(profile: str, scenarios: list[str], runs: int, interval: float) -> list[Result]:
    results = [Result(profile, s) for s in scenarios]
    # The lab is built on entry and removed on exit, daemons first.
    with (
        Lab(nodes=3, prefix=new_prefix()) as lab,
        LabCluster(lab, timing={"profile": profile}) as cluster,
    ):
        cluster.start_all()
        for result in results:
            for i in range(runs):
                worst, lost_probes = trial(cluster, result.scenario, interval)
                result.outages.append(worst)
                result.lost_probes.append(lost_probes)
                print(
                    f"  {profile:5} {result.scenario:5} #{i + 1}: outage {worst * 1000:6.0f} ms,"
                    f" {lost_probes} probes lost",
                    file=sys.stderr,
                )
    return results


def _counter(status: dict[str, Any], name: str) -> int:
    return int(status["counters"].get(name, 0))


def measure_loss(profile: str, percent: float, seconds: float) -> LossResult:
    with (
        Lab(nodes=3, prefix=new_prefix()) as lab,
        LabCluster(lab, timing={"profile": profile}) as cluster,
    ):
        cluster.start_all()
        placement = cluster.wait_converged(timeout=20.0, balanced=True)
        want = {v: [o] for v, o in placement.items()}
        start = {n: cluster.status(n) for n in cluster.nodes}
        samples = disturbances = 0
        disturbed = False
        lab.set_loss(percent)  # every port
        try:
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end:
                off = cluster.ownership() != want
                disturbances += off and not disturbed
                disturbed = off
                samples += 1
                time.sleep(0.05)
        finally:
            lab.clear_loss()
        end = {n: cluster.status(n) for n in cluster.nodes}

        def delta(node: str, name: str) -> int:
            return _counter(end[node], name) - _counter(start[node], name)

        losses = [
            1 - delta(n, "rx_accepted") / sum(delta(p, "tx_heartbeats") for p in end if p != n)
            for n in end
        ]
        return LossResult(
            profile=profile,
            percent=percent,
            seconds=seconds,
            members_lost=sum(delta(n, "members_lost") for n in end),
            disturbances=disturbances,
            samples=samples,
            heartbeat_loss=statistics.mean(losses),
            loop_stalls=sum(delta(n, "loop_stalls") for n in end),
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="trials per scenario (default 10)")
    parser.add_argument("--interval", type=float, default=0.005, help="probe interval (s)")
    parser.add_argument("--profiles", default="lan,fast")
    parser.add_argument("--scenarios", default="link,kill,term")
    parser.add_argument(
        "--loss", type=float, default=None, help="also count false failovers under this %% loss"
    )
    parser.add_argument(
        "--loss-duration", type=float, default=300.0, help="seconds of loss per profile"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/failover.py needs root (network namespaces)", file=sys.stderr)
        return 0
    profiles = args.profiles.split(",")
    results: list[Result] = []
    if args.runs > 0:
        for profile in profiles:
            results += run_profile(profile, args.scenarios.split(","), args.runs, args.interval)
    loss_results: list[LossResult] = []
    if args.loss is not None:
        for profile in profiles:
            r = measure_loss(profile, args.loss, args.loss_duration)
            print(
                f"  {profile:5} {args.loss:g}% loss for {args.loss_duration:.0f}s:"
                f" {r.members_lost} members lost",
                file=sys.stderr,
            )
            loss_results.append(r)
    if results:
        print_outages(results, args.interval)
    if loss_results:
        print_losses(loss_results)
    return 0


def print_outages(results: list[Result], interval: float) -> None:
    probe_ms = interval * 1000
    print(f"\nclient outage per trial (worst moved address), probe every {probe_ms:.0f} ms")
    print(f"{'profile':8} {'fault':6} {'runs':>4} {'median':>8} {'p95':>8} {'max':>8} {'lost':>6}")
    for r in results:
        ms = [o * 1000 for o in r.outages]
        lost_median = statistics.median(r.lost_probes)
        print(
            f"{r.profile:8} {r.scenario:6} {len(ms):4d} {statistics.median(ms):6.0f}ms"
            f" {_percentile(ms, 0.95):6.0f}ms {max(ms):6.0f}ms {lost_median:6.0f}"
        )
    print(
        f"(lost = median probes lost per trial over all moved addresses;"
        f" ~{probe_ms:.0f} ms = no outage)"
    )


def print_losses(results: list[LossResult]) -> None:
    print("\nfalse failovers under random loss on every switch port (3 nodes, nobody down)")
    print(
        f"{'profile':8} {'loss':>5} {'minutes':>7} {'hb loss':>7} {'lost':>5} {'per min':>7}"
        f" {'moved':>5} {'stalls':>6}"
    )
    for r in results:
        print(
            f"{r.profile:8} {r.percent:4g}% {r.seconds / 60:7.1f} {r.heartbeat_loss:6.1%}"
            f" {r.members_lost:5d} {r.per_minute:7.2f} {r.disturbances:5d} {r.loop_stalls:6d}"
        )
    print(
        "(hb loss = measured heartbeat loss; lost = members_lost rises summed over the daemons,"
        " each a false failover;\n moved = times the kernel ownership left the placement,"
        " sampled every 50 ms; stalls = loop stalls)"
    )


if __name__ == "__main__":
    sys.exit(main())
