"""Seeded random fault schedules, and the runner that plays one and checks it.

A seed decides everything (`make_schedule`): the cluster (3-7 nodes, 6-40 groups, partition
policy, timing profile), the network (base delay, jitter, background loss 0-5%, duplication),
clock skews (within +-10 s, a third of the freshness window), which nodes start cold and which
join later, and 2-8 faults drawn from: process crash (+ restart), machine down (+ up), graceful
leave (+ rejoin), join, partition into two sides, one-way cut, loss burst (10-40%), loop
stall (up to 3 x dead_after), a flapping node (cut off for longer than dead_after, 2-4 times),
and a clock step. A quarter of the schedules are sparse: 2-4 faults, each after the cluster
had time to become stable again (so I6 compares stable states around each fault); in the
others faults overlap freely, except that faults on one node do not overlap, nor do network
faults (cuts, bursts); at
the end of the fault window everything is healed and every crashed daemon restarted (systemd
`Restart=`), machines that are down or nodes that left may stay so. Then a quiet tail of
`converge` + 1 s (extended while a hold-down is still running out) ends with the liveness check.

Times are in units of the profile's scale (``dead_after / 0.75``), so `fast` schedules are as
long in heartbeats as `lan` ones. A schedule lasts about 15-40 s of virtual time under `lan`.

Replay: ``VIPD_SIM_SEED=1234 .venv/bin/pytest -s tests/sim/test_random.py -k schedules`` (see
test_random.py), or
``.venv/bin/python -m tests.sim.schedules 1234`` which prints the schedule and writes the trace.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from random import Random

from tests.sim.cluster import ClusterSpec, node_key, node_public_key
from tests.sim.invariants import Checker, Stats, Violation, stable_after
from tests.sim.simulator import NetParams, Sim, SimParams
from vipd.config import PROFILES
from vipd.membership import wire
from vipd.memo import Memo
from vipd.placement.overrides import MAX_VERSION_STEP, Overrides

#: Longest extra tail while hold-downs run out (8 x holddown is the longest hold-down).
MAX_EXTENSION = 8 * PROFILES["lan"].holddown + 10.0


@dataclass
class Action:
    t: float
    text: str
    run: Callable[[Sim], None]


@dataclass
class Schedule:
    seed: int
    spec: ClusterSpec
    profile: str
    net: NetParams
    params: SimParams
    skews: dict[str, float]
    actions: list[Action] = field(default_factory=list)
    quiet_from: float = 0.0  # end of the fault window

    def describe(self) -> str:
        head = (
            f"seed {self.seed}: {self.spec.nodes} nodes, {self.spec.groups} groups, "
            f"policy {self.spec.policy}, profile {self.profile}, net loss {self.net.loss:.3f} "
            f"delay {self.net.delay * 1e3:.2f} ms jitter {self.net.jitter * 1e3:.2f} ms "
            f"dup {self.net.dup:.3f}, skews "
            + " ".join(f"{k}={v:+.2f}" for k, v in sorted(self.skews.items()))
        )
        lines = [head] + [f"  t={a.t:8.3f}  {a.text}" for a in self.actions]
        lines.append(f"  t={self.quiet_from:8.3f}  quiet tail begins")
        return "\n".join(lines)


def _do(method: str, *args: object) -> Callable[[Sim], None]:
    """An action calling `Sim.<method>(*args)`."""
    return lambda sim: getattr(sim, method)(*args)


def _call(fn: Callable[..., None], *args: object) -> Callable[[Sim], None]:
    """An action calling `fn(sim, *args)`."""
    return lambda sim: fn(sim, *args)


def make_schedule(seed: int) -> Schedule:
    rng = Random(seed)
    profile = "lan" if rng.random() < 0.75 else "fast"
    timing = PROFILES[profile]
    unit = timing.dead_after / PROFILES["lan"].dead_after  # 1.0 for lan, 0.2 for fast
    spec = ClusterSpec(
        nodes=rng.randint(3, 7),
        groups=rng.randint(6, 40),
        timing=timing,
        policy="majority" if rng.random() < 0.3 else "all",
    )
    net = NetParams(
        loss=rng.choice([0.0, 0.0, 0.01, 0.05]),
        delay=rng.uniform(0.0002, 0.005) * (1 if profile == "lan" else 0.5),
        jitter=rng.choice([0.0, 0.001, 0.01]) * (1 if profile == "lan" else 0.5),
        dup=rng.choice([0.0, 0.0, 0.01, 0.05]),
    )
    names = list(spec.names)
    skews = {n: round(rng.uniform(-10.0, 10.0), 3) if rng.random() < 0.5 else 0.0 for n in names}
    sched = Schedule(seed, spec, profile, net, SimParams(), skews)
    acts = sched.actions

    def add(t: float, text: str, run: Callable[[Sim], None]) -> None:
        acts.append(Action(round(t, 4), text, run))

    # Sparse schedules space their faults so that the cluster is stable between them (I6
    # compares consecutive stable states); dense ones let faults overlap.
    sparse = rng.random() < 0.25
    quiet = stable_after(timing) + 0.5 * unit
    cursor = quiet  # sparse: when the next fault may begin
    # Who starts cold (together, within half a second) and who joins later.
    late = [] if sparse else rng.sample(names, k=rng.randint(0, min(2, len(names) - 1)))
    for n in names:
        if n not in late:
            add(rng.uniform(0, 0.5) * unit, f"start {n}", _call(_start, n))
    window = rng.uniform(12.0, 30.0) * unit
    for n in late:
        add(rng.uniform(2.0 * unit, window), f"join {n}", _call(_start, n))

    node_free = {n: 0.0 for n in names}  # node faults do not overlap on one node
    net_free = 0.0  # nor do network faults
    dead = timing.dead_after
    for _ in range(rng.randint(2, 4) if sparse else rng.randint(2, 8)):
        t = cursor if sparse else rng.uniform(1.0 * unit, window)
        end = t
        kind = rng.choices(
            ["crash", "down", "leave", "partition", "oneway", "burst", "stall", "flap", "skew"],
            weights=[3, 2, 2, 3, 1, 1, 2, 1, 1],
        )[0]
        n = rng.choice(names)
        if kind in ("partition", "oneway", "burst", "flap"):
            if t < net_free:
                continue
        elif t < node_free[n]:
            continue
        if kind == "crash":
            back = t + rng.choice([0.05, 0.3, 1.0, 3.0, 8.0]) * unit * rng.uniform(0.5, 1.5)
            add(t, f"crash {n}", _do("crash", n))
            add(back, f"restart {n}", _call(_start, n))
            node_free[n] = end = back + 0.1 * unit
        elif kind == "down":
            add(t, f"machine down {n}", _do("machine_down", n))
            if rng.random() < 0.7:
                back = t + rng.uniform(0.5, 10.0) * unit
                add(back, f"machine up {n}", _call(_up, n))
                node_free[n] = end = back + 0.1 * unit
            else:
                node_free[n], end = float("inf"), t
        elif kind == "leave":
            add(t, f"leave {n}", _do("leave", n))
            if rng.random() < 0.7:
                back = t + rng.uniform(0.5, 10.0) * unit
                add(back, f"rejoin {n}", _call(_start, n))
                node_free[n] = end = back + 0.1 * unit
            else:
                node_free[n], end = float("inf"), t
        elif kind == "partition":
            side = rng.sample(names, k=rng.randint(1, len(names) - 1))
            end = t + rng.uniform(0.2, 8.0) * unit
            add(t, f"partition {sorted(side)} | rest", _do("partition", side))
            add(end, "heal", _do("heal"))
            net_free = end + 0.1 * unit
        elif kind == "oneway":
            a, b = rng.sample(names, k=2)
            end = t + rng.uniform(0.2, 8.0) * unit
            add(t, f"cut {a} -> {b}", _do("cut", a, b))
            add(end, "heal", _do("heal"))
            net_free = end + 0.1 * unit
        elif kind == "burst":
            loss = rng.uniform(0.1, 0.4)
            end = t + rng.uniform(1.0, 8.0) * unit
            add(t, f"loss burst {loss:.2f}", _do("set_loss", loss))
            add(end, "loss back to background", _call(_background_loss))
            net_free = end + 0.1 * unit
        elif kind == "stall":
            length = rng.uniform(0.05, 3.0) * dead
            add(t, f"stall {n} {length:.3f} s", _do("stall", n, length))
            node_free[n] = end = t + length + 0.1 * unit
        elif kind == "flap":
            at = t
            for _ in range(rng.randint(2, 4)):
                off = rng.uniform(1.3, 2.5) * dead
                add(at, f"isolate {n}", _do("isolate", n))
                add(at + off, "heal", _do("heal"))
                at += off + rng.uniform(0.3, 2.0) * unit
            net_free = end = at
        elif kind == "skew":
            skew = round(rng.uniform(-10.0, 10.0), 3)
            add(t, f"clock step {n} to {skew:+.3f} s", _do("set_skew", n, skew))
            end = t
        cursor = end + quiet
    acts.sort(key=lambda a: a.t)
    last = max([a.t for a in acts] + [window])
    # Quiet tail: heal everything, restart crashed daemons (systemd Restart=).
    sched.quiet_from = last + 0.1 * unit
    add(sched.quiet_from, "end of faults: heal, background loss, restart ghosts", _quiet)
    return sched


def make_identity_schedule(seed: int) -> Schedule:
    """`make_schedule(seed)`, then, once its faults are over and the cluster is stable, two
    identity faults: a second machine running a member's config and key (a cloned VM) that
    starts, runs for a while and goes (at most one instance may serve, issue 11 item 6);
    then a compromised member forging operator tables (nobody may follow them, item 2).
    Drawn from a stream of its own, so the plain seeds keep their schedules."""
    sched = make_schedule(seed)
    rng = Random(f"identity {seed}")
    unit = sched.spec.timing.dead_after / PROFILES["lan"].dead_after
    name = rng.choice(list(sched.spec.names))
    clone = f"{name}-clone"
    start = sched.quiet_from + stable_after(sched.spec.timing) + rng.uniform(0.0, 2.0) * unit
    gone = start + rng.uniform(0.3, 8.0) * unit
    sched.actions += [
        Action(round(start, 4), f"{clone} starts with {name}'s config", _call(_clone, name, clone)),
        Action(round(gone, 4), f"machine down {clone}", _call(_clone_gone, clone)),
    ]
    # Then a compromised member: its key signs heartbeats that carry a forged operator table
    # (in another member's name, or in its own but far past the version step), draining
    # everyone else. Every other node must refuse it, so nothing moves.
    rogue = rng.choice(list(sched.spec.names))
    victim = rng.choice([n for n in sched.spec.names if n != rogue])
    forge = rng.choice(["another's name", "version jump"])
    t = gone + stable_after(sched.spec.timing) + rng.uniform(0.0, 2.0) * unit
    until = t + rng.uniform(1.0, 6.0) * unit
    sched.actions += [
        Action(
            round(t, 4),
            f"{rogue} forges a table ({forge})",
            _call(_forge, rogue, victim if forge == "another's name" else rogue),
        ),
        Action(round(until, 4), f"{rogue} stops forging", _do("tamper", rogue, None)),
    ]
    sched.quiet_from = until + 0.1 * unit
    return sched


def _forge(sim: Sim, rogue: str, issuer: str) -> None:
    """`rogue`'s datagrams from now on carry a table that drains every other member, issued
    by `issuer` (another member: a forged signature) or by itself past MAX_VERSION_STEP."""
    cluster = sim.nodes[rogue].config.cluster
    others = tuple(sorted(n for n in sim.spec.names if n != rogue))
    key, public = node_key(rogue), node_public_key(rogue)

    def edit(data: bytes) -> bytes:
        hb = wire.decode_body(wire.parse_envelope(data))
        step = 1 if issuer != rogue else MAX_VERSION_STEP + 1
        table = Overrides(version=hb.overrides.version + step, issuer=issuer, drained=others)
        return wire.encode(replace(hb, overrides=table.signed(key, cluster)), key, public)

    sim.tamper(rogue, edit)


def _clone(sim: Sim, name: str, clone: str) -> None:
    proc = sim.nodes[name].proc
    if proc is None or not proc.open:
        sim.log("SCHED", f"{name} is not running: no clone")
        return
    sim.add_clone(name, clone)
    sim.start(clone)


def _clone_gone(sim: Sim, clone: str) -> None:
    if clone in sim.nodes:
        sim.machine_down(clone)


def _play(sim: Sim, action: Action) -> None:
    sim.log("SCHED", action.text)
    action.run(sim)


def _start(sim: Sim, name: str) -> None:
    node = sim.nodes[name]
    if node.machine_up and node.proc is None:
        sim.start(name)


def _background_loss(sim: Sim) -> None:
    sim.set_loss(sim.background_loss)


def _up(sim: Sim, name: str) -> None:
    if not sim.nodes[name].machine_up:
        sim.machine_up(name)


def _quiet(sim: Sim) -> None:
    if sim.cuts:
        sim.heal()
    if sim.net.loss != sim.background_loss:
        sim.set_loss(sim.background_loss)
    for name in sim.order:
        node = sim.nodes[name]
        if node.machine_up and node.proc is None and node.kernel:
            sim.start(name, planned=False)


@dataclass
class SeedResult:
    seed: int
    violations: list[Violation]
    stats: Stats
    virtual: float
    seconds: float
    trace_path: Path | None
    sim: Sim

    @property
    def ok(self) -> bool:
        return not self.violations


def trace_dir() -> Path:
    return Path(os.environ.get("VIPD_SIM_TRACE_DIR") or Path(tempfile.gettempdir()) / "vipd-sim")


def replay_command(seed: int) -> str:
    return f"VIPD_SIM_SEED={seed} .venv/bin/pytest -s tests/sim/test_random.py -k schedules"


def run_schedule(
    sched: Schedule, *, write_trace: bool | None = None, memo: Memo | None = None
) -> SeedResult:
    """Play a schedule and check it. The trace is written if a check failed (or if asked).
    ``memo``: share pure results between the simulated nodes (`vipd.memo.Memo`)."""
    started = time.perf_counter()
    sim = Sim(
        sched.spec,
        seed=sched.seed,
        net=sched.net,
        params=sched.params,
        skews=sched.skews,
        memo=memo,
    )
    checker = Checker(sim)
    for a in sched.actions:
        sim.at(a.t, partial(_play, sim, a))
    end = sched.quiet_from + checker.bounds.converge + 1.0
    sim.run_until(end)
    limit = end + MAX_EXTENSION
    while not checker.stable() and sim.now < limit:
        sim.run(1.0)  # a hold-down still running out: wait for it, then converge
    violations = checker.finish()
    path: Path | None = None
    if violations if write_trace is None else write_trace:
        path = trace_dir() / f"seed-{sched.seed}.trace"
        header = sched.describe() + "\n\nviolations:\n" + "\n".join(map(str, violations))
        sim.trace.write(path, header + "\n\ntrace:")
    return SeedResult(
        sched.seed,
        violations,
        checker.stats,
        sim.now,
        time.perf_counter() - started,
        path,
        sim,
    )


def run_seed(
    seed: int,
    *,
    write_trace: bool | None = None,
    memo: Memo | None = None,
    identity: bool = False,
) -> SeedResult:
    make = make_identity_schedule if identity else make_schedule
    return run_schedule(make(seed), write_trace=write_trace, memo=memo)


def run_seeds(
    seeds: list[int], *, memo: bool = False, identity: bool = False
) -> list[tuple[int, list[str], str | None, float, float]]:
    """Worker entry point (picklable results): (seed, violations, trace path, virtual s, s).

    ``memo``: share the pure results every node repeats on the same inputs (signature
    check and decoding of one datagram, placement of one view) through one `vipd.memo.Memo`
    per seed, as the shipped code allows; nothing is patched."""
    out = []
    for seed in seeds:
        r = run_seed(seed, memo=Memo() if memo else None, identity=identity)
        out.append(
            (
                seed,
                [str(v) for v in r.violations],
                str(r.trace_path) if r.trace_path else None,
                r.virtual,
                r.seconds,
            )
        )
    return out


def main(argv: list[str]) -> int:
    """``python -m tests.sim.schedules SEED [SEED...]``: run, print, write each trace."""
    status = 0
    for text in argv or ["0"]:
        sched = make_schedule(int(text))
        print(sched.describe())
        r = run_schedule(sched, write_trace=True)
        print(
            f"-> {len(r.violations)} violations, {r.virtual:.1f} s virtual in "
            f"{r.seconds:.2f} s; trace {r.trace_path}"
        )
        for v in r.violations:
            print("  ", v)
        status |= bool(r.violations)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
