"""Membership under faults, on a real kernel: random loss, a stalled daemon, planned change
probed every 5 ms.

Three vipd daemons in namespaces (tests/netns/conftest.py); ownership is read from the
kernel's address tables, loss is an nftables rule on the lab switch (`Lab.set_loss`), and the
daemons' own counters (`members_lost`, `loop_stalls`, `rx_accepted`, `tx_heartbeats`) say what
they went through. Measured numbers are printed (`pytest -s`) and attached as properties.

The two loss tests run 60 s each on purpose (the issue's acceptance criterion is a minute at
20 % loss); everything else here takes a few seconds.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.netns.conftest import running
from tests.netns.test_failover import (
    RecordProperty,
    client_follows,
    most_loaded,
    report,
    stop_probe,
    timing,
)
from vipd.config import load_config
from vipd.lab.cluster import LabCluster
from vipd.lab.probe import load_records, lost, outage
from vipd.lab.topology import Lab

pytestmark = pytest.mark.netns

LOSS_PERCENT = 20
LOSS_SECONDS = 60.0  # the criterion: a minute of 20 % loss
POLL_INTERVAL = 0.05  # s between kernel ownership samples (~5 ms of `ip` calls each)
PROBE_INTERVAL = 0.005  # s: planned change must lose nothing even at this resolution
LEAVE_WAIT = 10.0  # s: a graceful stop is bounded by handover_timeout; generous for 2 cores


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def fast_cluster(lab: Lab, request: pytest.FixtureRequest) -> Iterator[LabCluster]:
    """Like conftest's `cluster`, with the `fast` timing profile (0.015 s heartbeats)."""
    with running(LabCluster(lab, timing={"profile": "fast"}), request) as c:
        yield c


@pytest.fixture(params=["lan", "fast"])
def profiled_cluster(request: pytest.FixtureRequest) -> LabCluster:
    """A converged 3-node cluster, once per timing profile."""
    name = "cluster" if request.param == "lan" else "fast_cluster"
    c: LabCluster = request.getfixturevalue(name)
    return c


# --- observation ----------------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    owners: dict[str, list[str]]  # vip -> nodes whose kernel holds it
    status: dict[str, dict[str, Any]]  # node -> its daemon's status (polled nodes only)


@dataclass
class Monitor:
    """Samples kernel ownership (and optionally daemons' status) in a background thread, so
    the test thread is free to inject faults. Never polls a daemon that may be SIGSTOPped:
    its control socket would block the sampler for the whole stop."""

    cluster: LabCluster
    status_of: Sequence[str] = ()
    interval: float = POLL_INTERVAL
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _error: BaseException | None = None

    def __enter__(self) -> Monitor:
        self._thread = threading.Thread(target=self._run, name="ownership-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> list[Sample]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            self._thread = None
        if self._error is not None:
            raise AssertionError(f"monitor failed: {self._error!r}") from self._error
        return self.samples

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                t = time.monotonic()
                owners = self.cluster.ownership()
                status = {n: self.cluster.status(n, timeout=1.0) for n in self.status_of}
                self.samples.append(Sample(t, owners, status))
                self._stop.wait(self.interval)
        except BaseException as e:  # re-raised in the test thread by stop()
            self._error = e


def counter(status: dict[str, Any], name: str) -> int:
    value = status["counters"].get(name, 0)
    return int(value)


def deltas(
    before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]], name: str
) -> dict[str, int]:
    return {n: counter(after[n], name) - counter(before[n], name) for n in before}


def ownership_changes(samples: Sequence[Sample], expected: dict[str, str]) -> list[Sample]:
    """Samples in which some address is not held by exactly its expected node."""
    want = {v: [o] for v, o in expected.items()}
    return [s for s in samples if s.owners != want]


def episodes(bad: Sequence[Sample], samples: Sequence[Sample]) -> int:
    """How many separate stretches of consecutive samples are in `bad`."""
    bad_t = {s.t for s in bad}
    flags = [s.t in bad_t for s in samples]
    return sum(1 for i, f in enumerate(flags) if f and (i == 0 or not flags[i - 1]))


def member_state(status: dict[str, Any], name: str) -> str:
    return str(next(m["state"] for m in status["members"] if m["name"] == name))


