"""A deterministic simulator of N vipd nodes on one virtual clock: no sockets, no sleeping.

Model
-----
Each node runs the real pure stack, wired the way `vipd.daemon` and
`vipd.membership.driver` wire it:

- `MembershipCore` + `Controller` per daemon run (`Proc`), and a simulated kernel address table
  per machine (`SimNode.kernel`, the ground truth the invariants are checked on).
- Driver: a datagram wakes the loop (after `SimParams.wakeup_latency`), which feeds up to
  `MAX_READS` queued datagrams to `core.receive`, then runs the daemon step; the core's timer
  fires at `core.get_timer()` (re-armed after every flush, as the driver does) and calls
  `core.handle_timer`; the daemon's own deadline timer fires at `controller.next_deadline()`
  or the stop deadline.
- Daemon step (`Daemon._step`): drain `core.next_event()` into `controller.observe`, then
  `controller.decide(core, held, now)`; a new `decision.hold` becomes the target, and an apply
  pass (`Daemon._apply_loop`/`_apply_once`) turns it into `vipd.placement.handover.plan` orders
  carried out one at a time, each taking `SimParams.kernel_delay` (netlink on one worker
  thread); after
  the pass `core.set_held(...)` and another step. Claims and `decision.announce` are recorded
  as announcements (GARP/NA).
- Start: the daemon lists the pool addresses the kernel still has (a crashed earlier run's),
  removes them all (`Daemon._remove_stale`), then opens its socket and takes part.
- Graceful stop: `core.leave()`, exit once nothing is held or at handover_timeout + STOP_GRACE;
  on exit whatever is still held is released and a last heartbeat is flushed.

Announcer (`vipd.arp.announcer`): a claim or a `decision.announce` sends one frame at once and
repeats at `config.announce.schedule` (0, 0.05, 1, 2, 5 s); a new announce restarts the
schedule, a release or `decision.quiet` (the group starts moving away) cancels it, a crash
or exit ends it, a stall delays it. One client hears
every frame from a machine that is up (it is not behind any cut) and keeps, per address, the
node whose frame came last: its neighbour entry (`Sim.client_arp`).

Network: every datagram is multicast to every other machine; per receiver it may be lost
(`loss`), delayed by `delay + U(0, jitter)` (jitter larger than the send gap reorders), and
duplicated (`dup`, the copy with its own delay). Cuts are directed (sender, receiver) pairs
checked when a datagram is sent: a partition cuts both ways between sides, a one-way cut only
one. A stalled node's socket buffer keeps at most `rcvbuf` datagrams (drop-tail).

Faults: `crash` (SIGKILL: the process is gone, its kernel addresses stay: "ghosts"),
`machine_down` / `machine_up` (link cut / power: addresses gone with it, nothing delivered),
`start` (a new incarnation, rising like the daemon's with a state_dir, after the stale-address
cleanup), `leave` (graceful stop), `partition` / `isolate` / `cut` (one-way) / `heal`,
`set_loss` (a loss burst above the background level), `stall` (the loop does not run for S
seconds: timers fire late, the inbox queues; on resume the timer runs before the queued
datagrams, the worst order), and per-node clock skew (`wall = WALL0 + now + skew`, `set_skew`
steps it).

Not modelled: the reconcile loop's drift repair (nobody deletes addresses by hand here), hooks,
the control socket, unicast transport, IPv4/ARP specifics (one address per group, IPv6 text),
clients behind a cut (the one client hears every machine), per-datagram CPU time (the loop is
infinitely fast between `wakeup_latency` batches), kernel socket buffers in bytes.

Everything random comes from one `random.Random(seed)`; every iteration over nodes is in name
order, so a seed replays exactly (also in another process: no set of strings is iterated).
"""

from __future__ import annotations

import heapq
import ipaddress
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from tests.sim.cluster import ClusterSpec, node_key, node_public_key
from vipd.config import Config, IPInterface
from vipd.daemon import STOP_GRACE
from vipd.membership import events as ev
from vipd.membership.core import MembershipCore
from vipd.node.defend import DefendPolicy
from vipd.placement.controller import Controller
from vipd.placement.handover import ClaimAddress, ReleaseAddress, plan

