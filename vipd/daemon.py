"""vipd: asyncio wiring around the pure core. No protocol decisions live here.

Inputs (datagrams, timers, signals, control requests, kernel state) are fed to the membership
core and to the pure placement/handover/plan functions; their outputs (datagrams, address
claims and releases, announcements) are carried out by the IO adapters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import random
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vipd.arp import frames
from vipd.arp.announcer import Announcer, RawAnnouncer
from vipd.arp.listener import ConflictListener, Sighting
from vipd.config import (
    Config,
    ConfigError,
    IPInterface,
    PoolGroup,
    format_public_key,
    load_config,
)
from vipd.host import systemd
from vipd.host.control import Caller, Command, ControlServer, RequestError
from vipd.host.hooks import HookRunner
from vipd.host.keys import load_node_key, public_key_bytes
from vipd.host.log import configure_logging
from vipd.host.metrics import StatusCollector, serve
from vipd.host.ratelimit import RateLimitedLog
from vipd.host.state import load_overrides, next_incarnation, save_overrides
from vipd.host.stats import StatsCollector
from vipd.kernel.address_events import AddressChange, AddressWatcher, Resync
from vipd.kernel.addresses import (
    AddressError,
    AddressManager,
    InterfaceMissing,
    NetlinkAddressManager,
)
from vipd.kernel.netif import mac_address
from vipd.kernel.transport import (
    TransportError,
    open_multicast_socket,
    open_unicast_socket,
)
from vipd.membership import events as ev
from vipd.membership.core import MembershipCore
from vipd.membership.driver import MembershipDriver
from vipd.membership.wire import key_id
from vipd.node.defend import DefendPolicy
from vipd.node.reload import ReloadRefused, reload_changes
from vipd.placement.controller import Controller
from vipd.placement.handover import ClaimAddress, ReleaseAddress, plan
from vipd.placement.overrides import Overrides, OverridesError

log = structlog.get_logger("vipd")

STATS_INTERVAL = 1.0
STOP_GRACE = 2.0  # after handover_timeout, how long a stop may still take
HOOK_GRACE = 2.0  # at exit, how long running hooks (post_down...) may still take


class Daemon:
    def __init__(
        self,
        config: Config,
        key: Ed25519PrivateKey,
        *,
        addresses: AddressManager,
        announcer_factory: Callable[[asyncio.AbstractEventLoop], Announcer],
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.key = key
        self.public_key = public_key_bytes(key)
        self.addresses = addresses
        self._announcer_factory = announcer_factory
        self.rng = rng or random.Random()
        self.controller = Controller(config)
        # What this node holds in the kernel (pool addresses only), by interface.
        self.actual: dict[str, set[IPInterface]] = {g.interface: set() for g in config.pool}
        # Groups a reload removed or changed whose old addresses may still be in the kernel.
        self._retired: list[PoolGroup] = []
        self._index_pool()
        self.target: frozenset[str] = frozenset()
        self._hold_reason = ""
        self._dirty = asyncio.Event()
        self._stopped = asyncio.Event()
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._stop_deadline: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._rejections = RateLimitedLog(log, interval=10.0)
        self._errors = RateLimitedLog(log, interval=10.0)
        self._conflicts = RateLimitedLog(log, interval=10.0)
        self.hooks = HookRunner(config.hooks, config.node)
        self.defend = DefendPolicy(config.announce.defend_interval)
        self._defending: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}
        self._watched_groups: frozenset[str] | None = None  # what _defending was built from
        self._macs: dict[str, bytes] = {}  # interface -> our MAC, for the conflict listener
        self._reconcile_now = asyncio.Event()
        self._apply_lock = asyncio.Lock()

    def _index_pool(self) -> None:
        cfg = self.config
        self.pool_index = {g.name: i for i, g in enumerate(cfg.pool)}
        # Addresses reconcile looks after: the pool's, and retired ones until released.
        self.pool_ips = {a.ip for g in (*cfg.pool, *self._retired) for a in g.addresses}
        for g in cfg.pool:
            self.actual.setdefault(g.interface, set())

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.loop = loop
        cfg = self.config
        incarnation = next_incarnation(cfg.state_dir, time.time())
        self.core = MembershipCore(
            cfg, self.key, self.public_key, incarnation=incarnation, now=loop.time(), rng=self.rng
        )
        frames.preload()
        self.announcer = self._announcer_factory(loop)
        self.listener = ConflictListener(loop, self._on_sighting)
        self.watcher = AddressWatcher(loop, self._on_address_change)
        log.info(
            "starting",
            node=cfg.node,
            cluster=cfg.cluster,
            incarnation=incarnation,
            public_key=format_public_key(self.public_key),
            groups=len(cfg.pool),
            heartbeat_interval=cfg.timing.heartbeat_interval,
            dead_after=cfg.timing.dead_after,
        )
        self._load_overrides()
        await self._learn_macs()
        await self._remove_stale()
        sock, destinations = open_transport(cfg)
        self.driver = MembershipDriver(self.core, sock, destinations, loop, self._step)
        self.control = ControlServer(
            cfg.control_socket,
            cfg.control_mode,
            cfg.control_group,
            {
                "status": Command(self._cmd_status),
                "reload": Command(self._cmd_reload, mutating=True),
                "move": Command(self._cmd_move, mutating=True),
                "drain": Command(self._cmd_drain, mutating=True),
                "rebalance": Command(self._cmd_rebalance, mutating=True),
            },
        )
        await self.control.start()
        self.metrics = StatusCollector()
        self._exporter = serve(cfg.metrics_listen, self.metrics) if cfg.metrics_listen else None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        self._tasks = [
            loop.create_task(self._apply_loop(), name="apply"),
            loop.create_task(self._reconcile_loop(), name="reconcile"),
            loop.create_task(self._stats_loop(), name="stats"),
            loop.create_task(self._refresh_loop(), name="refresh"),
        ]
        self.watcher.start()
        systemd.notify("READY=1")
        self.driver.start()
        self._step()
        await self._stopped.wait()
        await self._shutdown()
        return 0

    def stop(self) -> None:
        """Graceful stop: tell peers we leave, hand groups over (make-before-break), exit."""
        if self.core.leaving:
            return
        log.info("leaving", held=sorted(self._held_groups()))
        systemd.notify("STOPPING=1")
        self.core.leave()
        self._stop_deadline = self.loop.time() + self.config.timing.handover_timeout + STOP_GRACE
        self._step()

    def reload(self) -> list[str]:
        """Re-read the config file and apply what may change live (`vipd.node.reload`); on any
        error nothing is applied and the daemon runs on as before. Returns the changes."""
        new = load_config(self.config.path)
        changes = reload_changes(self.config, new)
        key = load_node_key(new)
        public = public_key_bytes(key)
        if public != self.public_key:
            changes.append(
                f"signing key: {key_id(self.public_key).hex()} -> {key_id(public).hex()}"
            )
        old = self.config
        if new.pool != old.pool:
            pins = self._reload_pool(new)
            if pins:
                changes.append(
                    f"pool: kept {len(pins)} unchanged group(s) where they are (reload pins;"
                    " vipctl rebalance lets them go): " + ", ".join(sorted(pins))
                )
        self.core.rekey(new, key, public)
        if new.log_level != old.log_level:
            configure_logging(new.log_level, new.log_format)
        self.hooks.hooks = new.hooks  # read at each fire: queued events run the new commands
        self.config, self.key, self.public_key = new, key, public
        log.info("reloaded", changes=changes or ["nothing"])
        self._step()
        return changes

    def _reload_pool(self, new: Config) -> dict[str, str]:
        """Switch to a new pool: renumber the core's groups by name, keep unchanged groups
        where they are (pins), and retire what the new pool no longer has."""
        old = self.config
        fresh = Controller(new)
        pins = fresh.reload_pins(self.controller, self.core)
        self.core.reload_pool(new)
        self.controller.use_pool(new)
        if pins:
            table = self.core.overrides.with_moves(pins, by=new.node, reason="reload")
            if self.core.table_fits(table):
                self.core.set_overrides(table)
            else:
                log.error("reload_pins_dropped", groups=sorted(pins), detail="table full")
        after = {g.name: g for g in new.pool}
        self._retired += [g for g in old.pool if after.get(g.name) != g]
        self.config = new
        self._index_pool()
        self._watched_groups = None  # a kept group may have other addresses now
        self._dirty.set()
        return pins

    def _reload_on_signal(self) -> None:
        try:
            self.reload()
        except (ConfigError, ReloadRefused) as e:
            log.error("reload_failed", error=str(e), detail="config unchanged")

    async def _cmd_reload(self, request: dict[str, Any], caller: Caller) -> Any:
        try:
            return {"changes": self.reload()}
        except (ConfigError, ReloadRefused) as e:
            log.error("reload_failed", error=str(e), uid=caller.uid, detail="config unchanged")
            raise RequestError(str(e)) from None

    async def _shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Anything still held (handover timed out, apply failed) is released now.
        self.target = frozenset()
        self._hold_reason = "stopping"
        await self._apply_once()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        self.driver.close()
        await self.control.close()
        if self._exporter is not None:
            self._exporter.shutdown()
        self.listener.close()
        self.watcher.close()
        self.announcer.close()
        self.addresses.close()
        await self.hooks.close(HOOK_GRACE)
        log.info("stopped")

    # --- the step: after every input, act on the core's events -----------------------

    def _step(self) -> None:
        """Handle the core's events, re-plan what to hold, finish a stop, send what is due."""
        now = self.loop.time()
        self._handle_events()
        self._replan(now)
        if self.core.leaving and self._leave_complete():
            self._stopped.set()
        elif self._stop_deadline is not None and now >= self._stop_deadline:
            log.warning("stop_deadline_passed", held=sorted(self._held_groups()))
            self._stopped.set()
        else:
            self._arm_deadline()
        self.driver.flush()

    def _arm_deadline(self) -> None:
        """Our own deadlines (handover timeout, stop bound); the driver owns the core's timer."""
        pending = [
            d for d in (self.controller.next_deadline(), self._stop_deadline) if d is not None
        ]
        when = min(pending) if pending else None
        if self._deadline_timer is not None:
            if when is not None and self._deadline_timer.when() == when:
                return
            self._deadline_timer.cancel()
            self._deadline_timer = None
        if when is not None:
            self._deadline_timer = self.loop.call_at(when, self._on_deadline)

    def _on_deadline(self) -> None:
        self._deadline_timer = None
        self._step()

    def _replan(self, now: float) -> None:
        core = self.core
        held = self._held_groups()
        decision = self.controller.decide(core, held, now)
        view = core.view.digest_hex
        for o in decision.outcomes:
            level = log.warning if o.how in ("timeout", "stalled") else log.info
            level("handover", group=o.group, new_owner=o.new_owner, how=o.how, view=view)
        if decision.reason != self._hold_reason:
            log.info("holding", reason=decision.reason, view=view)
            self._hold_reason = decision.reason
        for name in decision.quiet:
            for address in self.config.pool[self.pool_index[name]].addresses:
                self.announcer.cancel(address)
        for name in decision.announce:
            group = self.config.pool[self.pool_index[name]]
            log.info(
                "reannounce",
                group=name,
                also_held_by=sorted(core.holders(self.pool_index[name])),
                view=view,
            )
            core.counters["reannouncements"] += 1
            for address in group.addresses:
                self.announcer.announce(group.interface, address)
        if decision.hold != self.target:
            self.target = decision.hold
            self._dirty.set()
        self._watch_conflicts(held)

    def _watch_conflicts(self, held: frozenset[str]) -> None:
        """Listen for other MACs on the addresses we own and hold (and only those: a group
        being handed over must not be pulled back from its new owner)."""
        mine = self.controller.owned & held
        if mine == self._watched_groups:
            return  # almost every step: nothing to re-arm
        self._watched_groups = mine
        defending = {a.ip: g.name for g in self.config.pool if g.name in mine for a in g.addresses}
        for ip in self._defending.keys() - defending.keys():
            self.defend.forget(ip)
        self._defending = defending
        by_iface: dict[str, set[ipaddress.IPv4Address | ipaddress.IPv6Address]] = {
            iface: set() for iface in self.actual
        }
        for ip, name in defending.items():
            by_iface.setdefault(self.config.pool[self.pool_index[name]].interface, set()).add(ip)
        for iface, ips in by_iface.items():
            self.listener.watch(iface, ips, self._macs.get(iface))

    def _on_sighting(self, sighting: Sighting) -> None:
        """Another MAC announced or answered for an address we own: announce it again now,
        or when the defend interval ends (so the last word is ours, see `DefendPolicy`)."""
        name = self._defending.get(sighting.address)
        if name is None:
            return
        self.core.counters["conflicts"] += 1
        self._conflicts.warning(
            "address_conflict",
            key=str(sighting.address),
            group=name,
            address=str(sighting.address),
            other_mac=sighting.mac.hex(":"),
            kind=sighting.kind,
            interface=sighting.interface,
        )
        now = self.loop.time()
        when = self.defend.on_conflict(sighting.address, now)
        if when is not None:
            self.loop.call_at(when, self._defend_address, sighting.address)

    def _defend_address(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
        if not self._announce_once(ip):
            return  # released or handed over meanwhile
        self.defend.defended(ip, self.loop.time())
        self.core.counters["defences"] += 1

    def _announce_once(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """One announcement of an address we own and hold (defence, refresh); False if we
        no longer do."""
        name = self._defending.get(ip)
        if name is None:
            return False
        group = self.config.pool[self.pool_index[name]]
        for address in group.addresses:
            if address.ip == ip:
                self.announcer.announce_once(group.interface, address)
        return True

    def _held_groups(self) -> frozenset[str]:
        """Groups with every address present in the kernel."""
        return frozenset(
            g.name
            for g in self.config.pool
            if all(a in self.actual.get(g.interface, ()) for a in g.addresses)
        )

    def _leave_complete(self) -> bool:
        return not self.target and not any(self.actual.values())

    # --- carrying out address changes ----------------------------------------------------

    async def _apply_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            await self._apply_once()
            self._step()

    async def _apply_once(self) -> None:
        async with self._apply_lock:  # never interleaved with a reconcile pass
            before = self._held_groups()
            actions = plan(self.config.pool, self.target, self.actual)
            actions += self._retire()
            claiming = {a.group for a in actions if isinstance(a, ClaimAddress)} - before
            releasing = {a.group for a in actions if isinstance(a, ReleaseAddress)}
            reason = self._hold_reason or "placement"
            why = {a.group: a.reason for a in actions if isinstance(a, ReleaseAddress)}
            for name in sorted(claiming):
                self._hook("up", name, reason)
            for name in sorted(releasing):
                self._hook("down", name, _release_reason(why[name], reason))
            for action in actions:
                if isinstance(action, ClaimAddress):
                    await self._claim(action)
                else:
                    await self._release(action)
            after = self._held_groups()
            for name in sorted(claiming & after):
                self._hook("post_up", name, reason)
            for name in sorted(releasing - after):
                self._hook("post_down", name, _release_reason(why[name], reason))
            self.core.set_held(frozenset(self.pool_index[g] for g in after), now=self.loop.time())

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
            self.hooks.fire(event, name, group.addresses, group.interface, reason)

    def _group_named(self, name: str) -> PoolGroup | None:
        index = self.pool_index.get(name)
        if index is not None:
            return self.config.pool[index]
        return next((g for g in self._retired if g.name == name), None)

    async def _claim(self, a: ClaimAddress) -> None:
        try:
            added = await self.addresses.add(a.interface, a.address)
        except InterfaceMissing as e:
            self.core.counters["claim_errors"] += 1
            self._errors.error(
                "claim_failed", key=f"claim {a.interface}", group=a.group, error=str(e)
            )
            return
        except Exception as e:  # netlink refused: log, keep running, retry on next reconcile
            self.core.counters["claim_errors"] += 1
            log.error("claim_failed", group=a.group, address=str(a.address), error=str(e))
            return
        self.actual.setdefault(a.interface, set()).add(a.address)
        self.announcer.announce(a.interface, a.address)
        self.core.counters["claims"] += 1
        log.info(
            "claimed",
            group=a.group,
            address=str(a.address),
            interface=a.interface,
            already_present=not added,
            view=self.core.view.digest_hex,
        )

    async def _release(self, a: ReleaseAddress) -> None:
        self.announcer.cancel(a.address)
        try:
            await self.addresses.remove(a.interface, a.address)
        except InterfaceMissing:
            pass  # the interface and its addresses are gone: nothing left to release
        except Exception as e:
            log.error("release_failed", group=a.group, address=str(a.address), error=str(e))
            return
        self.actual.get(a.interface, set()).discard(a.address)
        self.core.counters["releases"] += 1
        log.info(
            "released",
            group=a.group,
            address=str(a.address),
            interface=a.interface,
            reason=a.reason,
            view=self.core.view.digest_hex,
        )

    async def _kernel_pool_addresses(self) -> dict[str, set[IPInterface]]:
        """Pool addresses the kernel has, per pool interface. An interface that is gone has
        none; one whose listing failed for another reason is left out (unknown, not empty)."""
        found: dict[str, set[IPInterface]] = {}
        for iface in {g.interface for g in self.config.pool}:
            try:
                present = await self.addresses.list_addresses(iface)
            except InterfaceMissing as e:
                self._errors.error("interface_missing", key=f"list {iface}", error=str(e))
                present = set()
            except AddressError as e:
                self._errors.error("list_failed", key=f"list {iface}", error=str(e))
                continue
            found[iface] = {a for a in present if a.ip in self.pool_ips}
        return found

    async def _remove_stale(self) -> None:
        """Pool addresses left by an earlier run (crash) are not ours until placement says so."""
        for iface, present in (await self._kernel_pool_addresses()).items():
            for address in present:
                self.actual.setdefault(iface, set()).add(address)
                log.warning("stale_address", address=str(address), interface=iface)
        self.target = frozenset()
        await self._apply_once()

    async def _reconcile_loop(self) -> None:
        """Compare the kernel with what we believe we hold: every reconcile_interval, and at
        once when netlink reports a change to a pool address (someone ran `ip addr del`)."""
        while True:
            # Not asyncio.wait_for: on 3.11 it can swallow a cancellation that arrives as
            # the event is set (then stop() would wait for this task forever).
            tick = self.loop.call_later(
                self.config.timing.reconcile_interval, self._reconcile_now.set
            )
            try:
                await self._reconcile_now.wait()
            finally:
                tick.cancel()
            self._reconcile_now.clear()
            await self._learn_macs()
            async with self._apply_lock:  # our own claims in flight are not drift
                kernel = await self._kernel_pool_addresses()
                for iface, real in kernel.items():
                    have = self.actual.get(iface, set())
                    if have != real:
                        log.warning(
                            "drift",
                            interface=iface,
                            missing=sorted(map(str, have - real)),
                            unexpected=sorted(map(str, real - have)),
                        )
                        self.core.counters["drift_repairs"] += 1
                        self.actual[iface] = set(real)
                        self._dirty.set()
            systemd.notify("WATCHDOG=1")

    async def _learn_macs(self) -> None:
        """Our MAC per pool interface: frames from it are ours, never a conflict."""
        for iface in {g.interface for g in self.config.pool}:
            try:
                mac = await self.addresses.mac_address(iface)
            except AddressError:
                continue  # reported by the listing; the listener still skips outgoing frames
            if self._macs.get(iface) != mac:
                self._macs[iface] = mac
                self._watched_groups = None  # re-arm the listener with the new MAC

    def _on_address_change(self, change: AddressChange | Resync) -> None:
        # Resync: netlink dropped notifications (overflow), so anything may have changed.
        if isinstance(change, Resync) or change.address.ip in self.pool_ips:
            self._reconcile_now.set()

    async def _refresh_loop(self) -> None:
        """announce.refresh_interval: every owned, held address once more (switches and hosts
        that age entries out faster than clients ask again)."""
        while True:
            interval = self.config.announce.refresh_interval
            await asyncio.sleep(interval or 3600.0)
            if not interval:
                continue
            for ip in list(self._defending):
                if self._announce_once(ip):
                    self.core.counters["refreshes"] += 1

    async def _stats_loop(self) -> None:
        """Once a second: our load figures into the heartbeat, a snapshot to the exporter."""
        collector = StatsCollector()
        while True:
            drops = self.driver.kernel_drops()
            if drops is not None:  # counted by the kernel: the core never saw these
                self.core.counters["rx_kernel_drops"] = drops
            self.core.set_stats(collector.collect())
            self.metrics.publish(self.status())
            await asyncio.sleep(STATS_INTERVAL)

    # --- logging and status --------------------------------------------------------------

    def _handle_events(self) -> None:
        view = self.core.view.digest_hex
        while (event := self.core.next_event()) is not None:
            self.controller.observe(event, self.loop.time())
            name = _snake(type(event).__name__)
            fields = asdict(event)
            if isinstance(event, ev.PacketRejected):
                self._rejections.warning("packet_rejected", key=event.reason, **fields)
            elif isinstance(event, ev.OverridesAdopted):
                log.info(name, view=view, **fields)
                self._save_overrides()
            elif isinstance(event, ev.PoolDiffers):
                log.warning(name, view=view, detail="expected during a rolling reload", **fields)
            elif isinstance(event, ev.ConfigMismatch | ev.ClockSkew):
                log.error(name, view=view, **fields)
            elif isinstance(event, ev.MemberLost | ev.LoopStalled):
                log.warning(name, view=view, **fields)
            elif isinstance(event, ev.MemberStateChanged):
                log.debug(name, view=view, **fields)
            else:
                log.info(name, view=view, **fields)

    # --- the operator table: persistence and commands -----------------------------------

    def _load_overrides(self) -> None:
        try:
            table = load_overrides(self.config.state_dir)
        except OverridesError as e:
            log.error("overrides_unreadable", error=str(e), detail="starting with no overrides")
            return
        if table is not None:
            self.core.set_overrides(table, source="state")

    def _save_overrides(self) -> None:
        if self.config.state_dir is None:
            return
        try:
            save_overrides(self.config.state_dir, self.core.overrides)
        except OSError as e:
            self._errors.error("overrides_not_saved", key="save overrides", error=str(e))

    def _apply_table(self, table: Overrides, caller: Caller, what: str) -> dict[str, Any]:
        if not self.core.table_fits(table):
            raise RequestError(
                "the operator table would no longer fit a heartbeat: clear some moves first"
                " (vipctl move GROUP --auto, vipctl rebalance)"
            )
        self.core.set_overrides(table)
        log.info("operator_change", change=what, uid=caller.uid, version=table.version)
        self._step()
        return {"version": table.version, "change": what}

    def _member_arg(self, request: dict[str, Any], key: str) -> str:
        name = request.get(key) or self.config.node
        if not isinstance(name, str) or self.config.member(name) is None:
            raise RequestError(f"{name!r} is not in the roster")
        return name

    async def _cmd_move(self, request: dict[str, Any], caller: Caller) -> Any:
        group, target = request.get("group"), request.get("node")
        if not isinstance(group, str) or group not in self.pool_index:
            raise RequestError(f"{group!r} is not a group of this node's pool")
        table = self.core.overrides
        if target is None:
            if table.move_of(group) is None:
                raise RequestError(f"{group} has no override: it is placed automatically")
            reply = self._apply_table(
                table.with_move(group, None, by=self.config.node), caller, f"{group} -> auto"
            )
        else:
            target = self._member_arg(request, "node")
            if target in table.drained:
                raise RequestError(f"{target} is drained: undrain it first")
            reply = self._apply_table(
                table.with_move(group, target, by=self.config.node), caller, f"{group} -> {target}"
            )
            if target not in self.core.view.members:
                reply["note"] = (
                    f"{target} is not a live member now: {group} stays with automatic"
                    " placement until it is"
                )
        return reply

    async def _cmd_drain(self, request: dict[str, Any], caller: Caller) -> Any:
        node, drained = self._member_arg(request, "node"), bool(request.get("drained", True))
        table = self.core.overrides
        if (node in table.drained) == drained:
            raise RequestError(f"{node} is already {'drained' if drained else 'not drained'}")
        what = f"{'drain' if drained else 'undrain'} {node}"
        reply = self._apply_table(
            table.with_drain(node, drained, by=self.config.node), caller, what
        )
        if drained and not set(self.core.view.members) - set(self.core.overrides.drained):
            reply["note"] = "every live member is drained: they all keep serving"
        return reply

    async def _cmd_rebalance(self, request: dict[str, Any], caller: Caller) -> Any:
        table = self.core.overrides
        pins = [m.group for m in table.moves if m.reason == "reload"]
        if not pins:
            return {"version": table.version, "change": "no reload pins"}
        return self._apply_table(
            table.without_reason("reload", by=self.config.node),
            caller,
            f"released {len(pins)} reload pin(s): {', '.join(pins)}",
        )

    async def _cmd_status(self, request: dict[str, Any], caller: Caller) -> dict[str, Any]:
        return self.status()

    def status(self) -> dict[str, Any]:
        core = self.core
        now = self.loop.time()
        owners = self.controller.owners(core)
        held = self._held_groups()
        table = core.overrides
        members: list[dict[str, Any]] = [
            {
                "name": core.name,
                "state": "self",
                "age": 0.0,
                "incarnation": core.incarnation,
                "flags": _flag_names(core.flags),
                "config_digest_ok": True,
                "pool_digest": self.config.pool_digest.hex(),
                "drained": core.draining,
            }
        ]
        for p in core.peers.values():
            members.append(
                {
                    "name": p.name,
                    "state": p.state.value,
                    "age": None if p.last_heard is None else round(now - p.last_heard, 3),
                    "incarnation": p.incarnation,
                    "flags": _flag_names(p.flags),
                    "config_digest_ok": p.config_ok,
                    "pool_digest": p.pool_digest.hex() if p.pool_digest else None,
                    "drained": p.name in table.drained,
                }
            )
        return {
            "node": core.name,
            "cluster": self.config.cluster,
            "incarnation": core.incarnation,
            "ready": core.ready,
            "mature": core.mature,
            "leaving": core.leaving,
            "passive": core.config_passive,
            "holddown": core.holddown_until is not None,
            "holding": self._hold_reason,
            "config_digest": core.config_digest.hex(),
            "view": {"digest": core.view.digest_hex, "members": list(core.view.members)},
            "members": members,
            "pool": [
                {
                    "group": g.name,
                    "interface": g.interface,
                    "addresses": [str(a) for a in g.addresses],
                    "owner": owners.get(g.name),
                    "held_here": g.name in held,
                    "override": (
                        {"node": m.target, "reason": m.reason}
                        if (m := table.move_of(g.name)) is not None
                        else None
                    ),
                    "prefer": list(g.prefer),
                }
                for g in self.config.pool
            ],
            "overrides": {
                "version": table.version,
                "issuer": table.issuer,
                "moves": [
                    {"group": m.group, "node": m.target, "reason": m.reason} for m in table.moves
                ],
                "drained": list(table.drained),
            },
            "counters": {
                **dict(core.counters),
                "rejected": dict(core.rejected),
                "hooks": dict(self.hooks.counters),
                "notify_sent": self.announcer.notify_sent,
                "notify_dropped": self.announcer.notify_dropped,
            },
            "announcements": {str(a): n for a, n in self.announcer.frames_sent.items()},
        }


def open_transport(cfg: Config) -> tuple[socket.socket, list[tuple[str, int]]]:
    """The heartbeat socket and where each heartbeat goes (the group, or every peer)."""
    if cfg.transport == "multicast":
        sock = open_multicast_socket(cfg.multicast_group, cfg.port, cfg.interface)
        return sock, [(str(cfg.multicast_group), cfg.port)]
    me = cfg.member(cfg.node)
    assert me is not None and me.address is not None  # enforced by the config loader
    peers = [(str(m.address), cfg.port) for m in cfg.roster if m.name != cfg.node and m.address]
    return open_unicast_socket(me.address, cfg.port, cfg.interface), peers


def _release_reason(action_reason: str, hold_reason: str) -> str:
    """VIPD_REASON of a release: the pool edit that retired it, else why we hold what we
    hold ("placement": it moved to another member)."""
    return action_reason if action_reason == "removed from pool" else hold_reason


def _flag_names(flags: Any) -> list[str]:
    return [f.name.lower() for f in type(flags) if f.value and f in flags and f.name]


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


def build_daemon(config: Config) -> Daemon:
    key = load_node_key(config)
    a = config.announce
    return Daemon(
        config,
        key,
        addresses=NetlinkAddressManager(),
        announcer_factory=lambda loop: RawAnnouncer(
            loop,
            mac_address,
            schedule=a.schedule,
            na_router=a.na_router,
            notify=a.notify,
            notify_rate=a.notify_rate,
        ),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vipd", description="virtual-IP failover daemon")
    parser.add_argument("--config", "-c", default="/etc/vipd/vipd.toml", help="TOML config file")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        configure_logging(config.log_level, config.log_format)
        daemon = build_daemon(config)
    except ConfigError as e:
        print(f"vipd: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(f"vipd: {args.config}: OK ({len(config.roster)} members, {len(config.pool)} groups)")
        return 0
    try:
        return asyncio.run(daemon.run())
    except TransportError as e:
        print(f"vipd: config error: {config.path}: {e.key}: {e}; {e.fix}", file=sys.stderr)
        return 2
