"""The simulator's random sweep at full size, with a table.

Run: ``python bench/sweep.py`` (options: ``--seeds 5000``, ``--base 0``, ``--workers N``,
``--identity`` to add a cloned machine and a member forging operator tables to every
schedule, as the CI's identity sweep does).
Prints one table and exits 1 if any seed found an unexplained violation (0 otherwise).

CI runs the same schedules (`tests/sim/test_random.py`) with fewer seeds, so that the whole
suite stays under 30 minutes on 2 cores. This bench is the long soak. It runs the same
code: the first 200 seeds plain (every node verifies every datagram), the rest with the
pure results memoised across nodes (`vipd.memo.Memo`; the traces are identical). "Time per
seed" is the wall time of one seed in its worker; on a shared machine compare medians of runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.sim.invariants import KNOWN_DEFECTS
from tests.sim.schedules import replay_command
from tests.sim.test_random import PLAIN_SEEDS, _run_parallel, _tolerated


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5000)
    parser.add_argument("--base", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--identity",
        action="store_true",
        help="each schedule then gets a cloned machine and a member forging tables",
    )
    args = parser.parse_args(argv)
    os.environ["VIPD_SIM_WORKERS"] = str(args.workers)
    seeds = list(range(args.base, args.base + args.seeds))
    print(f"{len(seeds)} seeds on {args.workers} workers (about 1 s each)...", flush=True)
    started = time.monotonic()
    results = _run_parallel(seeds, identity=args.identity)
    wall = time.monotonic() - started
    failed = [(seed, v) for seed, vs, _, _, _ in results for v in vs if not _tolerated(v, True)]
    known: Counter[str] = Counter(
        v.split("[known ", 1)[1][:2] for _, vs, _, _, _ in results for v in vs if "[known " in v
    )
    plain = [r for r in results if r[0] - args.base < PLAIN_SEEDS]
    memo = [r for r in results if r[0] - args.base >= PLAIN_SEEDS]
    rows = [
        ("seeds", f"{len(results)} ({len(plain)} plain, {len(memo)} memoised)"),
        ("virtual time simulated", f"{sum(r[3] for r in results):.0f} s"),
        ("time per seed, plain", _per_seed(plain)),
        ("time per seed, memoised", _per_seed(memo)),
        ("wall time", f"{wall:.0f} s on {args.workers} workers"),
        ("seeds with unexplained violations", str(len({s for s, _ in failed}))),
        (
            "seeds hitting known defects",
            ", ".join(f"{k} x{n}" for k, n in sorted(known.items())) or "none",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for seed, violation in failed[:10]:
        print(f"\nseed {seed}: {violation}\n  replay: {replay_command(seed)}")
    for tag in sorted(known):
        print(f"  {tag}: {KNOWN_DEFECTS[tag]}")
    return 1 if failed else 0


def _per_seed(rows: list[tuple[int, list[str], str | None, float, float]]) -> str:
    if not rows:
        return "-"
    return f"{sum(r[4] for r in rows) / len(rows):.2f} s"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
