"""Large simulated clusters: 256 nodes x 1,000 groups, and 64 nodes with nothing patched.

Both runs: a cold start, a machine lost (crash of the host), and a join into the running
cluster; the checker runs throughout (I2 zero gap on the join, I3, failover bound) and
`check_now` asserts I1/I4/I5/I6 at the end of each phase, without waiting for the general
`converge` bound.

Cost: every heartbeat is received N - 1 times. Timing for these runs (valid for the config
loader): heartbeat 1 s, dead_after 3 s (the loader's minimum ratio; no loss here), settle
1.5 s, startup_wait 1.2 s; the loop reads its socket every 0.25 s (`wakeup_latency`, up to
64 datagrams per read as the daemon does) and has a 4096-datagram receive buffer.

The 256-node run shares one `vipd.memo.Memo` between its nodes (each Ed25519 check, body
decode and placement computed once per process instead of once per receiver), which
`test_memo_is_equivalent` checks trace for trace. Set ``VIPD_SIM_BIG_REAL=1`` to run it with
no memo (measured: 583 s on one core). The 64-node run never uses one.
"""

from __future__ import annotations

import os
import time
from functools import partial

import pytest

from tests.sim.cluster import ClusterSpec
from tests.sim.invariants import Checker, Violation
from tests.sim.schedules import make_schedule, run_schedule
from tests.sim.simulator import NetParams, Sim, SimParams
from vipd.config import Timing
from vipd.memo import Memo

BIG_TIMING = Timing(
    heartbeat_interval=1.0,
    dead_after=3.0,
    startup_wait=1.2,
    handover_timeout=4.0,
    reconcile_interval=2.0,
    freshness_window=30.0,
    settle_time=1.5,
    mature_after=6.0,
    flap_window=60.0,
    holddown=5.0,
)


def _crash_and_join(
    nodes: int, groups: int, memo: Memo | None = None
) -> tuple[Sim, Checker, dict[str, float]]:
    spec = ClusterSpec(nodes=nodes, groups=groups, timing=BIG_TIMING)
    sim = Sim(
        spec,
        seed=nodes,
        net=NetParams(delay=0.001, jitter=0.002, rcvbuf=4096),
        params=SimParams(wakeup_latency=0.25),
        memo=memo,
    )
    checker = Checker(sim)
    names = sim.order
    late, victim = names[-1], names[nodes // 3]
    phases: dict[str, float] = {}
    started = time.perf_counter()

    def check(phase: str) -> None:
        phases[phase] = time.perf_counter() - started
        assert _unexplained(checker.check_now()) == [], "\n".join(map(str, checker.violations))

    for i, name in enumerate(names[:-1]):
        sim.at(0.2 * i / nodes, partial(sim.start, name))
    sim.run_until(3.0)
    check("cold start")
    before = sim.holdings()
    assert sum(len(v) for v in before.values()) == groups

    sim.machine_down(victim)
    sim.run_until(3.0 + BIG_TIMING.dead_after + 1.5)
    check("machine lost")
    after = sim.holdings()
    moved = {g for n in names if n != victim for g in after[n] - before[n]}
    # I6: its groups moved, and at most groups homed on the one roster member not started
    # yet (orphans are re-placed over the live members: documented in vipd.placement.assign).
    assert set(before[victim]) <= moved
    assert all(checker.home[g] == late for g in moved - set(before[victim]))

    sim.start(late)
    sim.run_until(sim.now + BIG_TIMING.startup_wait + 2 * BIG_TIMING.heartbeat_interval + 0.5)
    check("join")
    final = sim.holdings()
    share = groups // (nodes - 1)
    assert len(final[late]) in (share, share + 1)
    for n in names:
        if n not in (late, victim):
            # I6: only the joiner's share moved (and orphans of the lost node may shuffle)
            assert all(checker.home[g] == victim for g in after[n] - final[n] - final[late])
            assert all(checker.home[g] == victim for g in final[n] - after[n])
    assert _unexplained(checker.violations) == []
    for v in checker.violations:
        print("known:", v)
    return sim, checker, phases


def _unexplained(violations: list[Violation]) -> list[Violation]:
    """Violations not explained by a known defect (all of them unless VIPD_SIM_STRICT=0)."""
    strict = os.environ.get("VIPD_SIM_STRICT", "1") == "1"
    return [v for v in violations if strict or not v.known]


@pytest.mark.timeout(1800)  # VIPD_SIM_BIG_REAL=1 takes minutes
def test_256_nodes_1000_groups_crash_and_join() -> None:
    real = os.environ.get("VIPD_SIM_BIG_REAL") == "1"
    sim, _, phases = _crash_and_join(256, 1000, memo=None if real else Memo())
    print(f"256 nodes ({'no memo' if real else 'memo'}): {phases}, {sim.counters}")


def test_64_nodes_real_code_crash_and_join() -> None:
    sim, _, phases = _crash_and_join(64, 500)
    print(f"64 nodes (real): {phases}, {sim.counters}")


@pytest.mark.parametrize("seed", [3, 11, 26])
def test_memo_is_equivalent(seed: int) -> None:
    """Sharing pure results changes nothing: the same schedule gives the same trace, line for
    line, with and without a memo (what most of the random sweep runs under)."""
    plain = run_schedule(make_schedule(seed), write_trace=False)
    shared = run_schedule(make_schedule(seed), write_trace=False, memo=Memo())
    assert plain.sim.trace.lines == shared.sim.trace.lines
    assert plain.sim.counters == shared.sim.counters
    assert len(plain.sim.trace.lines) > 100
