"""The vipd node as one sans-IO state machine: what a daemon does, without doing any IO.

`Node` owns the membership core, the placement controller (and its make-before-break
handover policy), the apply-pass bookkeeping (what the kernel has, what it should have, one
kernel operation at a time), hook ordering, conflict defence, the operator-table commands and
the graceful stop. Inputs are method calls with the time passed in (`now=` loop time,
`wall=` Unix time, keyword-only); each returns the orders (`vipd.node.orders`) its shell
must carry out, in order. The daemon (`vipd.daemon`) and the simulator (`tests.sim`) drive
this same object, so what the simulator checks is what ships.

Life of a node: `start` lists the kernel's pool addresses (a crashed run's stale ones are
released before anything else), then `OpenTransport`; from then on every input ends in a
*step*: drain the core's events, decide what to hold, start an apply pass if the target
changed, finish a stop, re-arm the timers, send what is due. `stop` leaves gracefully; the
last release goes through the normal apply pass (hooks included) and ends in `Exit`.

Remote input never raises (the core counts rejections); operator commands raise
`CommandRejected` with a message for the operator.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vipd.config import Config, IPInterface, PoolGroup, format_public_key
from vipd.counters import Counters
from vipd.membership import events as ev
from vipd.membership.core import MembershipCore
from vipd.membership.wire import Stats, key_id
from vipd.memo import Memo
from vipd.node.defend import DefendPolicy
from vipd.node.orders import (
    Announce,
    AnnounceOnce,
    CancelAnnounce,
    DefendTimer,
    Exit,
    IPAddress,
    ListAddresses,
    Log,
    Notify,
    OpenTransport,
    Order,
    RunHook,
    SaveIncarnation,
    SaveOverrides,
    SaveSeen,
    SendDatagram,
    SetTimer,
    Timer,
    TimerKey,
    WatchConflicts,
)
from vipd.node.reload import reload_changes
from vipd.node.status import Status, build_status
from vipd.placement.controller import Controller
from vipd.placement.handover import ClaimAddress, ReleaseAddress, plan
from vipd.placement.overrides import Overrides, OverridesError

STOP_GRACE = 2.0  # after handover_timeout, how long a stop may still take

KernelOp = ClaimAddress | ReleaseAddress


class CommandRejected(ValueError):
    """An operator command that cannot be carried out; the message says why and what to do."""


class _After(enum.Enum):
    """What an apply pass leads to when it ends with nothing more to do."""

    OPEN = "open"  # start-up stale cleanup done: open the transport
    STEP = "step"  # an ordinary pass: step again
    EXIT = "exit"  # the last release: exit


class Node:
    def __init__(
        self,
        config: Config,
        key: Ed25519PrivateKey,
        public_key: bytes,
        *,
        incarnation: int,
        now: float,
        rng: random.Random,
        nonce: bytes | None = None,
        seen: Mapping[str, tuple[int, int]] | None = None,
        memo: Memo | None = None,
    ) -> None:
        self.config = config
        self.key = key
        self.public_key = public_key
        self.counters = Counters()
        self.core = MembershipCore(
            config,
            key,
            public_key,
            incarnation=incarnation,
            now=now,
            rng=rng,
            nonce=nonce,
            seen=seen,
            counters=self.counters,
            memo=memo,
        )
        self.controller = Controller(config, memo=memo)
        self.defend = DefendPolicy(config.announce.defend_interval)
        # What this node holds in the kernel (pool addresses only), by interface.
        self.actual: dict[str, set[IPInterface]] = {g.interface: set() for g in config.pool}
        self.target: frozenset[str] = frozenset()
        self.hold_reason = ""
        # Groups a reload removed or changed whose old addresses may still be in the kernel.
        self._retired: list[PoolGroup] = []
        # What the last SaveSeen recorded, and when (at most once per reconcile_interval).
        self._seen_saved: tuple[tuple[str, int, int], ...] = ()
        self._seen_saved_at: float | None = None
        self._index_pool()
        self.opened = False  # transport open: start-up cleanup is over
        self.exiting = False
        self.exited = False
        self._exit_why = ""
        self._now = now
        self._wall = 0.0
        self._out: list[Order] = []
        # The apply pass: one kernel operation in flight at a time.
        self._applying = False
        self._dirty = False  # the target changed during a pass: run another
        self._ops: deque[KernelOp] = deque()
        self._after: _After | None = None
        self._claiming: frozenset[str] = frozenset()
        self._releasing: frozenset[str] = frozenset()
        self._why: dict[str, str] = {}
        self._listing = False  # a ListAddresses in flight: no pass starts meanwhile
        self._listing_wanted = False  # a reconcile asked while a pass ran
        self._held: frozenset[str] | None = None  # cache of held_groups()
        self._stop_deadline: float | None = None
        self._timer_at: float | None = None
        self._deadline_at: float | None = None
        self._defending: dict[IPAddress, str] = {}  # what the conflict watch was built from
        self._watched: frozenset[str] | None = None
        self._macs: dict[str, bytes] = {}

    def _index_pool(self) -> None:
        cfg = self.config
        self.pool_index = {g.name: i for i, g in enumerate(cfg.pool)}
        self._group_of_ip = {a.ip: g for g in cfg.pool for a in g.addresses}
        # Addresses the node looks after: the pool's, and retired ones until released.
        self.pool_ips = {a.ip for g in (*cfg.pool, *self._retired) for a in g.addresses}
        for g in cfg.pool:
            self.actual.setdefault(g.interface, set())
        self._held = None

    @property
    def interfaces(self) -> tuple[str, ...]:
        return tuple(sorted({g.interface for g in self.config.pool}))

    # --- inputs ----------------------------------------------------------------------------

    def start(self, *, now: float, wall: float) -> list[Order]:
        """Begin: find what an earlier run left in the kernel (`kernel_listing` answers)."""
        self._enter(now, wall)
        cfg = self.config
        self._log(
            "info",
            "starting",
            node=cfg.node,
            cluster=cfg.cluster,
            incarnation=self.core.incarnation,
            public_key=format_public_key(self.public_key),
            groups=len(cfg.pool),
            heartbeat_interval=cfg.timing.heartbeat_interval,
            dead_after=cfg.timing.dead_after,
        )
        self._list()
        return self._take()

    def load_overrides(self, table: Overrides) -> None:
        """The operator table saved by an earlier run (before `start`)."""
        self.core.set_overrides(table, source="state")

    def receive(
        self, datagrams: Iterable[tuple[bytes, str]], *, now: float, wall: float
    ) -> list[Order]:
        """One loop wakeup's datagrams (source address text each), then one step."""
        self._enter(now, wall)
        if not self.opened:
            return []
        for data, source in datagrams:
            self.core.receive(data, source, now=now, wall=wall)
        self._step()
        return self._take()

    def handle_timer(self, timer: TimerKey, *, now: float, wall: float) -> list[Order]:
        self._enter(now, wall)
        if self.exited:
            return []
        if timer is Timer.MEMBERSHIP:
            self._timer_at = None
            self.core.handle_timer(now=now)
            self._step()
        elif timer is Timer.DEADLINE:
            self._deadline_at = None
            self._step()
        elif isinstance(timer, DefendTimer):
            self._defend_now(timer.address)
        return self._take()

    def kernel_listing(
        self,
        found: Mapping[str, Iterable[IPInterface]],
        *,
        macs: Mapping[str, bytes],
        now: float,
        wall: float,
    ) -> list[Order]:
        """The answer to `ListAddresses`: the addresses per interface (an interface whose
        listing failed is left out: unknown, not empty) and this node's MAC on each."""
        self._enter(now, wall)
        self._listing = False
        for iface, mac in macs.items():
            if self._macs.get(iface) != mac:
                self._macs[iface] = mac
                self._watched = None  # re-arm the listener with the new MAC
        pool = {
            iface: {a for a in present if a.ip in self.pool_ips} for iface, present in found.items()
        }
        if not self.opened and not self.exiting:
            # Start-up: pool addresses left by an earlier run (crash) are not ours until
            # placement says so.
            for iface, present in pool.items():
                for address in sorted(present, key=str):
                    self.actual.setdefault(iface, set()).add(address)
                    self._log("warning", "stale_address", address=str(address), interface=iface)
            self._held = None
            self.target = frozenset()
            self._apply(_After.OPEN)
        elif not self.exiting:
            drifted = False
            for iface, real in pool.items():
                have = self.actual.get(iface, set())
                if have != real:
                    self._log(
                        "warning",
                        "drift",
                        interface=iface,
                        missing=sorted(map(str, have - real)),
                        unexpected=sorted(map(str, real - have)),
                    )
                    self.counters.inc("drift_repairs")
                    self.actual[iface] = set(real)
                    self._held = None
                    drifted = True
            # Drift, or a claim or release the kernel refused earlier: a pass puts it right.
            if drifted or plan(self.config.pool, self.target, self.actual):
                self._apply(_After.STEP)
        if self._dirty and not self._applying and not self._listing:
            self._start_pass()
        return self._take()

    def kernel_result(
        self,
        op: KernelOp,
        *,
        ok: bool,
        now: float,
        wall: float,
        error: str = "",
        existed: bool = False,
    ) -> list[Order]:
        """The answer to a `ClaimAddress` / `ReleaseAddress`. `ok=False`: the kernel refused
        (the address stays as it was; the next reconcile or pass retries). `existed`: a
        claimed address was already there."""
        self._enter(now, wall)
        if not self._ops or self._ops[0] != op:
            self._log("error", "unexpected_kernel_result", op=repr(op))
            return self._take()
        self._ops.popleft()
        view = self.core.view.digest_hex
        if isinstance(op, ClaimAddress):
            if ok:
                self.actual.setdefault(op.interface, set()).add(op.address)
                self._held = None
                self._out.append(Announce(op.interface, op.address))
                self.counters.inc("claims")
                self._log(
                    "info",
                    "claimed",
                    group=op.group,
                    address=str(op.address),
                    interface=op.interface,
                    already_present=existed,
                    view=view,
                )
            else:
                self.counters.inc("claim_errors")
                self._log(
                    "error",
                    "claim_failed",
                    limit_key=f"claim {op.interface}",
                    group=op.group,
                    address=str(op.address),
                    error=error,
                )
        elif ok:
            self.actual.get(op.interface, set()).discard(op.address)
            self._held = None
            self.counters.inc("releases")
            self._log(
                "info",
                "released",
                group=op.group,
                address=str(op.address),
                interface=op.interface,
                reason=op.reason,
                view=view,
            )
        else:
            self._log(
                "error", "release_failed", group=op.group, address=str(op.address), error=error
            )
        self._next_op()
        return self._take()

    def reconcile(self, *, now: float, wall: float) -> list[Order]:
        """Time to compare the kernel with what we believe (reconcile_interval, or netlink
        reported a change to a pool address). Never interleaved with a pass: our own claims
        in flight are not drift."""
        self._enter(now, wall)
        if not self.opened or self.exiting or self._listing:
            return []
        self._save_seen(force=False)
        if self._applying:
            self._listing_wanted = True
        else:
            self._list()
        return self._take()

    def is_pool_address(self, ip: IPAddress) -> bool:
        return ip in self.pool_ips

    def sighting(
        self, address: IPAddress, *, mac: bytes, kind: str, interface: str, now: float
    ) -> list[Order]:
        """Another MAC announced or answered for `address`: defend it now or when the
        defend interval ends (so the last word is ours, see `DefendPolicy`)."""
        self._enter(now, self._wall)
        group = self._defended_group(address) if self.opened else None
        if group is None:
            if len(self.defend):
                self.defend.forget(address)
            return self._take()
        self.counters.inc("conflicts")
        self._log(
            "warning",
            "address_conflict",
            limit_key=str(address),
            group=group.name,
            address=str(address),
            other_mac=mac.hex(":"),
            kind=kind,
            interface=interface,
        )
        when = self.defend.on_conflict(address, now)
        if when is not None:
            self._out.append(SetTimer(DefendTimer(address), when))
        return self._take()

    def refresh(self, *, now: float) -> list[Order]:
        """announce.refresh_interval: every owned, held address once more."""
        self._enter(now, self._wall)
        for ip in list(self._defending):
            group = self._defended_group(ip)
            if group is not None:
                self._announce_once(group, ip, "refresh")
                self.counters.inc("refreshes")
        return self._take()

    def stop(self, *, now: float, wall: float) -> list[Order]:
        """Graceful stop: tell peers we leave, hand groups over (make-before-break), exit."""
        self._enter(now, wall)
        if self.core.leaving or self.exited:
            return []
        self._log("info", "leaving", held=sorted(self.held_groups()))
        self._out.append(Notify("STOPPING=1"))
        self.core.leave()
        self._stop_deadline = now + self.config.timing.handover_timeout + STOP_GRACE
        if self.opened:
            self._step()
        return self._take()

    def set_stats(self, stats: Stats) -> None:
        self.core.set_stats(stats)

    def kernel_drops(self, drops: int) -> None:
        """Datagrams the kernel dropped on our socket (the core never saw them)."""
        self.counters.set("rx_kernel_drops", drops)

    def task_failed(self, task: str) -> None:
        """A shell task or callback raised something unexpected (the shell logged it with
        its traceback); counted so an operator sees it in status and metrics."""
        self.counters.inc("task_failures")

    def send_failed(self, destination: str, error: str) -> list[Order]:
        self.counters.inc("tx_errors")
        self._log(
            "warning", "send_failed", limit_key=f"send {destination}", to=destination, error=error
        )
        return self._take()

    # --- operator commands and reload ------------------------------------------------------

    def command(
        self, name: str, request: Mapping[str, Any], *, uid: int, now: float, wall: float
    ) -> tuple[dict[str, Any], list[Order]]:
        """`vipctl move/drain/rebalance`: a new operator table. Raises CommandRejected."""
        self._enter(now, wall)
        if not self.opened or self.exiting:
            raise CommandRejected("the node is starting or stopping: try again in a moment")
        handlers = {
            "move": self._cmd_move,
            "drain": self._cmd_drain,
            "rebalance": self._cmd_rebalance,
        }
        handler = handlers.get(name)
        if handler is None:
            raise CommandRejected(f"unknown command {name!r}")
        try:
            reply = handler(request, uid)
        except OverridesError as e:  # e.g. a table at the last version: no edit can follow
            raise CommandRejected(str(e)) from None
        return reply, self._take()

    def reload(
        self, new: Config, key: Ed25519PrivateKey, public: bytes, *, now: float, wall: float
    ) -> tuple[list[str], list[Order]]:
        """Apply what may change live (`vipd.node.reload`); raises ReloadRefused (nothing
        applied) when a setting needs a restart, CommandRejected while starting or
        stopping. Returns the changes."""
        self._enter(now, wall)
        if not self.opened or self.exiting:
            raise CommandRejected("the node is starting or stopping: reload once it runs")
        changes = reload_changes(self.config, new)
        if public != self.public_key:
            changes.append(
                f"signing key: {key_id(self.public_key).hex()} -> {key_id(public).hex()}"
            )
        if new.pool != self.config.pool:
            pins = self._reload_pool(new)
            if pins:
                changes.append(
                    f"pool: kept {len(pins)} unchanged group(s) where they are (reload pins;"
                    " vipctl rebalance lets them go): " + ", ".join(sorted(pins))
                )
        self.core.rekey(new, key, public)
        self.config, self.key, self.public_key = new, key, public
        self._log("info", "reloaded", changes=changes or ["nothing"])
        self._step()
        self._apply(_After.STEP)  # retired addresses are released by a pass
        return changes, self._take()

    def _reload_pool(self, new: Config) -> dict[str, str]:
        """Switch to a new pool: renumber the core's groups by name, keep unchanged groups
        where they are (pins), and retire what the new pool no longer has."""
        old = self.config
        pins = Controller(new).reload_pins(self.controller, self.core)
        self.core.reload_pool(new)
        self.controller.use_pool(new)
        if pins:
            table = self.core.overrides.with_moves(pins, by=new.node, reason="reload")
            if self.core.table_fits(table):
                self.core.set_overrides(table)
            else:
                self._log("error", "reload_pins_dropped", groups=sorted(pins), detail="table full")
        after = {g.name: g for g in new.pool}
        self._retired += [g for g in old.pool if after.get(g.name) != g]
        self.config = new
        self._index_pool()
        self._watched = None  # a kept group may have other addresses now
        return pins

    def _apply_table(self, table: Overrides, uid: int, what: str) -> dict[str, Any]:
        if not self.core.table_fits(table):
            raise CommandRejected(
                "the operator table would no longer fit a heartbeat: clear some moves first"
                " (vipctl move GROUP --auto, vipctl rebalance)"
            )
        self.core.set_overrides(table)
        self._log("info", "operator_change", change=what, uid=uid, version=table.version)
        self._step()
        return {"version": table.version, "change": what}

    def _member_arg(self, request: Mapping[str, Any], key: str) -> str:
        name = request.get(key) or self.config.node
        if not isinstance(name, str) or self.config.member(name) is None:
            raise CommandRejected(f"{name!r} is not in the roster")
        return name

    def _cmd_move(self, request: Mapping[str, Any], uid: int) -> dict[str, Any]:
        group, target = request.get("group"), request.get("node")
        if not isinstance(group, str) or group not in self.pool_index:
            raise CommandRejected(f"{group!r} is not a group of this node's pool")
        table, me = self.core.overrides, self.config.node
        if target is None:
            if table.move_of(group) is None:
                raise CommandRejected(f"{group} has no override: it is placed automatically")
            return self._apply_table(table.with_move(group, None, by=me), uid, f"{group} -> auto")
        target = self._member_arg(request, "node")
        if target in table.drained:
            raise CommandRejected(f"{target} is drained: undrain it first")
        reply = self._apply_table(
            table.with_move(group, target, by=me), uid, f"{group} -> {target}"
        )
        if target not in self.core.view.members:
            reply["note"] = (
                f"{target} is not a live member now: {group} stays with automatic"
                " placement until it is"
            )
        return reply

    def _cmd_drain(self, request: Mapping[str, Any], uid: int) -> dict[str, Any]:
        node, drained = self._member_arg(request, "node"), bool(request.get("drained", True))
        table = self.core.overrides
        if (node in table.drained) == drained:
            raise CommandRejected(f"{node} is already {'drained' if drained else 'not drained'}")
        what = f"{'drain' if drained else 'undrain'} {node}"
        reply = self._apply_table(table.with_drain(node, drained, by=self.config.node), uid, what)
        if drained and not set(self.core.view.members) - set(self.core.overrides.drained):
            reply["note"] = "every live member is drained: they all keep serving"
        return reply

    def _cmd_rebalance(self, request: Mapping[str, Any], uid: int) -> dict[str, Any]:
        table = self.core.overrides
        pins = [m.group for m in table.moves if m.reason == "reload"]
        if not pins:
            return {"version": table.version, "change": "no reload pins"}
        return self._apply_table(
            table.without_reason("reload", by=self.config.node),
            uid,
            f"released {len(pins)} reload pin(s): {', '.join(pins)}",
        )

    # --- what the node holds ---------------------------------------------------------------

    def held_groups(self) -> frozenset[str]:
        """Groups with every address present in the kernel (as far as we know)."""
        if self._held is None:
            self._held = frozenset(
                g.name
                for g in self.config.pool
                if all(a in self.actual.get(g.interface, ()) for a in g.addresses)
            )
        return self._held

    def status(
        self,
        *,
        now: float,
        hook_counters: Mapping[str, int],
        notify_sent: int,
        notify_dropped: int,
        frames_sent: Mapping[str, int],
    ) -> Status:
        """The typed snapshot `vipctl status`, the control API and the exporter render; the
        shell adds what only its adapters count (hooks, announcement frames)."""
        return build_status(
            core=self.core,
            controller=self.controller,
            config=self.config,
            counters=self.counters,
            held=self.held_groups(),
            hold_reason=self.hold_reason,
            hook_counters=hook_counters,
            notify_sent=notify_sent,
            notify_dropped=notify_dropped,
            frames_sent=frames_sent,
            now=now,
        )

    # --- the step --------------------------------------------------------------------------

    def _step(self) -> None:
        """Handle the core's events, re-plan what to hold, finish a stop, send what is due."""
        now = self._now
        self._report_events()
        if self.exiting:
            self._flush()
            return
        core = self.core
        held = self.held_groups()
        decision = self.controller.decide(core, held, now)
        view = core.view.digest_hex
        for o in decision.outcomes:
            level = "warning" if o.how in ("timeout", "stalled") else "info"
            self._log(level, "handover", group=o.group, new_owner=o.new_owner, how=o.how, view=view)
        if decision.reason != self.hold_reason:
            self._log("info", "holding", reason=decision.reason, view=view)
            self.hold_reason = decision.reason
        for name in decision.quiet:
            for address in self.config.pool[self.pool_index[name]].addresses:
                self._out.append(CancelAnnounce(address))
        for name in decision.announce:
            group = self.config.pool[self.pool_index[name]]
            also = sorted(core.holders(self.pool_index[name]))
            self._log("info", "reannounce", group=name, also_held_by=also, view=view)
            self.counters.inc("reannouncements")
            for address in group.addresses:
                self._out.append(Announce(group.interface, address))
        if decision.hold != self.target:
            self.target = decision.hold
            self._apply(_After.STEP)
        if self.exited:
            return
        self._watch_conflicts()
        if core.leaving and not self.target and not any(self.actual.values()):
            self._exit("left")
        elif self._stop_deadline is not None and now >= self._stop_deadline:
            self._log("warning", "stop_deadline_passed", held=sorted(self.held_groups()))
            self._exit("stop deadline passed")
        else:
            self._arm_deadline()
        self._flush()

    def _report_events(self) -> None:
        view = self.core.view.digest_hex
        while (event := self.core.next_event()) is not None:
            self.controller.observe(event, self._now)
            name = _snake(type(event).__name__)
            fields: dict[str, object] = dict(asdict(event))
            if isinstance(event, ev.PacketRejected):
                self._out.append(
                    Log("warning", "packet_rejected", fields, limit_key=event.reason, source=event)
                )
                continue
            level, extra = "info", {}
            if isinstance(event, ev.OverridesAdopted):
                self._out.append(SaveOverrides(self.core.overrides))
            elif isinstance(event, ev.PoolDiffers):
                level, extra = "warning", {"detail": "expected during a rolling reload"}
            elif isinstance(event, ev.ConfigMismatch | ev.ClockSkew | ev.OverridesRefused):
                level = "error"
            elif isinstance(event, ev.MemberLost | ev.LoopStalled):
                level = "warning"
            elif isinstance(event, ev.IncarnationWentBack):
                level, extra = "warning", {"fix": f"set node.state_dir on {event.name}"}
            elif isinstance(event, ev.DuplicateNode):
                level = "error"
                extra = {
                    "detail": f"another instance runs as {self.core.name} with this key:"
                    " this one holds nothing while it hears it",
                    "fix": "stop one, or give it its own name and key",
                }
            elif isinstance(event, ev.DuplicateGone):
                level = "warning"
                self._out.append(SaveIncarnation(event.new_incarnation))
            elif isinstance(event, ev.MemberStateChanged):
                level = "debug"
            self._out.append(Log(level, name, {"view": view, **extra, **fields}, source=event))

    def _arm_deadline(self) -> None:
        """Our own deadlines (handover timeout, stop bound); the core's are MEMBERSHIP."""
        pending = [
            d for d in (self.controller.next_deadline(), self._stop_deadline) if d is not None
        ]
        when = min(pending) if pending else None
        if when != self._deadline_at:
            self._deadline_at = when
            self._out.append(SetTimer(Timer.DEADLINE, when))

    def _flush(self) -> None:
        """Send whatever the core has due and re-arm its timer."""
        if not self.opened:
            return
        for data in self.core.datagrams_to_send(now=self._now, wall=self._wall):
            self._out.append(SendDatagram(data))
        # get_timer also tells the core when we meant to wake (its loop-stall detection).
        when = self.core.get_timer()
        if when != self._timer_at:
            self._timer_at = when
            self._out.append(SetTimer(Timer.MEMBERSHIP, when))

    def _exit(self, why: str) -> None:
        """Release whatever is still held (through a normal pass, hooks included), then exit."""
        if self.exiting:
            return
        self.exiting = True
        self._exit_why = why
        self._log("info", "exiting", why=why, held=sorted(self.held_groups()))
        self.hold_reason = "stopping"
        self.target = frozenset()
        self._apply(_After.EXIT)

    def _save_seen(self, *, force: bool) -> None:
        """What each peer last sent us, for the next run's replay check; on the reconcile
        timer (the window a capture can slip through after a crash) and at the exit."""
        due = self._seen_saved_at is None or (
            self._now >= self._seen_saved_at + self.config.timing.reconcile_interval
        )
        if not (force or due):
            return
        seen = tuple(sorted((name, inc, sent) for name, (inc, sent) in self.core.seen().items()))
        if seen != self._seen_saved:
            self._seen_saved, self._seen_saved_at = seen, self._now
            self._out.append(SaveSeen(seen))

    def _exited(self) -> None:
        self._save_seen(force=True)
        self._flush()  # the last (LEAVING) heartbeats
        self.opened = False
        self.exited = True
        for timer in (Timer.MEMBERSHIP, Timer.DEADLINE):
            self._out.append(SetTimer(timer, None))
        self._out.append(Exit(self._exit_why))

    def _opened(self) -> None:
        self.opened = True
        self._out.append(OpenTransport())
        self._flush()
        self._step()

    # --- the apply pass --------------------------------------------------------------------

    def _list(self) -> None:
        self._listing = True
        self._out.append(ListAddresses(self.interfaces))

    def _apply(self, after: _After) -> None:
        """One pass at a time, never during a listing; a change during a pass runs another."""
        self._after = after
        if self._applying or self._listing:
            self._dirty = True
            return
        self._start_pass()

    def _start_pass(self) -> None:
        self._applying, self._dirty = True, False
        before = self.held_groups()
        ops: list[KernelOp] = plan(self.config.pool, self.target, self.actual)
        ops += self._retire()
        self._ops = deque(ops)
        self._claiming = frozenset(o.group for o in ops if isinstance(o, ClaimAddress)) - before
        self._why = {o.group: o.reason for o in ops if isinstance(o, ReleaseAddress)}
        self._releasing = frozenset(self._why)
        reason = self.hold_reason or "placement"
        for name in sorted(self._claiming):
            self._hook("up", name, reason)
        for name in sorted(self._releasing):
            self._hook("down", name, _release_reason(self._why[name], reason))
        self._next_op()

    def _next_op(self) -> None:
        if self._ops:
            op = self._ops[0]
            if isinstance(op, ReleaseAddress):
                self._out.append(CancelAnnounce(op.address))
            self._out.append(op)
            return
        # Pass complete: hooks, then tell the core what we hold (announced at once).
        after = self.held_groups()
        reason = self.hold_reason or "placement"
        for name in sorted(self._claiming & after):
            self._hook("post_up", name, reason)
        for name in sorted(self._releasing - after):
            self._hook("post_down", name, _release_reason(self._why[name], reason))
        self.core.set_held(frozenset(self.pool_index[g] for g in after), now=self._now)
        self._applying = False
        if self._listing_wanted and not self.exiting:
            self._listing_wanted = False
            self._list()
        if self._dirty:
            # The target changed during the pass: step, then apply again.
            if self.opened and not self.exiting:
                self._step()
            if not self._applying and not self._listing:
                self._start_pass()
            return
        then, self._after = self._after, None
        if then is _After.STEP:
            self._step()
        elif then is _After.OPEN:
            self._opened()
        elif then is _After.EXIT:
            self._exited()

    def _retire(self) -> list[ReleaseAddress]:
        """Releases for the addresses of groups a reload removed or changed, unless the new
        pool has the same address on the same interface (then plan() looks after it)."""
        if not self._retired:
            return []
        keep = {(g.interface, a.ip) for g in self.config.pool for a in g.addresses}
        orders = [
            ReleaseAddress(g.name, g.interface, present, "removed from pool")
            for g in self._retired
            for a in g.addresses
            if (g.interface, a.ip) not in keep
            for present in self.actual.get(g.interface, set())
            if present.ip == a.ip
        ]
        if not orders:
            self._retired = []
            self._index_pool()
        return orders

    def _hook(self, event: str, name: str, reason: str) -> None:
        group = self._group_named(name)
        if group is not None:
            self._out.append(RunHook(event, name, group.addresses, group.interface, reason))

    def _group_named(self, name: str) -> PoolGroup | None:
        index = self.pool_index.get(name)
        if index is not None:
            return self.config.pool[index]
        return next((g for g in self._retired if g.name == name), None)

    # --- conflicts: watch, defend, refresh -------------------------------------------------

    def _defended_group(self, ip: IPAddress) -> PoolGroup | None:
        """The group of `ip` if we own it by placement and hold it (only those: a group
        being handed over must not be pulled back from its new owner)."""
        group = self._group_of_ip.get(ip)
        if group is None or group.name not in self.controller.owned:
            return None
        return group if group.name in self.held_groups() else None

    def _watch_conflicts(self) -> None:
        """Listen for other MACs on the addresses we own and hold."""
        mine = self.controller.owned & self.held_groups()
        if mine == self._watched:
            return  # almost every step: nothing to re-arm
        self._watched = mine
        defending = {a.ip: g.name for g in self.config.pool if g.name in mine for a in g.addresses}
        for ip in self._defending.keys() - defending.keys():
            self.defend.forget(ip)
        self._defending = defending
        by_iface: dict[str, set[IPAddress]] = {iface: set() for iface in self.actual}
        for ip, name in defending.items():
            by_iface.setdefault(self.config.pool[self.pool_index[name]].interface, set()).add(ip)
        for iface, ips in sorted(by_iface.items()):
            self._out.append(WatchConflicts(iface, frozenset(ips), self._macs.get(iface)))

    def _defend_now(self, ip: IPAddress) -> None:
        group = None if self.exiting else self._defended_group(ip)
        if group is None:
            return  # released or handed over meanwhile
        self.defend.defended(ip, self._now)
        self.counters.inc("defences")
        self._announce_once(group, ip, "defend")

    def _announce_once(self, group: PoolGroup, ip: IPAddress, why: str) -> None:
        """One announcement of an address we own and hold (defence, refresh)."""
        for address in group.addresses:
            if address.ip == ip:
                self._log("info", why, address=str(address), group=group.name)
                self._out.append(AnnounceOnce(group.interface, address))

    # --- plumbing --------------------------------------------------------------------------

    def _enter(self, now: float, wall: float) -> None:
        self._now, self._wall = now, wall

    def _take(self) -> list[Order]:
        out, self._out = self._out, []
        return out

    def _log(
        self, level: str, event: str, *, limit_key: str | None = None, **fields: object
    ) -> None:
        self._out.append(Log(level, event, fields, limit_key=limit_key))


def _release_reason(action_reason: str, hold_reason: str) -> str:
    """VIPD_REASON of a release: the pool edit that retired it, else why we hold what we
    hold ("placement": it moved to another member)."""
    return action_reason if action_reason == "removed from pool" else hold_reason


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")
