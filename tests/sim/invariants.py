"""The invariant checker: I1-I6 and liveness, on the simulated kernels (the ground truth).

`Checker.after_event` runs after every simulator event that changed a node's state or any
kernel, and on a periodic tick (every heartbeat interval, scheduled on the same clock).

Words used below
----------------
- holder of an address: a machine that is up and has it in its kernel.
- running holder: a holder whose daemon process exists (maybe stalled or leaving).
  A *ghost* holder is one whose process crashed (SIGKILL): its kernel keeps answering, vipd
  cannot know; ghosts are left out of overlap counts and reported separately.
- live node: machine up, daemon running, socket open, not stalled, not leaving.
- excuse: a condition under which the cluster is not connected: a cut (partition, one-way),
  a loss burst (loss above the schedule's background level), a stalled node.
- unplanned fault: crash, machine down/up, a cut or heal, a loss change, a stall or resume, a
  clock step, a cold start (a start with no other daemon serving). Planned: join into a
  running cluster, graceful leave, exit.
- stable at t: no excuse, no unplanned fault or planned change in the last `converge`
  seconds, no hold-down that began or ended in the last `converge` seconds (a hold-down move
  is a planned rebalance), every daemon live (none starting, stalled or leaving), no ghosts.

Bounds (`Bounds.from_sim`), from the timing; `slack` covers network delay and jitter, the
loop's wakeup latency and the serial netlink work of one node (2 x (delay + jitter) +
wakeup_latency + (G/N + 2) x max kernel delay + 50 ms):

- converge = max(startup_wait, mature_after) + dead_after + settle_time + handover_timeout
  + 4 x heartbeat_interval + slack. Why: a restarted node listens startup_wait (a lone one
  waits mature_after); a silent one is lost after dead_after; a planned move then waits for
  agreement or settle_time; a move whose new owner cannot be observed ends by
  handover_timeout; a few heartbeats carry each step (a lost one costs one interval).
- handover = handover_timeout + settle_time + slack: the longest two-holder window of a
  planned (make-before-break) move.
- heal = settle_time + 2 x heartbeat_interval + slack: after a heal, the sides hear each other
  within one interval, the redundant holders release at once ("within one settle time,
  + detection").
- failover = max(dead_after, startup_wait) + 2 x heartbeat_interval + slack: a holder that
  vanished is lost after dead_after and its addresses claimed at once; a daemon restarted
  before its peers noticed (it drops the addresses its kernel kept) claims them again once
  ready (startup_wait at most).

Exact checks
------------
- I1 coverage (when stable): for every pool address, if the live set has quorum under the
  partition policy there is exactly one holder, it is live, it is the owner that placement
  gives (`controller.owners(core)`, common by I4), and (I1-client) the client's neighbour
  entry points at it; without quorum ("majority" minority) there is no holder at all.
- I2 no gap on planned change (always): every pool address has at least one holder (ghosts
  count: their kernel answers), unless within `converge` after an unplanned fault, or after a
  moment when an excuse was active, nobody live could serve, or the live set (live daemons,
  hold-down or not) lacked quorum under the policy. So a gap that opens during a join, leave
  or exit in a quiet cluster is a violation, however short.
- I1 failover (always): an address with no holder at all is a violation once that lasts
  past `failover` after the latest of: the gap's start, the last unplanned fault, the last
  moment gaps were excused by an excuse / no quorum / nobody live, the last cold start +
  mature_after.
- I3 bounded overlap (always): an address with two or more running holders is a violation
  once it lasts past max(start + handover, end of the last excuse + heal); while an excuse is
  active it is allowed. And (I3-announce) when such an overlap ends by a release with no
  excuse active, `heal` seconds later (unless an excuse began meanwhile) the client's
  neighbour entry (the sender of the last announcement frame it heard, see
  `tests.sim.simulator`) points at the holder that kept it: the survivor of a heal
  re-announces after the other holder's frames.
- I4 determinism (when stable): every live daemon not passive for a config mismatch has the
  same view digest and the same `controller.owners(core)`, and that view's members are
  exactly the live daemons not in hold-down (all of them if every one is).
- I5 balance (when stable, equal weights, quorum): the numbers of groups the placed members
  hold differ by at most one.
- I6 minimal movement (between consecutive stable states, equal weights, quorum both times):
  same placed set: no group moved at all. One member more or less: a group moved only if the
  member that left or joined held it (before or after), or its home (the roster-wide
  placement) is not in both placed sets; with the whole roster placed before a leave that is
  exactly the leaver's groups.
- Liveness (`finish`): the run ends stable, and the last stable tick passed I1, I4, I5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tests.sim.simulator import Proc, Sim
from vipd.config import Timing
from vipd.placement.assign import assign

#: Defects this simulator found in vipd. A violation matching one is tagged with its key, so
#: a regression names the defect it brings back; tests/sim/test_defects.py reproduces each.
#: The random sweep fails on tagged violations too (VIPD_SIM_STRICT=0 tolerates them while
#: investigating), except for the defects in `OPEN_DEFECTS`, which it counts and shows.
KNOWN_DEFECTS: dict[str, str] = {
    # Tagged by the checker (I3-announce, I1-client). Fixed: stall (5db8211), heal (7ac1d76),
    # overlap end and repeats during a handover (65e03ee), a held group that becomes ours
    # after the overlap ended (seed 4189: "controller: interim owner ...").
    "K2": "no re-announce when another node's frames for an address we keep went out after "
    "ours (DESIGN: 'again whenever another MAC is seen answering'): clients stay on a node "
    "that released it",
    "K6": "after a heal, a group held on both sides whose owner in the merged view is still "
    "in its startup wait stays doubly held until that owner is ready (up to startup_wait, "
    "more than one settle time with the fast profile)",  # fixed with seed 4189's K2
    # Seed 416; fixed by the conflict listener ("announce again whenever another MAC is seen
    # answering for an address we hold"), which heartbeats cannot replace.
    "K7": "a node cut off from the holder (heartbeats only, policy 'all') claims its groups and "
    "pulls the client over, then dies before the partition heals: the holder never sees an "
    "overlap and nothing re-announces, so the client stays on the dead node's MAC",
    # K8 (a false failover claimed and released between heartbeats, unseen by the owner)
    # is tagged K2 by the checker: fixed by the RELEASED heartbeat field.
    # Fixed, kept for the record (no longer tagged): K1 quorum ignored hold-down members
    # (7ac1d76), K3 failover waited for a starting owner (7ac1d76), K4 a node being cut off
    # claimed before losing quorum (7ac1d76), K5 cold-start churn (after 7ac1d76).
}

#: Known and not fixed yet; each has a strict-xfail reproduction in test_defects.py.
OPEN_DEFECTS: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Violation:
    t: float
    invariant: str
    detail: str
    known: str | None = None  # a KNOWN_DEFECTS key this violation is explained by

    def __str__(self) -> str:
        tag = f" [known {self.known}]" if self.known else ""
        return f"t={self.t:.4f} {self.invariant}{tag}: {self.detail}"


def stable_after(t: Timing) -> float:
    """How long after the last membership change the cluster is stable again (before the
    network's slack): a starter's wait, detection, agreement, a handover, a few beats."""
    return (
        max(t.startup_wait, t.mature_after)
        + t.dead_after
        + t.settle_time
        + t.handover_timeout
        + 4 * t.heartbeat_interval
    )


@dataclass(frozen=True)
class Bounds:
    converge: float
    handover: float
    heal: float
    failover: float
    slack: float

    @classmethod
    def from_sim(cls, sim: Sim) -> Bounds:
        t, net, params = sim.timing, sim.net, sim.params
        per_node = len(sim.pool) / max(1, len(sim.nodes)) + 2
        slack = (
            2 * (net.delay + net.jitter)
            + params.wakeup_latency
            + per_node * params.kernel_delay[1]
            + 0.05
        )
        return cls(
            converge=stable_after(t) + slack,
            handover=t.handover_timeout + t.settle_time + slack,
            heal=t.settle_time + 2 * t.heartbeat_interval + slack,
            failover=max(t.dead_after, t.startup_wait) + 2 * t.heartbeat_interval + slack,
            slack=slack,
        )


@dataclass
class Stats:
    stable_ticks: int = 0
    max_overlap: float = 0.0  # longest two-running-holder episode, s
    max_gap_planned: float = 0.0
    ghost_overlap: float = 0.0  # longest ghost + running holder episode, s
    moves_checked: int = 0


@dataclass
class _Snapshot:
    t: float
    placed: frozenset[str]
    holder: dict[str, str]  # group -> node


@dataclass
class Checker:
    sim: Sim
    bounds: Bounds = field(init=False)
    violations: list[Violation] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)
    max_violations: int = 20
    check_i6: bool = True

    def __post_init__(self) -> None:
        sim = self.sim
        self.bounds = Bounds.from_sim(sim)
        sim.checker = self
        self.addresses = [a for _, texts in sim.pool_text for a in texts]
        self.group_of = {a: g for g, texts in sim.pool_text for a in texts}
        self.texts_of = dict(sim.pool_text)
        self.roster = {m.name: m.weight for m in sim.nodes[sim.order[0]].config.roster}
        self.tiebreaker = min(self.roster)
        names = [g.name for g in sim.pool]
        self.home = assign(names, self.roster, roster=self.roster)
        self.overlap_since: dict[str, float] = {}
        self.gap_since: dict[str, float] = {}
        self.ghost_since: dict[str, float] = {}
        self._reported: set[tuple[str, str, float]] = set()
        self.excuse_end = 0.0
        self._excused = False
        self.gap_ok_until = 0.0
        self.gap_excused_at = 0.0
        # (deadline, address, survivor, overlap start, excuse epoch): client-entry checks
        # (due, address, survivor, overlap start, excuse epoch, overlap end)
        self._announce_due: list[tuple[float, str, str, float, int, float]] = []
        self._last_overlap: dict[str, float] = {}  # address -> start of its latest overlap
        self._excuse_epoch = 0  # counts excuses that began
        self.holddown_change = 0.0
        self._holddown: dict[int, bool] = {}
        self.snapshot: _Snapshot | None = None
        self.last_stable_ok: float | None = None
        self.period = sim.params.check_period or sim.timing.heartbeat_interval
        self._scan_all()
        sim.at(sim.now + self.period, self._tick_event)

    # --- bookkeeping -----------------------------------------------------------------------

    def fail(
        self,
        invariant: str,
        detail: str,
        key: tuple[str, str, float] | None = None,
        known: str | None = None,
    ) -> None:
        if key is not None:
            if key in self._reported:
                return
            self._reported.add(key)
        if len(self.violations) < self.max_violations:
            v = Violation(self.sim.now, invariant, detail, known)
            self.violations.append(v)
            self.sim.log("CHECK", f"VIOLATION {v}")

    def excuse_active(self) -> bool:
        sim = self.sim
        return (
            bool(sim.cuts)
            or sim.net.loss > sim.background_loss
            or any(n.stalled for n in sim.nodes.values())
        )

    def _live(self) -> list[Proc]:
        return [
            p
            for p in self.sim.procs()
            if p.open and not p.exiting and not p.core.leaving and not p.node.stalled
        ]

    def _quorum(self, live: int) -> bool:
        if self.sim.spec.policy == "all":
            return live > 0
        roster = len(self.roster)
        return 2 * live > roster or (
            2 * live == roster and any(p.name == self.tiebreaker for p in self._live())
        )

    def _scan(self, a: str, *, kernel_change: bool = False) -> None:
        """Open or close the gap / overlap / ghost episodes of one address."""
        sim, now = self.sim, self.sim.now
        holders = [sim.nodes[k] for k in sorted(sim.kernel_index.get(a, ()))]
        running = [n.name for n in holders if n.proc is not None]
        ghosts = len(holders) - len(running)
        self._episode(self.gap_since, a, not holders, now)
        ended = self._episode(self.overlap_since, a, len(running) >= 2, now)
        if a in self.overlap_since:
            self._last_overlap[a] = self.overlap_since[a]
        if ended is not None:
            self.stats.max_overlap = max(self.stats.max_overlap, now - ended)
            if kernel_change and len(running) == 1 and not self._excused:
                self._check_reannounce(a, running[0], ended)
        ended = self._episode(self.ghost_since, a, ghosts > 0 and len(holders) >= 2, now)
        if ended is not None:
            self.stats.ghost_overlap = max(self.stats.ghost_overlap, now - ended)

    @staticmethod
    def _episode(table: dict[str, float], a: str, on: bool, now: float) -> float | None:
        """Open or close an episode; returns the start of one that just ended."""
        if on and a not in table:
            table[a] = now
        elif not on and a in table:
            return table.pop(a)
        return None

    def _check_reannounce(self, a: str, survivor: str, since: float) -> None:
        """I3, second half: when a double holding ends by a release, clients must reach the
        one that keeps the address within `heal`: its frames came last (a claim, or a
        re-announce once it saw the other holder or the heal)."""
        self._announce_due.append(
            (self.sim.now + self.bounds.heal, a, survivor, since, self._excuse_epoch, self.sim.now)
        )

    def _settle_announcements(self) -> None:
        now, due = self.sim.now, self._announce_due
        while due and due[0][0] <= now:
            _, a, survivor, since, epoch, ended = due.pop(0)
            if sorted(self.sim.kernel_index.get(a, ())) != [survivor]:
                continue  # it let the address go meanwhile, or another overlap began
            if self.overlap_since.get(a, self._last_overlap.get(a, since)) > ended:
                continue  # a later overlap (its own check is due later) moved the client
            if self._excused or epoch != self._excuse_epoch:
                continue  # a new cut / burst / stall: clients may rightly point elsewhere
            client = self.sim.client_arp.get(a)
            if client != survivor:
                mine = [round(t, 4) for t, n in self.sim.announcements.get(a, []) if n == survivor]
                self.fail(
                    "I3-announce",
                    f"{self.group_of[a]} ({a}) was doubly held from t={since:.4f}; "
                    f"{survivor} kept it, but clients still point at {client} (whose frame "
                    f"came last); {survivor} announced it at {mine[-3:] or 'never'}",
                    key=("I3-announce", a, since),
                    known="K2",
                )

    def _scan_all(self) -> None:
        for a in self.addresses:
            self._scan(a)

    # --- after every event ---------------------------------------------------------------

    def after_event(self) -> None:
        sim = self.sim
        changed, addrs = sim.take_changes()
        if changed:
            excused = self.excuse_active()
            if self._excused and not excused:
                self.excuse_end = sim.now
            if excused and not self._excused:
                self._excuse_epoch += 1
            self._excused = excused
        for a in sorted(addrs):
            if a in self.group_of:
                self._scan(a, kernel_change=True)
        if changed:
            self._scan_all()
        self._check_episodes()

    def _tick_event(self) -> None:
        self._check_episodes()
        self._watch_holddown()
        if self.stable():
            self._check_stable()
        self.sim.at(self.sim.now + self.period, self._tick_event)

    def _check_episodes(self) -> None:
        sim, b, now = self.sim, self.bounds, self.sim.now
        if self._announce_due:
            self._settle_announcements()
        if self._gap_excused_now():
            self.gap_ok_until = max(self.gap_ok_until, now + b.converge)
            self.gap_excused_at = now
        ok_until = max(self.gap_ok_until, sim.last_unplanned + b.converge)
        for a, since in sorted(self.gap_since.items()):
            # Failover: an unserved address is claimed within the failover bound of the
            # moment it could be (its holder lost, the cluster connected and with quorum,
            # no fault since).
            start = max(
                since,
                self.gap_excused_at,
                sim.last_unplanned,
                sim.last_cold_start + sim.timing.mature_after,
            )
            if now > start + b.failover:
                self.fail(
                    "I1-failover",
                    f"{self.group_of[a]} ({a}) held by nobody since t={since:.4f}, longer than "
                    f"{b.failover:.3f} s after t={start:.4f}",
                    ("failover", a, since),
                )
        if self.gap_since and now > ok_until:
            for a, since in sorted(self.gap_since.items()):
                self.stats.max_gap_planned = max(self.stats.max_gap_planned, now - since)
                self.fail(
                    "I2",
                    f"{self.group_of[a]} ({a}) held by nobody since t={since:.4f}; gaps were "
                    f"excused until t={ok_until:.4f}",
                    ("I2", a, since),
                )
        if self.overlap_since and not self._excused:
            for a, since in sorted(self.overlap_since.items()):
                deadline = max(since + b.handover, self.excuse_end + b.heal)
                if now > deadline:
                    self.fail(
                        "I3",
                        f"{self.group_of[a]} ({a}) held by {sim.holders(a)} since "
                        f"t={since:.4f}; bound t={deadline:.4f} (last excuse ended "
                        f"t={self.excuse_end:.4f})",
                        ("I3", a, since),
                        self._overlap_defect(a),
                    )

    def _overlap_defect(self, a: str) -> str | None:
        """K6: the group's owner in the holders' view is a member still in its startup wait,
        so every current holder keeps it (make-before-break) until that member is ready."""
        group = self.group_of[a]
        for name in self.sim.holders(a):
            proc = self.sim.nodes[name].proc
            if proc is None:
                continue
            owner = proc.controller.owners(proc.core).get(group)
            joiner = self.sim.nodes[owner].proc if owner else None
            if owner != name and joiner is not None and not joiner.core.ready:
                return "K6"
        return None

    def _gap_excused_now(self) -> bool:
        """Gaps are allowed now, and for `converge` after: an excuse is active, or nobody
        live could serve, or the live set lacks quorum under the policy."""
        if self._excused:
            return True
        live = self._live()
        return not live or not self._quorum(len(live))

    def _watch_holddown(self) -> None:
        for p in self.sim.procs():
            on = p.core.holddown_until is not None
            if self._holddown.get(p.pid, False) != on:
                self._holddown[p.pid] = on
                self.holddown_change = self.sim.now
                self.sim.log(p.name, f"(checker) hold-down {'began' if on else 'ended'}")

    # --- stable-state checks -------------------------------------------------------------

    def unstable_reasons(self) -> list[str]:
        sim, now, c = self.sim, self.sim.now, self.bounds.converge
        why: list[str] = []
        if self.excuse_active():
            why.append("a cut, loss burst or stall is active")
        if now < sim.last_change + c:
            why.append(f"last change at t={sim.last_change:.3f}")
        if now < self.holddown_change + c:
            why.append(f"hold-down changed at t={self.holddown_change:.3f}")
        for n in sim.nodes.values():
            if n.machine_up and n.proc is None and any(a in self.group_of for a in n.kernel):
                why.append(f"{n.name} is a ghost (crashed daemon, addresses in its kernel)")
        for p in sim.procs():
            if not p.open or p.exiting or p.core.leaving:
                why.append(f"{p.name} is starting or leaving")
        return why

    def stable(self) -> bool:
        return not self.unstable_reasons()

    def _check_stable(self) -> None:
        sim, now = self.sim, self.sim.now
        self.stats.stable_ticks += 1
        before = len(self.violations)
        live = self._live()
        if not live:
            self.last_stable_ok = now
            return
        # I4: one view and one placement among the members that take part.
        # Passive (a losing config digest) and duplicated (a second instance of the node
        # runs) daemons hold nothing by design.
        active = [p for p in live if not p.core.config_passive and not p.core.duplicate]
        if not active:
            self.fail("I4", "every live daemon is passive (config mismatch)")
            return
        ref = active[0]
        digest = ref.core.view.digest
        owners = ref.controller.owners(ref.core)
        for p in active[1:]:
            if p.core.view.digest != digest:
                self.fail(
                    "I4",
                    f"{p.name} view {p.core.view.members} != {ref.name} view "
                    f"{ref.core.view.members}",
                )
            elif p.controller.owners(p.core) != owners:
                self.fail("I4", f"{p.name} places the pool differently from {ref.name}")
        not_held_down = [p.name for p in active if p.core.holddown_until is None]
        placed = sorted(not_held_down or [p.name for p in active])
        if list(ref.core.view.members) != placed:
            self.fail("I4", f"view {ref.core.view.members} != live placed members {placed}")
        # I1: exactly one holder, the owner (or none without quorum).
        quorum = self._quorum(len(live))
        live_names = {p.name for p in live}
        holders = sim.owner_of()
        for g in sim.pool:
            who = holders[g.name]
            if not quorum:
                if who:
                    self.fail("I1", f"{g.name} held by {who} though the live set has no quorum")
            elif len(who) != 1 or who[0] not in live_names:
                self.fail("I1", f"{g.name} held by {who}, not by exactly one live node")
            elif who[0] != owners.get(g.name):
                self.fail(
                    "I1",
                    f"{g.name} held by {who[0]} but placed on {owners.get(g.name)}",
                )
            else:
                for a in self.texts_of[g.name]:
                    stale = sim.client_arp.get(a)
                    if stale != who[0]:
                        self.fail(
                            "I1-client",
                            f"{g.name} ({a}) held by {who[0]}, but the client's neighbour "
                            f"entry points at {stale}",
                            ("I1-client", a, 0.0),
                            known="K7" if self._pulled_away_then_died(who[0], stale, a) else "K2",
                        )
        holding = {p: [g for g, w in holders.items() if p in w] for p in placed}
        # I5: balance among the placed members.
        if quorum and sim.spec.equal_weights:
            counts = {p: len(gs) for p, gs in holding.items()}
            if counts and max(counts.values()) - min(counts.values()) > 1:
                self.fail("I5", f"holdings differ by more than one: {counts}")
        if len(self.violations) == before:
            self.last_stable_ok = now
            if quorum and self.check_i6:
                self._check_movement(now, frozenset(placed), holders)

    def _pulled_away_then_died(self, holder: str, stale: str | None, address: str) -> bool:
        """K7: the client was last told `stale`'s MAC by frames `stale` sent while `holder`
        could not hear it (a heartbeat-only partition, policy "all"), and `stale` is gone
        since, so no heartbeat ever showed `holder` the overlap."""
        sim = self.sim
        if stale is None or sim.nodes[stale].running:
            return False
        frames = [t for t, who in sim.announcements.get(address, []) if who == stale]
        lost = joined = -1.0
        for t, who, text in sim.trace.lines:
            if who == holder and f"(name='{stale}'" in text:
                if text.startswith("MemberLost"):
                    lost = t
                elif text.startswith("MemberJoined"):
                    joined = t
        return bool(frames) and lost > joined and frames[-1] > lost

    def _check_movement(
        self, now: float, placed: frozenset[str], holders: dict[str, list[str]]
    ) -> None:
        """I6 between this stable state and the previous one."""
        if not self.sim.spec.equal_weights:
            return
        holder = {g: w[0] for g, w in holders.items() if w}
        prev, self.snapshot = self.snapshot, _Snapshot(now, placed, holder)
        if prev is None:
            return
        moved = sorted(g for g in holder if prev.holder.get(g) != holder[g])
        if not moved:
            return
        self.stats.moves_checked += 1
        if prev.placed == placed:
            self.fail(
                "I6",
                f"{len(moved)} groups moved between stable states with the same members "
                f"{sorted(placed)} (t={prev.t:.3f} -> now): {moved[:8]}",
            )
            return
        changed = prev.placed ^ placed
        if len(changed) != 1:
            return  # several members changed: only the final placement is checked (I1)
        (member,) = changed
        both = prev.placed & placed
        bad = [
            g
            for g in moved
            if prev.holder.get(g) != member and holder[g] != member and self.home[g] in both
        ]
        if bad:
            verb = "joined" if member in placed else "left"
            self.fail(
                "I6",
                f"{member} {verb}; groups homed on members that stayed moved too: "
                + ", ".join(f"{g} {prev.holder.get(g)}->{holder[g]}" for g in bad[:8]),
            )

    def check_now(self) -> list[Violation]:
        """Run the stable-state checks (I1, I4, I5, I6) now, without waiting `converge`:
        for runs that assert convergence faster than the general bound. Nothing may be
        starting, leaving or stalled, and no excuse active."""
        busy = [
            r for r in self.unstable_reasons() if not r.startswith(("last change", "hold-down"))
        ]
        if busy:
            self.fail("liveness", "check_now in an unsettled state: " + "; ".join(busy))
        else:
            self._check_stable()
        return self.violations

    # --- the end of a run ----------------------------------------------------------------

    def finish(self) -> list[Violation]:
        """Liveness: the run must end in a stable state that passed the stable checks."""
        self.after_event()
        reasons = self.unstable_reasons()
        if reasons:
            self.fail("liveness", "not stable at the end: " + "; ".join(reasons))
        else:
            self._check_stable()
            if self.last_stable_ok is None or not math.isclose(self.last_stable_ok, self.sim.now):
                self.fail("liveness", "the final state did not pass I1/I4/I5")
        return self.violations
