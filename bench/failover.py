"""Failover outage as a client sees it, in a real namespace lab (root).

For each timing profile, a 3-node lab runs; in every trial the node holding the most addresses
is failed one of three ways, a client pings every address every `--interval` seconds, and the
outage of a moved address is the longest gap between successful replies after the fault:

- link:  the node's switch port goes down (the machine is gone); healed by bringing it up.
- kill:  SIGKILL of the node's vipd (daemon crash, host alive); healed by restarting vipd.
         The host's kernel still holds and answers for the addresses until peers announce
         them, so clients see almost no outage; the restarted vipd removes the stale copies.
- term:  SIGTERM (graceful stop: make-before-break); healed by restarting vipd.

Each trial's figure is its worst moved address. Prints a table (median / p95 / max over the
trials) and exits 0. Usage: sudo .venv/bin/python bench/failover.py [--runs 5]
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

from vipd.lab.cluster import LabCluster
from vipd.lab.probe import last_success, load_records, lost, outage
from vipd.lab.topology import Lab, new_prefix


@dataclass
class Result:
    profile: str
    scenario: str
    outages: list[float] = field(default_factory=list)
    lost_probes: list[int] = field(default_factory=list)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _fault(cluster: LabCluster, how: str, node: str) -> Callable[[], object]:
    """Inject the fault; return the function that undoes it."""
    lab = cluster.lab
    if how == "link":
        lab.cut_link(node)
        return lambda: lab.restore_link(node)
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
    if how != "link":
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="trials per scenario (default 5)")
    parser.add_argument("--interval", type=float, default=0.01, help="probe interval (s)")
    parser.add_argument("--profiles", default="lan,fast")
    parser.add_argument("--scenarios", default="link,kill,term")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/failover.py needs root (network namespaces)", file=sys.stderr)
        return 0
    results: list[Result] = []
    for profile in args.profiles.split(","):
        results += run_profile(profile, args.scenarios.split(","), args.runs, args.interval)
    probe_ms = args.interval * 1000
    print(f"\nclient outage per trial (worst moved address), probe every {probe_ms:.0f} ms")
    print(f"{'profile':8} {'fault':6} {'runs':>4} {'median':>8} {'p95':>8} {'max':>8} {'lost':>6}")
    for r in results:
        ms = [o * 1000 for o in r.outages]
        lost_median = statistics.median(r.lost_probes)
        print(
            f"{r.profile:8} {r.scenario:6} {len(ms):4d} {statistics.median(ms):6.0f}ms"
            f" {_percentile(ms, 0.95):6.0f}ms {max(ms):6.0f}ms {lost_median:6.0f}"
        )
    print("(lost = median probes lost per trial over all moved addresses; ~10 ms = no outage)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