# --- random loss ----------------------------------------------------------------------------


@dataclass
class LossRun:
    seconds: float
    before: dict[str, str]
    samples: list[Sample]
    members_lost: dict[str, int]
    loop_stalls: dict[str, int]
    heartbeat_loss: dict[str, float]  # per receiver: 1 - accepted / peers' datagrams sent
    changes: list[Sample]


def run_under_loss(cluster: LabCluster, percent: float, seconds: float) -> LossRun:
    before = cluster.wait_converged(balanced=True)
    start = {n: cluster.status(n) for n in cluster.nodes}
    cluster.lab.set_loss(percent)  # every bridge port, client's included
    try:
        with Monitor(cluster) as monitor:
            time.sleep(seconds)
    finally:
        cluster.lab.clear_loss()
    end = {n: cluster.status(n) for n in cluster.nodes}
    sent = deltas(start, end, "tx_heartbeats")
    accepted = deltas(start, end, "rx_accepted")
    heartbeat_loss = {
        n: 1 - accepted[n] / sum(sent[p] for p in cluster.nodes if p != n) for n in cluster.nodes
    }
    return LossRun(
        seconds=seconds,
        before=before,
        samples=monitor.samples,
        members_lost=deltas(start, end, "members_lost"),
        loop_stalls=deltas(start, end, "loop_stalls"),
        heartbeat_loss=heartbeat_loss,
        changes=ownership_changes(monitor.samples, before),
    )


def describe_loss_run(name: str, run: LossRun, record_property: RecordProperty) -> None:
    text = (
        f"{run.seconds:.0f}s at {LOSS_PERCENT}% loss: "
        f"{len(run.samples)} ownership samples, "
        f"{episodes(run.changes, run.samples)} ownership changes, "
        f"members_lost {run.members_lost}, loop_stalls {run.loop_stalls}, "
        "measured heartbeat loss "
        + ", ".join(f"{n}={loss:.1%}" for n, loss in sorted(run.heartbeat_loss.items()))
    )
    print(f"\n{name}: {text}")
    record_property(name, text)


def check_loss_was_real(run: LossRun) -> None:
    # The fault must have been in force: each node hears 2 peers x 10 (lan) or 50 (fast)
    # heartbeats/s, >= 1200 datagrams over 60 s, so the measured loss is 20 % +- ~1.2 % (1 sd).
    # +-6 % cannot be missed by chance, and a no-op set_loss fails here.
    for node, loss in run.heartbeat_loss.items():
        assert abs(loss - LOSS_PERCENT / 100) < 0.06, f"{node} saw {loss:.1%} heartbeat loss"
    # ~50 ms sampling: a 2-core box may stretch it, but far fewer than 5/s means we were blind.
    assert len(run.samples) >= run.seconds * 5, f"only {len(run.samples)} samples"


def test_lan_profile_rides_out_20pct_loss_for_a_minute(
    cluster: LabCluster, record_property: RecordProperty
) -> None:
    """Issue target: default profile, zero false failovers under 20 % loss.

    dead_after is 10 heartbeat intervals: a live peer is lost only after 10 heartbeats in a
    row are lost, p = 0.2**10 ~ 1e-7 per heartbeat and receiver; 6 (sender, receiver) pairs
    x 800 heartbeats give ~5e-4 expected false losses per minute. So this asserts zero, and a
    failure is a real finding. (At the 7.5 intervals lan had before, a CI run saw one: ~4 %
    a minute once a busy 2-core box delays a few receptions.)
    """
    run = run_under_loss(cluster, LOSS_PERCENT, LOSS_SECONDS)
    describe_loss_run("lan_loss", run, record_property)
    check_loss_was_real(run)
    assert not any(run.members_lost.values()), f"false failovers: {run.members_lost}"
    assert not run.changes, (
        f"ownership changed {episodes(run.changes, run.samples)} times; first: "
        f"{run.changes[0].owners} at +{run.changes[0].t - run.samples[0].t:.2f}s"
    )