if TYPE_CHECKING:
    from tests.sim.invariants import Checker

WALL0 = 1_800_000_000.0  # Unix time at virtual t = 0
MAX_READS = 64  # datagrams per loop wakeup, as MembershipDriver.MAX_READS_PER_WAKEUP


@dataclass
class NetParams:
    loss: float = 0.0  # per datagram and receiver
    delay: float = 0.0005  # one-way base delay, s
    jitter: float = 0.0005  # extra uniform delay 0..jitter, s
    dup: float = 0.0  # probability that a receiver gets a second copy
    rcvbuf: int = 256  # datagrams a receiver's socket keeps while its loop does not run


@dataclass
class SimParams:
    kernel_delay: tuple[float, float] = (0.001, 0.005)  # one netlink add/remove, s
    wakeup_latency: float = 0.0  # datagram arrival -> loop reads it (batches arrivals)
    check_period: float | None = None  # periodic invariant tick; None: heartbeat_interval
    trace_datagrams: bool = False  # also log every delivery (large)


@dataclass
class Proc:
    """One run of the daemon on a node, from start to exit or crash."""

    pid: int
    node: SimNode
    core: MembershipCore
    controller: Controller
    actual: dict[str, set[IPInterface]]  # the daemon's idea of the kernel (pool only)
    target: frozenset[str] = frozenset()
    open: bool = False  # socket open: after the stale-address cleanup
    applying: bool = False
    dirty: bool = False
    ops: deque[ClaimAddress | ReleaseAddress] = field(default_factory=deque)
    after_apply: Callable[[], None] | None = None
    inbox: deque[tuple[bytes, str]] = field(default_factory=deque)
    wakeup_pending: bool = False
    timer_at: float | None = None
    timer_gen: int = 0
    deadline_at: float | None = None
    deadline_gen: int = 0
    stop_deadline: float | None = None
    exiting: bool = False
    reason: str = ""
    # Work that came due while the loop was stalled, run on resume (timers first).
    missed_timer: bool = False
    missed_deadline: bool = False
    missed_op: ClaimAddress | ReleaseAddress | None = None
    _held: frozenset[str] | None = None  # cache of held_groups(); reset when `actual` changes
    bursts: dict[str, int] = field(default_factory=dict)  # address -> running announce schedule
    index: dict[str, int] = field(default_factory=dict)  # group name -> wire index
    defend: DefendPolicy | None = None  # Daemon.defend (the conflict listener's rate limit)

    @property
    def name(self) -> str:
        return self.node.name

    def held_groups(self) -> frozenset[str]:
        """`Daemon._held_groups`: groups with every address present (as the daemon believes)."""
        if self._held is None:
            self._held = frozenset(
                g.name
                for g in self.node.config.pool
                if all(a in self.actual.get(g.interface, ()) for a in g.addresses)
            )
        return self._held


@dataclass
class SimNode:
    name: str
    config: Config
    skew: float = 0.0
    machine_up: bool = True
    kernel: set[str] = field(default_factory=set)  # address texts, e.g. "2001:db8::2/128"
    proc: Proc | None = None
    stalled_until: float | None = None
    last_incarnation: int = 0

    @property
    def stalled(self) -> bool:
        return self.stalled_until is not None

    @property
    def running(self) -> bool:
        """A daemon process exists (maybe stalled, starting or leaving)."""
        return self.machine_up and self.proc is not None


class Trace:
    """What happened, one line per fact: faults, kernel changes, membership and decisions."""

    def __init__(self) -> None:
        self.lines: list[tuple[float, str, str]] = []

    def log(self, t: float, who: str, text: str) -> None:
        self.lines.append((t, who, text))

    def format(self, last: int | None = None) -> str:
        lines = self.lines if last is None else self.lines[-last:]
        return "\n".join(f"{t:10.4f} {who:>6} {text}" for t, who, text in lines)

    def write(self, path: Path, header: str = "") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text((header + "\n" if header else "") + self.format() + "\n")


