"""Seeded random fault schedules (`tests.sim.schedules`), each checked for I1-I6 and liveness.

Environment:

- ``VIPD_SIM_SEED=1234`` (or ``1234,99``): run only these seeds, in this process, write
  their traces and print their schedules.
- ``VIPD_SIM_SEEDS=20000``: how many seeds (default `DEFAULT_SEEDS`, sized to CI time),
  starting at ``VIPD_SIM_SEED_BASE`` (default 0).
- ``VIPD_SIM_WORKERS``: processes to spread the seeds over (default: every CPU).
- ``VIPD_SIM_STRICT=0``: tolerate violations explained by a known defect
  (`tests.sim.invariants.KNOWN_DEFECTS`), counting and showing them; by default they fail
  like any other. The default seeds hit none; K2 (seed 4189) and K6 (seed 2893) are open,
  reproduced in test_defects.py.
- ``VIPD_SIM_TRACE_DIR``: where traces of failing seeds go (default $TMPDIR/vipd-sim).

A failing seed is reported with its first violations, its trace file and the command that
replays it.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import pytest

from tests.sim.invariants import KNOWN_DEFECTS
from tests.sim.schedules import make_schedule, replay_command, run_schedule, run_seeds

#: Measured: 0.7-0.8 s of CPU per seed on average (Ed25519 verification is a third of it),
#: so 160 seeds take ~65 s on 2 cores. Raise with VIPD_SIM_SEEDS for a longer hunt.
DEFAULT_SEEDS = 160


def _seeds() -> list[int]:
    only = os.environ.get("VIPD_SIM_SEED")
    if only:
        return [int(x) for x in only.split(",")]
    count = int(os.environ.get("VIPD_SIM_SEEDS", DEFAULT_SEEDS))
    base = int(os.environ.get("VIPD_SIM_SEED_BASE", 0))
    return list(range(base, base + count))


def _run_parallel(seeds: list[int]) -> list[tuple[int, list[str], str | None, float, float]]:
    workers = int(os.environ.get("VIPD_SIM_WORKERS", os.cpu_count() or 1))
    if workers <= 1 or len(seeds) < 8:
        return run_seeds(seeds)
    # Interleaved chunks: cheap and expensive seeds spread evenly over the workers.
    chunks = [seeds[i :: workers * 4] for i in range(workers * 4)]
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        results = [r for chunk in pool.map(run_seeds, chunks) for r in chunk]
    return sorted(results)


@pytest.mark.timeout(max(300, 3 * len(_seeds())))  # a long hunt must not hit the default
def test_random_schedules() -> None:
    seeds = _seeds()
    strict = os.environ.get("VIPD_SIM_STRICT", "1") == "1"
    if os.environ.get("VIPD_SIM_SEED"):
        for seed in seeds:  # replay: in this process, schedule and trace shown
            sched = make_schedule(seed)
            print(sched.describe())
            r = run_schedule(sched, write_trace=True)
            print(f"trace: {r.trace_path}")
            for v in r.violations:
                print("  ", v)
            unknown = [v for v in r.violations if strict or not v.known]
            assert not unknown, f"seed {seed}: " + "; ".join(map(str, unknown[:3]))
        return
    results = _run_parallel(seeds)
    failed: list[str] = []
    known: Counter[str] = Counter()
    known_seeds: dict[str, list[int]] = {}
    virtual = sum(r[3] for r in results)
    for seed, violations, trace, _, _ in results:
        tags = {v.split("[known ", 1)[1][:2] for v in violations if "[known " in v}
        unexplained = [v for v in violations if strict or "[known " not in v]
        for tag in sorted(tags):
            known[tag] += 1
            known_seeds.setdefault(tag, []).append(seed)
        if unexplained:
            failed.append(
                f"seed {seed}: {unexplained[0]}\n    trace: {trace}\n"
                f"    replay: {replay_command(seed)}"
            )
    print(
        f"{len(results)} random schedules, {virtual:.0f} s of virtual time; seeds hitting "
        f"known defects: "
        + (
            ", ".join(f"{k} x{n} (e.g. {known_seeds[k][:5]})" for k, n in sorted(known.items()))
            or "none"
        )
    )
    for k in sorted(known):
        print(f"  {k}: {KNOWN_DEFECTS[k]}")
    assert not failed, f"{len(failed)} of {len(results)} seeds failed:\n" + "\n".join(failed[:20])


def _trace_digest(seed: int) -> str:
    import hashlib

    r = run_schedule(make_schedule(seed), write_trace=False)
    return hashlib.sha256(r.sim.trace.format().encode()).hexdigest()


def test_a_seed_replays_exactly_in_another_process() -> None:
    """Replays are exact: same trace, byte for byte, in a process with other hash salts."""
    import subprocess
    import sys
    from pathlib import Path

    seed = 3
    code = f"from tests.sim.test_random import _trace_digest; print(_trace_digest({seed}))"
    root = Path(__file__).resolve().parents[2]
    other = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env={**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert other == _trace_digest(seed)