def test_fast_profile_at_most_one_false_failover_a_minute_under_20pct_loss(
    fast_cluster: LabCluster, record_property: RecordProperty
) -> None:
    """Issue target: `fast` profile, at most one false failover a minute under 20 % loss.

    Same 10-interval margin as lan at 5x the heartbeats: ~2.5e-3 false losses expected per
    minute from loss alone; the rest of the budget is for a 2-core box delaying 15 ms timers.
    A false failover is any rise of any daemon's members_lost (no node is actually down).
    """
    run = run_under_loss(fast_cluster, LOSS_PERCENT, LOSS_SECONDS)
    describe_loss_run("fast_loss", run, record_property)
    check_loss_was_real(run)
    false_failovers = sum(run.members_lost.values())
    assert false_failovers <= 1, f"{false_failovers} false failovers in 60 s: {run.members_lost}"
    if false_failovers == 0:
        # No member lost, so nothing may have moved either.
        assert not run.changes, f"ownership changed without a lost member: {run.changes[0]}"


# --- a stalled daemon -----------------------------------------------------------------------


def test_stalled_daemon_does_not_make_the_others_flap(
    profiled_cluster: LabCluster, record_property: RecordProperty
) -> None:
    """SIGSTOP one vipd for 2 x dead_after, then SIGCONT: the survivors lose it once and never
    each other; it does not accuse anyone for its own stall; all converge back, balanced."""
    c = profiled_cluster
    t = timing(c)
    before = c.wait_converged(balanced=True)
    # Let every scheduled announcement repeat (the claim schedule ends at +5 s) run out
    # first: a leftover repeat would re-point the client by luck and hide a missing
    # re-announce after the stall.
    time.sleep(load_config(c.config_path(c.nodes[0])).announce.schedule[-1] + 0.2)
    victim = most_loaded(c)
    survivors = [n for n in c.nodes if n != victim]
    start = {n: c.status(n) for n in c.nodes}
    probe = c.start_probe()
    # Status every ~dead_after/5 at most, so the victim's short "dead" spell under the fast
    # profile (about dead_after long) is sampled several times.
    with Monitor(c, status_of=survivors, interval=min(POLL_INTERVAL, t.dead_after / 5)) as mon:
        time.sleep(0.2)  # a few samples of the steady state first
        t_stop = time.monotonic()
        c.send_signal(victim, signal.SIGSTOP)
        time.sleep(2 * t.dead_after)
        c.send_signal(victim, signal.SIGCONT)
        t_cont = time.monotonic()
        final = c.wait_converged(timeout=15.0, balanced=True)

        def agreed() -> bool:
            views = [c.status(n)["view"] for n in c.nodes]
            return len({v["digest"] for v in views}) == 1 and all(
                sorted(v["members"]) == sorted(c.nodes) for v in views
            )

        c.wait_for(agreed, 10.0, "all three daemons to agree on one 3-member view")
        t_agreed = time.monotonic()
        time.sleep(0.2)  # and a few samples after
    samples = mon.samples
    end = {n: c.status(n) for n in c.nodes}
    lost_counts = deltas(start, end, "members_lost")
    report(
        record_property,
        "sigstop",
        {"stopped": t_cont - t_stop, "cont->agreed": t_agreed - t_cont},
    )
    print(f"sigstop members_lost {lost_counts}, loop_stalls {deltas(start, end, 'loop_stalls')}")

    # The survivors declared the victim dead (the stall was long enough to be a failure) ...
    for s in survivors:
        seen = [member_state(x.status[s], victim) for x in samples if s in x.status]
        assert "dead" in seen, f"{s} never saw {victim} dead during the stop: {sorted(set(seen))}"
        # ... once: exactly one members_lost each ...
        assert lost_counts[s] == 1, f"{s} lost {lost_counts[s]} members, expected 1 ({victim})"
        # ... and never each other (so that one loss was the victim).
        other = next(o for o in survivors if o != s)
        flaps = [
            (round(x.t - t_stop, 3), member_state(x.status[s], other))
            for x in samples
            if s in x.status and member_state(x.status[s], other) != "alive"
        ]
        assert not flaps, f"{s} saw its fellow survivor {other} as not alive: {flaps}"
        not_in_view = [
            round(x.t - t_stop, 3)
            for x in samples
            if s in x.status and other not in x.status[s]["view"]["members"]
        ]
        assert not not_in_view, f"{other} left {s}'s view at {not_in_view}"
    # A node must not accuse its peers for its own stall (its timers all fire late at once).
    assert lost_counts[victim] == 0, f"{victim} declared peers dead after its own stall"

    # The kernel: survivors' own addresses never moved; the victim's were always held by
    # someone (its own kernel keeps them while vipd is stopped) and were taken over.
    for v, o in before.items():
        if o in survivors:
            moved = [round(x.t - t_stop, 3) for x in samples if o not in x.owners[v]]
            assert not moved, f"{v} left its holder {o} at {moved}"
        else:
            empty = [round(x.t - t_stop, 3) for x in samples if not x.owners[v]]
            assert not empty, f"{v} had no holder at {empty}"
            taken = [x for x in samples if set(x.owners[v]) & set(survivors)]
            assert taken, f"no survivor took {v} while {victim} was stopped"
    # Same members, same incarnations, same config: the same placement as before (I4).
    assert final == before, f"placement after the stall {final} != before {before}"

    stop_probe(c, probe, c.vips, after=t_agreed)  # the client reaches every address
    records = load_records(probe.path)
    end_t = max(r["t"] for r in records)
    outages = {v: outage(records, v, t_stop, end_t) for v in c.vips}
    report(record_property, "sigstop_outage", outages)
    # No address should go dark at all: while vipd is stopped its kernel still answers, the
    # survivors announce what they take, and when it resumes, whichever copy is kept must be
    # announced before the other is released (the client may point at either). Like a
    # partition heal, allow one settle time (+0.2 s for a loaded 2-core box). A holder that
    # is not re-announced leaves the client on a MAC without the address for seconds.
    bound = t.settle_time + 0.2
    slow = {v: round(o, 3) for v, o in outages.items() if o > bound}
    assert not slow, f"client outage above {bound:.2f}s around the stall: {slow}"
    c.wait_for(lambda: client_follows(c, final), 5.0, "the client to follow the final holders")