# Events worth a trace line (PacketRejected is counted, not logged one by one).
_TRACED = (
    ev.MemberJoined,
    ev.MemberRestarted,
    ev.MemberLost,
    ev.ViewChanged,
    ev.BecameReady,
    ev.BecameMature,
    ev.ConfigMismatch,
    ev.LoopStalled,
    ev.SelfDisrupted,
    ev.HolddownStarted,
    ev.ClockSkew,
)


class Sim:
    """N nodes, one network, one virtual clock, one event queue."""

    def __init__(
        self,
        spec: ClusterSpec,
        *,
        seed: int = 0,
        net: NetParams | None = None,
        params: SimParams | None = None,
        skews: dict[str, float] | None = None,
        configs: dict[str, Config] | None = None,
    ) -> None:
        self.spec = spec
        self.seed = seed
        self.rng = random.Random(seed)
        self.net = net or NetParams()
        self.params = params or SimParams()
        self.timing = spec.timing
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._pid = 0
        self.trace = Trace()
        self.nodes: dict[str, SimNode] = {}
        for name in spec.names:
            config = (configs or {}).get(name) or spec.config(name)
            self.nodes[name] = SimNode(name, config, skew=(skews or {}).get(name, 0.0))
        self.order = tuple(sorted(self.nodes))
        #: The reference pool (the spec's): the addresses the invariants are about.
        self.pool = spec.config(spec.names[0]).pool
        self.pool_text = [(g.name, tuple(str(a) for a in g.addresses)) for g in self.pool]
        #: Ground truth index: address text -> machines whose kernel has it.
        self.kernel_index: dict[str, set[str]] = {}
        self._texts: dict[int, dict[str, tuple[str, str, IPInterface]]] = {}
        self.cuts: set[tuple[str, str]] = set()
        self.background_loss = self.net.loss
        self.counters: dict[str, int] = {"delivered": 0, "lost": 0, "cut": 0, "rcvbuf_drops": 0}
        # Announcement frames (GARP/NA) per address text: (time, node), for the heal checks,
        # and the client's neighbour entry: the node whose frame it heard last.
        self.announcements: dict[str, list[tuple[float, str]]] = {}
        self.client_arp: dict[str, str] = {}
        self._burst_gen = 0
        # Fault clock for the checker: last unplanned fault (start or end) and last change.
        self.last_unplanned = 0.0
        self.last_change = 0.0
        self.last_cold_start = 0.0  # a start with no other daemon serving
        self.checker: Checker | None = None
        self._state_changed = True
        self._kernel_changed: set[str] = set()

    # --- event queue -----------------------------------------------------------------------

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (max(t, self.now), self._seq, fn))

    def run_until(self, t_end: float) -> None:
        queue = self._queue
        while queue and queue[0][0] <= t_end:
            t, _, fn = heapq.heappop(queue)
            self.now = t
            fn()
            if self.checker is not None and (self._state_changed or self._kernel_changed):
                self.checker.after_event()
        self.now = t_end
        if self.checker is not None:
            self.checker.after_event()

    def run(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    def take_changes(self) -> tuple[bool, set[str]]:
        """For the checker: did node states change, which addresses' holders changed."""
        changed, addrs = self._state_changed, self._kernel_changed
        self._state_changed, self._kernel_changed = False, set()
        return changed, addrs

    def wall(self, node: SimNode) -> float:
        return WALL0 + self.now + node.skew

    def log(self, who: str, text: str) -> None:
        self.trace.log(self.now, who, text)

    def _mark(self, planned: bool) -> None:
        self._state_changed = True
        self.last_change = self.now
        if not planned:
            self.last_unplanned = self.now

    # --- faults and operator actions --------------------------------------------------------

    def start(self, name: str, *, planned: bool | None = None) -> None:
        """Start the daemon (a new incarnation). A start with no other daemon serving is a
        cold start (unplanned: the pool is unserved until it matures); else a planned join."""
        node = self.nodes[name]
        if node.proc is not None or not node.machine_up:
            raise RuntimeError(f"{name} cannot start: running or machine down")
        others = any(n.running and n.proc and n.proc.open for n in self.nodes.values())
        if planned is None:
            planned = others
        if not others:
            self.last_cold_start = self.now
        # The incarnation is the start time in ms, at least one more than the last (state_dir).
        incarnation = max(int(self.wall(node) * 1000), node.last_incarnation + 1)
        node.last_incarnation = incarnation
        self._pid += 1
        core = MembershipCore(
            node.config,
            node_key(name),
            node_public_key(name),
            incarnation=incarnation,
            now=self.now,
            rng=random.Random(self.rng.getrandbits(64)),
        )
        actual: dict[str, set[IPInterface]] = {g.interface: set() for g in node.config.pool}
        texts = self._pool_texts(node.config)
        stale = sorted(a for a in node.kernel if a in texts)
        for a in stale:
            _, iface, addr = texts[a]
            actual[iface].add(addr)
        proc = Proc(self._pid, node, core, Controller(node.config), actual)
        proc.defend = DefendPolicy(node.config.announce.defend_interval)
        proc.index = {g.name: i for i, g in enumerate(node.config.pool)}
        node.proc = proc
        self.log(
            name,
            f"START incarnation={incarnation} stale={stale} {'join' if planned else 'cold start'}",
        )
        self._mark(planned)
        # Daemon.run: remove stale addresses (target empty), then open the socket and step.
        if stale:
            self._apply(proc, then=lambda: self._opened(proc))
        else:
            self._opened(proc)  # plan() would find nothing to do

    def _opened(self, proc: Proc) -> None:
        proc.open = True
        self._flush(proc)
        self._step(proc)

    def crash(self, name: str) -> None:
        """SIGKILL of the daemon: the process is gone, its kernel addresses stay."""
        node = self.nodes[name]
        if node.proc is None:
            return
        self.log(name, f"CRASH (kernel keeps {len(node.kernel)} addresses)")
        node.proc = None
        node.stalled_until = None
        self._mark(planned=False)

    def machine_down(self, name: str) -> None:
        """The machine is gone (link cut, power): its addresses go with it."""
        node = self.nodes[name]
        self.log(name, "MACHINE DOWN")
        node.proc = None
        node.stalled_until = None
        node.machine_up = False
        self._kernel_changed |= node.kernel
        for a in node.kernel:
            self.kernel_index[a].discard(name)
        node.kernel = set()
        self._mark(planned=False)

    def machine_up(self, name: str, *, start: bool = True) -> None:
        node = self.nodes[name]
        self.log(name, "MACHINE UP")
        node.machine_up = True
        self._mark(planned=False)
        if start:
            self.start(name, planned=False)

    def leave(self, name: str) -> None:
        """Graceful stop (SIGTERM): hand over make-before-break, then exit."""
        node = self.nodes[name]
        proc = node.proc
        if proc is None or proc.core.leaving:
            return
        self.log(name, f"LEAVE held={sorted(proc.held_groups())}")
        self._mark(planned=True)
        proc.core.leave()
        proc.stop_deadline = self.now + self.timing.handover_timeout + STOP_GRACE
        if not proc.open:
            return  # still removing stale addresses: the first step sees `leaving`
        if node.stalled:
            proc.missed_deadline = True
        else:
            self._step(proc)

    def partition(self, *sides: Iterable[str]) -> None:
        """Cut both ways between the sides; nodes in no side form one more side together."""
        groups = [set(s) for s in sides]
        rest = set(self.order) - set().union(*groups)
        if rest:
            groups.append(rest)
        side_of = {n: i for i, g in enumerate(groups) for n in g}
        self.cuts = {(a, b) for a in self.order for b in self.order if side_of[a] != side_of[b]}
        self.log("-", f"PARTITION {' | '.join(','.join(sorted(g)) for g in groups)}")
        self._mark(planned=False)

    def isolate(self, name: str) -> None:
        """Cut one node off both ways (its link stays up: nothing local tells it)."""
        self.cuts |= {(name, o) for o in self.order if o != name}
        self.cuts |= {(o, name) for o in self.order if o != name}
        self.log(name, "ISOLATE")
        self._mark(planned=False)

    def cut(self, sender: str, receiver: str) -> None:
        """One-way cut: `receiver` stops hearing `sender`."""
        self.cuts.add((sender, receiver))
        self.log("-", f"CUT {sender} -> {receiver}")
        self._mark(planned=False)

    def heal(self) -> None:
        self.cuts = set()
        self.log("-", "HEAL")
        self._mark(planned=False)

    def set_loss(self, loss: float) -> None:
        """Loss above the background level counts as a fault (a loss burst)."""
        self.net.loss = loss
        self.log("-", f"LOSS {loss:.2f}")
        self._mark(planned=False)

    def stall(self, name: str, seconds: float) -> None:
        """The node's loop does not run for `seconds` (GC, CPU starvation, SIGSTOP)."""
        node = self.nodes[name]
        if node.proc is None:
            return
        end = self.now + seconds
        if node.stalled_until is not None and node.stalled_until >= end:
            return
        node.stalled_until = end
        self.log(name, f"STALL {seconds:.3f} s")
        self._mark(planned=False)
        proc = node.proc
        self.at(end, lambda: self._resume(node, proc, end))

    def set_skew(self, name: str, skew: float) -> None:
        self.nodes[name].skew = skew
        self.log(name, f"SKEW {skew:+.3f} s")
        self._mark(planned=False)

    # --- the network -----------------------------------------------------------------------

    def _broadcast(self, sender: SimNode, data: bytes) -> None:
        net, rng, now = self.net, self.rng, self.now
        for name in self.order:
            if name == sender.name:
                continue
            dst = self.nodes[name]
            if not dst.machine_up:
                continue
            if (sender.name, name) in self.cuts:
                self.counters["cut"] += 1
                continue
            if net.loss and rng.random() < net.loss:
                self.counters["lost"] += 1
                continue
            copies = 2 if net.dup and rng.random() < net.dup else 1
            for _ in range(copies):
                delay = net.delay + (rng.random() * net.jitter if net.jitter else 0.0)
                self.at(now + delay, partial(self._deliver, dst, data, sender.name))

    def _deliver(self, node: SimNode, data: bytes, source: str) -> None:
        proc = node.proc
        if proc is None or not proc.open or not node.machine_up:
            return
        if len(proc.inbox) >= self.net.rcvbuf:
            self.counters["rcvbuf_drops"] += 1
            return
        self.counters["delivered"] += 1
        if self.params.trace_datagrams:
            self.log(node.name, f"rx from {source} ({len(data)} bytes)")
        proc.inbox.append((data, source))
        if not proc.wakeup_pending and not node.stalled:
            proc.wakeup_pending = True
            self.at(self.now + self.params.wakeup_latency, lambda: self._on_readable(proc))

    # --- the daemon's loop -----------------------------------------------------------------

    def _alive(self, proc: Proc) -> bool:
        return proc.node.proc is proc and proc.node.machine_up

    def _on_readable(self, proc: Proc) -> None:
        proc.wakeup_pending = False
        if not self._alive(proc) or proc.node.stalled:
            return
        core, node = proc.core, proc.node
        for _ in range(MAX_READS):
            if not proc.inbox:
                break
            data, source = proc.inbox.popleft()
            core.receive(data, source, now=self.now, wall=self.wall(node))
        self._step(proc)
        if proc.inbox and not proc.wakeup_pending:
            proc.wakeup_pending = True
            self.at(self.now, lambda: self._on_readable(proc))

    def _on_timer(self, proc: Proc, gen: int) -> None:
        if not self._alive(proc) or gen != proc.timer_gen:
            return
        if proc.node.stalled:
            proc.missed_timer = True
            return
        proc.timer_at = None
        proc.core.handle_timer(now=self.now)
        self._step(proc)

    def _on_deadline(self, proc: Proc, gen: int) -> None:
        if not self._alive(proc) or gen != proc.deadline_gen:
            return
        if proc.node.stalled:
            proc.missed_deadline = True
            return
        proc.deadline_at = None
        self._step(proc)

    def _resume(self, node: SimNode, proc: Proc, end: float) -> None:
        if node.stalled_until != end:
            return  # extended, or the process died meanwhile
        node.stalled_until = None
        self.log(node.name, "RESUME")
        self._mark(planned=False)
        if not self._alive(proc):
            return
        # The worst order: overdue timers first, then the work that queued up.
        if proc.missed_timer or (proc.timer_at is not None and proc.timer_at <= self.now):
            proc.missed_timer = False
            proc.timer_at = None
            proc.timer_gen += 1
            proc.core.handle_timer(now=self.now)
            self._step(proc)
        if proc.missed_deadline:
            proc.missed_deadline = False
            self._step(proc)
        if proc.missed_op is not None:
            op, proc.missed_op = proc.missed_op, None
            self._op_continue(proc, op)
        if proc.inbox and not proc.wakeup_pending:
            proc.wakeup_pending = True
            self.at(self.now, lambda: self._on_readable(proc))

    def _step(self, proc: Proc) -> None:
        """`Daemon._step`: events, decide, maybe finish a stop, arm the deadline, flush."""
        core, ctl, name = proc.core, proc.controller, proc.name
        while (event := core.next_event()) is not None:
            ctl.observe(event, self.now)
            if isinstance(event, _TRACED):
                self.log(name, repr(event))
        if proc.exiting:
            self._flush(proc)
            return
        decision = ctl.decide(core, proc.held_groups(), self.now)
        for o in decision.outcomes:
            self.log(name, f"handover {o.group} -> {o.new_owner}: {o.how}")
        if decision.reason != proc.reason:
            self.log(name, f"holding: {decision.reason}")
            proc.reason = decision.reason
        for g in decision.quiet:  # Daemon._replan: announcer.cancel for a group moving away
            for group in proc.node.config.pool:
                if group.name == g:
                    for a in group.addresses:
                        proc.bursts.pop(str(a), None)
        for g in decision.announce:
            self._announce(proc, g, "reannounce")
        if decision.hold != proc.target:
            proc.target = decision.hold
            self._apply(proc, then=lambda: self._step(proc))
        if core.leaving and not proc.target and not any(proc.actual.values()):
            self._exit(proc, "left")
        elif proc.stop_deadline is not None and self.now >= proc.stop_deadline:
            self._exit(proc, "stop deadline passed")
        else:
            self._arm_deadline(proc)
        self._flush(proc)

    def _arm_deadline(self, proc: Proc) -> None:
        pending = [d for d in (proc.controller.next_deadline(), proc.stop_deadline) if d]
        when = min(pending) if pending else None
        if when == proc.deadline_at:
            return
        proc.deadline_at = when
        proc.deadline_gen += 1
        if when is not None:
            gen = proc.deadline_gen
            self.at(when, lambda: self._on_deadline(proc, gen))

    def _flush(self, proc: Proc) -> None:
        """`MembershipDriver.flush`: send what is due, re-arm the core's timer."""
        if not proc.open or not self._alive(proc):
            return
        node = proc.node
        for data in proc.core.datagrams_to_send(now=self.now, wall=self.wall(node)):
            self._broadcast(node, data)
        when = proc.core.get_timer()
        if when == proc.timer_at:
            return
        proc.timer_at = when
        proc.timer_gen += 1
        gen = proc.timer_gen
        self.at(when, lambda: self._on_timer(proc, gen))

    def _exit(self, proc: Proc, why: str) -> None:
        """`Daemon._shutdown`: release whatever is still held, flush a last heartbeat, exit."""
        if proc.exiting:
            return
        proc.exiting = True
        self.log(proc.name, f"EXITING ({why}) held={sorted(proc.held_groups())}")
        proc.target = frozenset()
        self._apply(proc, then=lambda: self._exited(proc))

    def _exited(self, proc: Proc) -> None:
        proc.bursts.clear()  # announcer.close()
        self._flush(proc)
        proc.open = False
        proc.node.proc = None
        self.log(proc.name, "EXITED")
        self._mark(planned=True)

    # --- the kernel ------------------------------------------------------------------------

    def _apply(self, proc: Proc, then: Callable[[], None]) -> None:
        """`Daemon._apply_loop`: one pass at a time; a change during a pass runs another."""
        proc.after_apply = then
        if proc.applying:
            proc.dirty = True
            return
        self._start_pass(proc)

    def _start_pass(self, proc: Proc) -> None:
        proc.applying, proc.dirty = True, False
        proc.ops = deque(plan(proc.node.config.pool, proc.target, proc.actual))
        self._next_op(proc)

    def _next_op(self, proc: Proc) -> None:
        if proc.ops:
            op = proc.ops[0]
            if isinstance(op, ReleaseAddress):
                proc.bursts.pop(str(op.address), None)  # Daemon._release: announcer.cancel
            lo, hi = self.params.kernel_delay
            self.at(self.now + lo + self.rng.random() * (hi - lo), lambda: self._op_done(proc, op))
            return
        # Pass complete: tell the core what we hold (announced at once), then step again.
        index = proc.index
        proc.core.set_held(frozenset(index[g] for g in proc.held_groups()), now=self.now)
        proc.applying = False
        if proc.dirty:
            # The target changed during the pass: the daemon steps, then applies again.
            if proc.open and not proc.exiting:
                self._step(proc)
            if not proc.applying:
                self._start_pass(proc)
            return
        then, proc.after_apply = proc.after_apply, None
        if then is not None:
            then()

    def _op_done(self, proc: Proc, op: ClaimAddress | ReleaseAddress) -> None:
        node = proc.node
        # The kernel carries out a request already sent, whatever became of the process.
        if node.machine_up:
            text = str(op.address)
            claim = isinstance(op, ClaimAddress)
            if (text in node.kernel) != claim:
                if claim:
                    node.kernel.add(text)
                    self.kernel_index.setdefault(text, set()).add(node.name)
                else:
                    node.kernel.discard(text)
                    self.kernel_index[text].discard(node.name)
                self._kernel_changed.add(text)
                self.log(node.name, f"kernel {'claim' if claim else 'release'} {op.group} {text}")
        if not self._alive(proc):
            return
        if node.stalled:
            proc.missed_op = op
            return
        self._op_continue(proc, op)

    def _op_continue(self, proc: Proc, op: ClaimAddress | ReleaseAddress) -> None:
        if proc.ops and proc.ops[0] is op:
            proc.ops.popleft()
        proc._held = None
        if isinstance(op, ClaimAddress):
            proc.actual.setdefault(op.interface, set()).add(op.address)
            self._announce(proc, op.group, "claim")
        else:
            proc.actual.get(op.interface, set()).discard(op.address)
        self._next_op(proc)

    def _announce(self, proc: Proc, group: str, why: str) -> None:
        """`Announcer.announce` for each address of the group: a frame now, repeats at the
        configured offsets; a new announce restarts the schedule, a release cancels it."""
        if why != "claim":
            self.log(proc.name, f"{why} {group}")
        for g in proc.node.config.pool:
            if g.name != group:
                continue
            for a in g.addresses:
                text = str(a)
                self._burst_gen += 1
                gen = self._burst_gen
                proc.bursts[text] = gen
                for offset in proc.node.config.announce.schedule:
                    if offset <= 0:
                        self._garp(proc, text, gen)
                    else:
                        self.at(self.now + offset, partial(self._garp, proc, text, gen))

    def _garp(self, proc: Proc, address: str, gen: int) -> None:
        """One gratuitous ARP / unsolicited NA frame: the client's entry now points here."""
        if not self._alive(proc) or proc.bursts.get(address) != gen:
            return
        node = proc.node
        if node.stalled_until is not None:
            # A repeat is a loop timer: it goes out when the loop runs again.
            self.at(node.stalled_until, lambda: self._garp(proc, address, gen))
            return
        self._frame(proc, address)

    def _frame(self, proc: Proc, address: str) -> None:
        """An announcement frame leaves `proc`: the client's entry now points there, and
        every other running daemon's conflict listener hears it (one L2 segment)."""
        self.announcements.setdefault(address, []).append((self.now, proc.name))
        self.client_arp[address] = proc.name
        for other in self.procs():
            if other is proc or not other.open:
                continue
            if other.node.stalled_until is not None:  # its loop reads the frame on resume
                self.at(other.node.stalled_until, partial(self._sighting, other, address))
            else:
                self._sighting(other, address)

    def _defends(self, proc: Proc, address: str) -> bool:
        """`Daemon._defending`: owned by placement and held."""
        entry = self._pool_texts(proc.node.config).get(address)
        return (
            entry is not None
            and entry[0] in proc.controller.owned
            and entry[0] in proc.held_groups()
        )

    def _sighting(self, proc: Proc, address: str) -> None:
        """`Daemon._on_sighting`: another MAC announced an address: defend it now or when
        the defend interval ends."""
        assert proc.defend is not None
        entry = self._pool_texts(proc.node.config).get(address)
        if entry is None:
            return
        ip = entry[2].ip
        if not self._defends(proc, address):
            if len(proc.defend):
                proc.defend.forget(ip)
            return
        when = proc.defend.on_conflict(ip, self.now)
        if when is not None:
            self.at(when, partial(self._defend, proc, address))

    def _defend(self, proc: Proc, address: str) -> None:
        """`Daemon._defend_address`: one announcement (`announce_once`), schedule untouched."""
        if not self._alive(proc) or proc.node.proc is not proc or proc.exiting:
            return
        if proc.node.stalled_until is not None:
            self.at(proc.node.stalled_until, partial(self._defend, proc, address))
            return
        if not self._defends(proc, address):
            return
        assert proc.defend is not None
        proc.defend.defended(self._pool_texts(proc.node.config)[address][2].ip, self.now)
        self.log(proc.name, f"defend {address}")
        self._frame(proc, address)

    # --- views for the checker and the tests -------------------------------------------------

    def procs(self) -> list[Proc]:
        return [n.proc for n in (self.nodes[k] for k in self.order) if n.proc and n.machine_up]

    def _pool_texts(self, config: Config) -> dict[str, tuple[str, str, IPInterface]]:
        """address text -> (group, interface, address) for a config's pool (cached per pool)."""
        key = id(config.pool)
        if key not in self._texts:
            self._texts[key] = {
                str(a): (g.name, g.interface, a) for g in config.pool for a in g.addresses
            }
        return self._texts[key]

    def holders(self, address: str) -> list[str]:
        return sorted(self.kernel_index.get(address, ()))

    def owner_of(self) -> dict[str, list[str]]:
        """reference group -> machines whose kernel holds every address of it."""
        index = self.kernel_index
        out: dict[str, list[str]] = {}
        for name, texts in self.pool_text:
            common = set(index.get(texts[0], ()))
            for t in texts[1:]:
                common &= index.get(t, set())
            out[name] = sorted(common)
        return out

    def holdings(self) -> dict[str, frozenset[str]]:
        """machine -> reference-pool groups in its kernel (every address present)."""
        found: dict[str, set[str]] = {k: set() for k in self.order}
        for g, who in self.owner_of().items():
            for k in who:
                found[k].add(g)
        return {k: frozenset(v) for k, v in found.items()}


def address(text: str) -> IPInterface:
    return ipaddress.ip_interface(text)
