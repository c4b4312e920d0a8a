"""A deterministic simulator of N vipd nodes on one virtual clock: no sockets, no sleeping.

Model
-----
Each node runs the shipped `vipd.node.node.Node`, the same object the daemon drives; the
simulator is only its shell, on a virtual clock:

- `Proc` is one daemon run: a `Node` plus what `vipd.daemon` keeps around it (timers, the
  socket's inbox, the announcer's repeat schedules). `SimNode.kernel` is the machine's
  address table, the ground truth the invariants are checked on.
- Inputs: a datagram wakes the loop (after `SimParams.wakeup_latency`), which hands up to
  `MAX_READS` queued datagrams to `Node.receive`; `SetTimer` orders become events that call
  `Node.handle_timer`; a `ClaimAddress`/`ReleaseAddress` order completes after
  `SimParams.kernel_delay` (netlink on one worker thread) and is answered with
  `Node.kernel_result`; `ListAddresses` is answered at once from the machine's table.
- Orders: `SendDatagram` goes to the network, `Announce`/`AnnounceOnce`/`CancelAnnounce` to
  the announcer model, `Exit` ends the process; a few `Log` facts become trace lines.
  Hooks, the conflict watch's filter, saving the operator table and systemd notifications
  have nothing to model.

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
seconds: timers fire late, the inbox queues, a SIGTERM waits; on resume the timer runs
before the queued datagrams, the worst order), and per-node clock skew
(`wall = WALL0 + now + skew`, `set_skew` steps it).

Not modelled: the reconcile tick (nobody deletes addresses by hand here; `Node.reconcile`
is tested on its own), the control socket, unicast transport, IPv4/ARP specifics (one
address per group, IPv6 text), clients behind a cut (the one client hears every machine),
per-datagram CPU time (the loop is infinitely fast between `wakeup_latency` batches), kernel
socket buffers in bytes.

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
from vipd.membership import events as ev
from vipd.membership.core import MembershipCore
from vipd.memo import Memo
from vipd.node.node import KernelOp, Node
from vipd.node.orders import (
    Announce,
    AnnounceOnce,
    CancelAnnounce,
    ClaimAddress,
    DefendTimer,
    Exit,
    ListAddresses,
    Log,
    Order,
    ReleaseAddress,
    SaveIncarnation,
    SendDatagram,
    SetTimer,
    Timer,
    TimerKey,
)
from vipd.placement.controller import Controller

if TYPE_CHECKING:
    from tests.sim.invariants import Checker

WALL0 = 1_800_000_000.0  # Unix time at virtual t = 0
MAX_READS = 64  # datagrams per loop wakeup, as vipd.daemon.MAX_READS_PER_WAKEUP


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
    """One run of the daemon on a node, from start to exit or crash: the real `Node`, plus
    what the daemon's shell keeps (timers, the socket's inbox, the announcer's schedules)."""

    pid: int
    node: SimNode
    daemon: Node
    inbox: deque[tuple[bytes, str]] = field(default_factory=deque)
    wakeup_pending: bool = False
    timer_at: float | None = None
    timer_gen: int = 0
    deadline_at: float | None = None
    deadline_gen: int = 0
    # Work that came due while the loop was stalled, run on resume (timers first).
    missed_stop: bool = False
    missed_timer: bool = False
    missed_deadline: bool = False
    missed_op: tuple[KernelOp, bool] | None = None
    bursts: dict[str, int] = field(default_factory=dict)  # address -> running announce schedule

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def core(self) -> MembershipCore:
        return self.daemon.core

    @property
    def controller(self) -> Controller:
        return self.daemon.controller

    @property
    def open(self) -> bool:
        """The socket is open: after the stale-address cleanup, until the exit."""
        return self.daemon.opened

    @property
    def exiting(self) -> bool:
        return self.daemon.exiting

    def held_groups(self) -> frozenset[str]:
        return self.daemon.held_groups()


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
    ev.IncarnationWentBack,
    ev.MemberLost,
    ev.ViewChanged,
    ev.BecameReady,
    ev.BecameMature,
    ev.ConfigMismatch,
    ev.LoopStalled,
    ev.SelfDisrupted,
    ev.HolddownStarted,
    ev.DuplicateNode,
    ev.DuplicateGone,
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
        memo: Memo | None = None,
    ) -> None:
        self.spec = spec
        #: Shared by every simulated node: pure results (signature checks, decoded bodies,
        #: placements) computed once per process instead of once per receiver.
        self.memo = memo
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
        self._tamper: dict[str, Callable[[bytes], bytes]] = {}
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

    def add_clone(self, of: str, name: str) -> None:
        """A second machine `name` with `of`'s config and key (a cloned VM): not started."""
        self.nodes[name] = SimNode(name, self.nodes[of].config)
        self.order = tuple(sorted(self.nodes))

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
        identity = node.config.node  # a clone (`add_clone`) runs under another's name
        daemon = Node(
            node.config,
            node_key(identity),
            node_public_key(identity),
            incarnation=incarnation,
            now=self.now,
            rng=random.Random(self.rng.getrandbits(64)),
            nonce=self._pid.to_bytes(8),  # unique per start, and draws nothing from the rng
            memo=self.memo,
        )
        texts = self._pool_texts(node.config)
        stale = sorted(a for a in node.kernel if a in texts)
        proc = Proc(self._pid, node, daemon)
        node.proc = proc
        self.log(
            name,
            f"START incarnation={incarnation} stale={stale} {'join' if planned else 'cold start'}",
        )
        self._mark(planned)
        # The node lists the kernel, removes what an earlier run left, then opens its socket.
        self._run(proc, daemon.start(now=self.now, wall=self.wall(node)))

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
        if proc is None or proc.core.leaving or proc.missed_stop:
            return
        self.log(name, f"LEAVE held={sorted(proc.held_groups())}")
        self._mark(planned=True)
        if node.stalled:
            proc.missed_stop = True  # the signal handler runs when the loop does
        else:
            self._stop(proc)

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

    def tamper(self, name: str, edit: Callable[[bytes], bytes] | None) -> None:
        """From now on every datagram `name` sends goes through `edit` (None: stop). A
        compromised member: its own daemon stays honest, its key signs what `edit` makes."""
        if edit is None:
            self._tamper.pop(name, None)
        else:
            self._tamper[name] = edit
        self.log(name, "TAMPER " + ("off" if edit is None else "on"))

    def _broadcast(self, sender: SimNode, data: bytes) -> None:
        edit = self._tamper.get(sender.name)
        if edit is not None:
            data = edit(data)
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

    # --- the daemon's shell: inputs to the node, its orders carried out ------------------

    def _alive(self, proc: Proc) -> bool:
        return proc.node.proc is proc and proc.node.machine_up

    def _run(self, proc: Proc, orders: list[Order]) -> None:
        """Carry out a node's orders in order, as `vipd.daemon` does, on the virtual clock."""
        for order in orders:
            if not self._alive(proc):
                return
            if isinstance(order, SendDatagram):
                self._broadcast(proc.node, order.data)
            elif isinstance(order, SetTimer):
                self._set_timer(proc, order)
            elif isinstance(order, Log):
                self._trace_log(proc, order)
            elif isinstance(order, ClaimAddress | ReleaseAddress):
                # Netlink on one worker thread: one operation at a time, each taking a while.
                lo, hi = self.params.kernel_delay
                delay = lo + self.rng.random() * (hi - lo)
                self.at(self.now + delay, partial(self._op_done, proc, order))
            elif isinstance(order, Announce):
                self._announce(proc, str(order.address))
            elif isinstance(order, AnnounceOnce):
                self._frame(proc, str(order.address))
            elif isinstance(order, CancelAnnounce):
                proc.bursts.pop(str(order.address), None)
            elif isinstance(order, ListAddresses):
                self._list(proc, order)
            elif isinstance(order, Exit):
                self._exited(proc)
            elif isinstance(order, SaveIncarnation):
                proc.node.last_incarnation = max(proc.node.last_incarnation, order.incarnation)
            # OpenTransport, WatchConflicts (the one client hears every frame), RunHook,
            # SaveOverrides, SaveSeen (receivers restart in the sim knowing nothing), Notify:
            # nothing to model.

    def _trace_log(self, proc: Proc, order: Log) -> None:
        f = order.fields
        if order.source is not None:
            if isinstance(order.source, _TRACED):
                self.log(proc.name, repr(order.source))
        elif order.event == "handover":
            self.log(proc.name, f"handover {f['group']} -> {f['new_owner']}: {f['how']}")
        elif order.event == "holding":
            self.log(proc.name, f"holding: {f['reason']}")
        elif order.event in ("reannounce", "defend"):
            self.log(
                proc.name,
                f"{order.event} {f['group' if order.event == 'reannounce' else 'address']}",
            )
        elif order.event == "exiting":
            self.log(proc.name, f"EXITING ({f['why']}) held={f['held']}")

    def _set_timer(self, proc: Proc, order: SetTimer) -> None:
        timer, when = order.timer, order.when
        if timer is Timer.MEMBERSHIP:
            proc.timer_at = when
            proc.timer_gen += 1
            if when is not None:
                self.at(when, partial(self._on_timer, proc, proc.timer_gen))
        elif timer is Timer.DEADLINE:
            proc.deadline_at = when
            proc.deadline_gen += 1
            if when is not None:
                self.at(when, partial(self._on_deadline, proc, proc.deadline_gen))
        elif isinstance(timer, DefendTimer) and when is not None:
            self.at(when, partial(self._defend, proc, timer))

    def _on_readable(self, proc: Proc) -> None:
        proc.wakeup_pending = False
        if not self._alive(proc) or proc.node.stalled:
            return
        batch = [proc.inbox.popleft() for _ in range(min(MAX_READS, len(proc.inbox)))]
        self._run(proc, proc.daemon.receive(batch, now=self.now, wall=self.wall(proc.node)))
        if self._alive(proc) and proc.inbox and not proc.wakeup_pending:
            proc.wakeup_pending = True
            self.at(self.now, lambda: self._on_readable(proc))

    def _timer(self, proc: Proc, timer: TimerKey) -> None:
        self._run(proc, proc.daemon.handle_timer(timer, now=self.now, wall=self.wall(proc.node)))

    def _on_timer(self, proc: Proc, gen: int) -> None:
        if not self._alive(proc) or gen != proc.timer_gen:
            return
        if proc.node.stalled:
            proc.missed_timer = True
            return
        proc.timer_at = None
        self._timer(proc, Timer.MEMBERSHIP)

    def _on_deadline(self, proc: Proc, gen: int) -> None:
        if not self._alive(proc) or gen != proc.deadline_gen:
            return
        if proc.node.stalled:
            proc.missed_deadline = True
            return
        proc.deadline_at = None
        self._timer(proc, Timer.DEADLINE)

    def _stop(self, proc: Proc) -> None:
        self._run(proc, proc.daemon.stop(now=self.now, wall=self.wall(proc.node)))

    def _resume(self, node: SimNode, proc: Proc, end: float) -> None:
        if node.stalled_until != end:
            return  # extended, or the process died meanwhile
        node.stalled_until = None
        self.log(node.name, "RESUME")
        self._mark(planned=False)
        if not self._alive(proc):
            return
        # A SIGTERM that arrived during the stall is handled when the loop runs again.
        if proc.missed_stop:
            proc.missed_stop = False
            self._stop(proc)
        # The worst order: overdue timers first, then the work that queued up.
        if proc.missed_timer or (proc.timer_at is not None and proc.timer_at <= self.now):
            proc.missed_timer = False
            proc.timer_at = None
            proc.timer_gen += 1
            self._timer(proc, Timer.MEMBERSHIP)
        if proc.missed_deadline and self._alive(proc):
            proc.missed_deadline = False
            proc.deadline_at = None
            proc.deadline_gen += 1
            self._timer(proc, Timer.DEADLINE)
        if proc.missed_op is not None and self._alive(proc):
            (op, ok), proc.missed_op = proc.missed_op, None
            self._op_result(proc, op, ok)
        if self._alive(proc) and proc.inbox and not proc.wakeup_pending:
            proc.wakeup_pending = True
            self.at(self.now, lambda: self._on_readable(proc))

    def _exited(self, proc: Proc) -> None:
        """`Exit`: the announcer closes, the process ends."""
        proc.bursts.clear()
        proc.node.proc = None
        self.log(proc.name, "EXITED")
        self._mark(planned=True)

    # --- the kernel ------------------------------------------------------------------------

    def _list(self, proc: Proc, order: ListAddresses) -> None:
        """The kernel's addresses per interface (the sim's kernel holds pool addresses only)."""
        texts = self._pool_texts(proc.node.config)
        found: dict[str, set[IPInterface]] = {iface: set() for iface in order.interfaces}
        for text in proc.node.kernel:
            entry = texts.get(text)
            if entry is not None:
                found.setdefault(entry[1], set()).add(entry[2])
        wall = self.wall(proc.node)
        self._run(proc, proc.daemon.kernel_listing(found, macs={}, now=self.now, wall=wall))

    def _op_done(self, proc: Proc, op: KernelOp) -> None:
        node = proc.node
        # The kernel carries out a request already sent, whatever became of the process.
        ok = node.machine_up
        if ok:
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
            proc.missed_op = (op, ok)
            return
        self._op_result(proc, op, ok)

    def _op_result(self, proc: Proc, op: KernelOp, ok: bool) -> None:
        wall = self.wall(proc.node)
        self._run(proc, proc.daemon.kernel_result(op, ok=ok, now=self.now, wall=wall))

    # --- the announcer and the one client ----------------------------------------------

    def _announce(self, proc: Proc, text: str) -> None:
        """`Announcer.announce`: a frame now, repeats at the configured offsets; a new
        announce restarts the schedule, a release cancels it."""
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

    def _sighting(self, proc: Proc, address: str) -> None:
        """The conflict listener hears another node's frame for `address`."""
        if not self._alive(proc):
            return
        entry = self._pool_texts(proc.node.config).get(address)
        if entry is None:
            return
        orders = proc.daemon.sighting(
            entry[2].ip, mac=b"\0" * 6, kind="announce", interface=entry[1], now=self.now
        )
        self._run(proc, orders)

    def _defend(self, proc: Proc, timer: DefendTimer) -> None:
        if not self._alive(proc):
            return
        if proc.node.stalled_until is not None:
            self.at(proc.node.stalled_until, partial(self._defend, proc, timer))
            return
        self._timer(proc, timer)

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