# --- planned change at 5 ms probing ---------------------------------------------------------


def test_graceful_stop_loses_no_probe_at_5ms(
    profiled_cluster: LabCluster, record_property: RecordProperty
) -> None:
    c = profiled_cluster
    before = c.wait_converged(balanced=True)
    victim = most_loaded(c)
    moved = sorted(v for v, o in before.items() if o == victim)
    survivors = [n for n in c.nodes if n != victim]
    probe = c.start_probe(interval=PROBE_INTERVAL)

    t_term = time.monotonic()
    c.send_signal(victim, signal.SIGTERM)
    after = c.wait_converged(survivors, timeout=LEAVE_WAIT)
    c.wait_for(lambda: not c.running(victim), LEAVE_WAIT, f"vipd on {victim} to exit")
    c.wait_for(lambda: client_follows(c, after), 5.0, "the client to follow")
    stop_probe(c, probe, moved, after=time.monotonic())
    records = load_records(probe.path)
    end = max(r["t"] for r in records)
    report(
        record_property, "sigterm_5ms_outage", {v: outage(records, v, t_term, end) for v in moved}
    )
    losses = {v: lost(records, v, t_term, end) for v in c.vips}
    assert not any(losses.values()), f"probes lost during a graceful stop (I2): {losses}"


def test_join_loses_no_probe_at_5ms(
    profiled_cluster: LabCluster, record_property: RecordProperty
) -> None:
    c = profiled_cluster
    joiner = "n2"
    others = [n for n in c.nodes if n != joiner]
    c.stop(joiner, signal.SIGTERM)
    c.wait_converged(others, timeout=LEAVE_WAIT, balanced=True)
    probe = c.start_probe(interval=PROBE_INTERVAL)

    t_start = time.monotonic()
    c.start(joiner)
    final = c.wait_converged(timeout=15.0, balanced=True)
    assert sum(1 for o in final.values() if o == joiner) == 2, final
    c.wait_for(lambda: client_follows(c, final), 5.0, "the client to follow")
    stop_probe(c, probe, c.vips, after=time.monotonic())
    records = load_records(probe.path)
    end = max(r["t"] for r in records)
    mine = [v for v, o in final.items() if o == joiner]
    report(record_property, "join_5ms_outage", {v: outage(records, v, t_start, end) for v in mine})
    losses = {v: lost(records, v, t_start, end) for v in c.vips}
    assert not any(losses.values()), f"probes lost while {joiner} joined (I2): {losses}"
