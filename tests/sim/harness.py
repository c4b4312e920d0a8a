"""Small helpers for hand-written simulator scenarios."""

from __future__ import annotations

from dataclasses import dataclass

from tests.sim.cluster import ClusterSpec
from tests.sim.invariants import Checker
from tests.sim.schedules import trace_dir
from tests.sim.simulator import NetParams, Sim, SimParams
from vipd.config import PROFILES, Config, Timing


@dataclass
class Run:
    sim: Sim
    checker: Checker

    @property
    def converge(self) -> float:
        return self.checker.bounds.converge

    def run(self, seconds: float) -> None:
        self.sim.run(seconds)

    def settle(self, extra: float = 0.5) -> None:
        """Run until `converge` after the last change (plus `extra`)."""
        sim = self.sim
        end = max(sim.now, sim.last_change + self.converge) + extra
        sim.run_until(end)

    def flap(self, name: str, times: int) -> None:
        """Cut `name` off for longer than dead_after, then heal, `times` times."""
        for _ in range(times):
            self.sim.isolate(name)
            self.run(1.5 * self.sim.timing.dead_after)
            self.sim.heal()
            self.run(1.0)

    def holdings(self) -> dict[str, frozenset[str]]:
        return self.sim.holdings()

    def held_by(self, name: str) -> frozenset[str]:
        return self.sim.holdings()[name]

    def all_groups(self) -> frozenset[str]:
        return frozenset(g.name for g in self.sim.pool)

    def events(self, name: str, kind: str) -> list[tuple[float, str]]:
        """Trace lines of node `name` whose text starts with `kind`."""
        return [
            (t, text)
            for t, who, text in self.sim.trace.lines
            if who == name and text.startswith(kind)
        ]

    def assert_clean(self, *, finish: bool = True) -> None:
        """No invariant violated (and, with `finish`, the run ends converged: it first runs
        until `converge` after the last change)."""
        if finish:
            self.settle()
        violations = self.checker.finish() if finish else self.checker.violations
        if violations:
            path = trace_dir() / "scenario.trace"
            self.sim.trace.write(path)
            raise AssertionError(
                "\n".join(map(str, violations))
                + f"\n(trace: {path})\nlast trace lines:\n"
                + self.sim.trace.format(last=60)
            )


def formed(
    nodes: int = 3,
    groups: int = 6,
    *,
    policy: str = "all",
    timing: Timing | None = None,
    seed: int = 0,
    net: NetParams | None = None,
    params: SimParams | None = None,
    start: list[str] | None = None,
    configs: dict[str, Config] | None = None,
    skews: dict[str, float] | None = None,
) -> Run:
    """A cluster started cold and run until stable (asserted)."""
    spec = ClusterSpec(nodes=nodes, groups=groups, timing=timing or PROFILES["lan"], policy=policy)
    sim = Sim(spec, seed=seed, net=net, params=params, configs=configs, skews=skews)
    run = Run(sim, Checker(sim))
    for name in start if start is not None else sim.order:
        sim.start(name)
    run.settle()
    assert run.checker.stable(), run.checker.unstable_reasons()
    run.assert_clean(finish=False)
    return run
