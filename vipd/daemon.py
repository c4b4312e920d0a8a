"""vipd: the asyncio shell around the pure node. Wiring only: no decision is made here.

Every input (a batch of datagrams, a timer, a kernel answer, a conflict frame, a signal, a
control request) goes to `vipd.node.node.Node`; the orders it returns are carried out in
order by the adapters: netlink (`vipd.kernel`), scapy frames (`vipd.arp`), hooks, the
heartbeat socket, systemd, the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vipd.arp import frames
from vipd.arp.announcer import Announcer
from vipd.arp.listener import ConflictListener, Sighting
from vipd.config import Config, ConfigError, IPInterface, load_config
from vipd.errors import StateError
from vipd.host import systemd
from vipd.host.control import Caller, Command, ControlServer, RequestError
from vipd.host.hooks import HookRunner
from vipd.host.keys import load_node_key, public_key_bytes
from vipd.host.log import configure_logging
from vipd.host.metrics import StatusCollector, serve
from vipd.host.ratelimit import RateLimitedLog
from vipd.host.state import (
    load_overrides,
    load_seen,
    next_incarnation,
    record_incarnation,
    save_overrides,
    save_seen,
)
from vipd.host.stats import StatsCollector
from vipd.host.supervise import Supervisor
from vipd.kernel.address_events import AddressChange, AddressWatcher, Resync
from vipd.kernel.addresses import AddressError, AddressManager, InterfaceMissing
from vipd.kernel.heartbeats import Transport, open_transport
from vipd.kernel.transport import TransportError
from vipd.membership import wire
from vipd.node import orders as o
from vipd.node.node import STOP_GRACE, CommandRejected, Node
from vipd.node.reload import ReloadRefused
from vipd.node.status import Status
from vipd.placement.overrides import OverridesError

log = structlog.get_logger("vipd")

STATS_INTERVAL = 1.0
HOOK_GRACE = 2.0  # at exit, how long running hooks (post_down...) may still take
SAVE_GRACE = 2.0  # at exit, how long the last operator-table write may still take
#: What a stop may take beyond handover_timeout: the node's grace, then the hooks and the
#: last write at exit, plus a second for the close itself.
STOP_BUDGET = STOP_GRACE + HOOK_GRACE + SAVE_GRACE + 1.0


def _watchdog() -> None:
    systemd.notify("WATCHDOG=1")


Listener = Callable[[asyncio.AbstractEventLoop, Callable[[Sighting], None]], Any]
Watcher = Callable[[asyncio.AbstractEventLoop, Callable[[AddressChange | Resync], None]], Any]


class Daemon:
    def __init__(
        self,
        config: Config,
        key: Ed25519PrivateKey,
        *,
        addresses: AddressManager,
        announcer_factory: Callable[[asyncio.AbstractEventLoop], Announcer],
        transport_factory: Callable[[Config, asyncio.AbstractEventLoop], Transport] = (
            open_transport
        ),
        listener_factory: Listener = ConflictListener,
        watcher_factory: Watcher = AddressWatcher,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.key = key
        self.addresses = addresses
        self._announcer_factory = announcer_factory
        self._transport_factory = transport_factory
        self._listener_factory = listener_factory
        self._watcher_factory = watcher_factory
        self.rng = rng or random.Random()
        self._wall = wall_clock
        self.hooks = HookRunner(config.hooks, config.node)
        self.transport: Transport | None = None
        self._timers: dict[o.TimerKey, asyncio.TimerHandle] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._kernel: asyncio.Task[None] | None = None  # the one netlink job in flight
        # state_dir writes, one writer per file: the newest value still waiting, and the task.
        self._unsaved: dict[str, tuple[Callable[[Path, Any], None], object]] = {}
        self._writers: dict[str, asyncio.Task[None]] = {}
        self._limited = RateLimitedLog(log, interval=10.0)
        self._reconcile_now = asyncio.Event()
        self._exit = asyncio.Event()

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self) -> int:
        loop = self.loop = asyncio.get_running_loop()
        cfg = self.config
        self.node = Node(
            cfg,
            self.key,
            public_key_bytes(self.key),
            incarnation=next_incarnation(cfg.state_dir, self._wall()),
            now=loop.time(),
            rng=self.rng,
            nonce=os.urandom(wire.NONCE_LEN),
            seen=load_seen(cfg.state_dir),
        )
        self._supervisor = Supervisor(loop, self._limited, self.node.task_failed)
        frames.preload()
        self.announcer = self._announcer_factory(loop)
        self.listener = self._listener_factory(loop, self._on_sighting)
        self.watcher = self._watcher_factory(loop, self._on_address_change)
        self._load_overrides()
        # The control socket first: a setup that cannot work stops us before we touch the
        # kernel (the stale-address cleanup).
        self.control = ControlServer(
            cfg.control_socket,
            cfg.control_mode,
            cfg.control_group,
            {
                "status": Command(self._cmd_status),
                "reload": Command(self._cmd_reload, mutating=True),
                **{
                    name: Command(self._cmd_operator, mutating=True)
                    for name in ("move", "drain", "rebalance")
                },
            },
        )
        await self.control.start()
        self._opened: asyncio.Future[None] = loop.create_future()
        self._do(self.node.start(now=loop.time(), wall=self._wall()))
        await self._opened  # stale addresses removed, transport open (or TransportError)
        self.metrics = StatusCollector()
        self._collector = StatsCollector()
        self._exporter = serve(cfg.metrics_listen, self.metrics) if cfg.metrics_listen else None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        spawn, periodic = self._supervisor.spawn, self._supervisor.periodic
        self._tasks = [
            spawn(self._reconcile_loop(), "reconcile"),
            spawn(periodic("stats", lambda: STATS_INTERVAL, self._stats, now=True), "stats"),
            spawn(periodic("refresh", self._refresh_interval, self._refresh, now=False), "refresh"),
        ]
        if (ping := systemd.watchdog_interval()) is not None:  # pinged by the loop itself
            beat = periodic("watchdog", lambda: ping, _watchdog, now=True)
            self._tasks.append(spawn(beat, "watchdog"))
        self.watcher.start()
        systemd.notify("READY=1")
        await self._exit.wait()
        await self._close()
        return 0

    def stop(self) -> None:
        """Graceful stop: the node hands its groups over, releases and says `Exit`. systemd
        is told how long that may take (TimeoutStopSec need not know the timing profile)."""
        systemd.extend_timeout(self.config.timing.handover_timeout + STOP_BUDGET)
        self._do(self.node.stop(now=self.loop.time(), wall=self._wall()))

    async def _close(self) -> None:
        for task in self._tasks:
            task.cancel()
        # return_exceptions: a task that failed (already logged) must not stop the close.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for handle in self._timers.values():
            handle.cancel()
        for writer in self._writers.values():  # the last word reaches the disk, if it can
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(writer), SAVE_GRACE)
        if self.transport is not None:
            self.transport.close()
        await self.control.close()
        if self._exporter is not None:
            self._exporter.shutdown()
        self.listener.close()
        self.watcher.close()
        self.announcer.close()
        self.addresses.close()
        await self.hooks.close(HOOK_GRACE)
        log.info("stopped")

    # --- carrying out the node's orders ------------------------------------------------------

    def _do(self, orders: list[o.Order]) -> None:
        for order in orders:
            match order:
                case o.SendDatagram(data) if self.transport is not None:
                    for destination, error in self.transport.send(data):
                        self._do(self.node.send_failed(destination, error))
                case o.SetTimer(timer, when):
                    if (old := self._timers.pop(timer, None)) is not None:
                        old.cancel()
                    if when is not None:
                        self._timers[timer] = self.loop.call_at(when, self._on_timer, timer)
                case o.Log():
                    self._log(order)
                case o.ClaimAddress() | o.ReleaseAddress():
                    self._kernel = self._supervisor.spawn(self._kernel_op(order), "kernel")
                case o.ListAddresses(interfaces):
                    self._kernel = self._supervisor.spawn(self._list(interfaces), "kernel")
                case o.Announce(interface, address):
                    self.announcer.announce(interface, address)
                case o.AnnounceOnce(interface, address):
                    self.announcer.announce_once(interface, address)
                case o.CancelAnnounce(address):
                    self.announcer.cancel(address)
                case o.WatchConflicts(interface, addresses, mac):
                    self.listener.watch(interface, addresses, mac)
                case o.RunHook(event, group, addresses, interface, reason):
                    self.hooks.fire(event, group, addresses, interface, reason)
                case o.OpenTransport():
                    self._open_transport()
                # The table lives on in memory and in heartbeats if it cannot be written;
                # without the incarnation the next start may be refused as a replay, and
                # without what peers sent a restart trusts captures for a while: say so.
                case o.SaveOverrides(table):
                    self._save("overrides_not_saved", save_overrides, table)
                case o.SaveIncarnation(incarnation):
                    self._save("incarnation_not_saved", record_incarnation, incarnation)
                case o.SaveSeen(seen):
                    record = {name: (inc, sent) for name, inc, sent in seen}
                    self._save("peers_seen_not_saved", save_seen, record)
                case o.Notify(text):
                    systemd.notify(text)
                case o.Exit():
                    self._exit.set()

    def _save(self, failed: str, write: Callable[[Path, Any], None], value: object) -> None:
        """Write `value` into state_dir off the loop (fsync on a slow disk must not delay a
        heartbeat): one writer per kind, and only the newest value still waiting is
        written. A failure is logged as `failed`; the daemon runs on."""
        if self.config.state_dir is None:
            return
        self._unsaved[failed] = (write, value)
        writer = self._writers.get(failed)
        if writer is None or writer.done():
            self._writers[failed] = self._supervisor.spawn(self._write(failed), "save")

    async def _write(self, failed: str) -> None:
        assert self.config.state_dir is not None
        while (job := self._unsaved.pop(failed, None)) is not None:
            write, value = job
            try:
                await asyncio.to_thread(write, self.config.state_dir, value)
            except StateError as e:
                self._limited.error(failed, key=failed, error=str(e))

    def _log(self, order: o.Log) -> None:
        if order.limit_key is not None and order.level in ("warning", "error"):
            getattr(self._limited, order.level)(order.event, key=order.limit_key, **order.fields)
        else:
            getattr(log, order.level)(order.event, **order.fields)

    def _open_transport(self) -> None:
        try:
            self.transport = self._transport_factory(self.config, self.loop)
        except TransportError as e:
            self._opened.set_exception(e)
            self._exit.set()
            return
        self.transport.start(self._on_datagrams)
        self._opened.set_result(None)

    def _on_datagrams(self, batch: list[tuple[bytes, str]]) -> None:
        self._do(self.node.receive(batch, now=self.loop.time(), wall=self._wall()))

    def _on_timer(self, timer: o.TimerKey) -> None:
        self._timers.pop(timer, None)
        self._do(self.node.handle_timer(timer, now=self.loop.time(), wall=self._wall()))

    def _on_sighting(self, sighting: Sighting) -> None:
        self._do(
            self.node.sighting(
                sighting.address,
                mac=sighting.mac,
                kind=sighting.kind,
                interface=sighting.interface,
                now=self.loop.time(),
            )
        )

    def _on_address_change(self, change: AddressChange | Resync) -> None:
        # Resync: netlink dropped notifications (overflow), so anything may have changed.
        if isinstance(change, Resync) or self.node.is_pool_address(change.address.ip):
            self._reconcile_now.set()

    # --- netlink jobs: one at a time (the node never asks for two) ---------------------------

    async def _kernel_op(self, op: o.ClaimAddress | o.ReleaseAddress) -> None:
        ok, existed, error = True, False, ""
        try:
            if isinstance(op, o.ClaimAddress):
                existed = not await self.addresses.add(op.interface, op.address)
            else:
                await self.addresses.remove(op.interface, op.address)
        except InterfaceMissing as e:
            # A release is done (the addresses went with the interface); a claim failed.
            ok, error = isinstance(op, o.ReleaseAddress), str(e)
        except Exception as e:  # netlink refused: the node logs it, a later pass retries
            ok, error = False, str(e)
        now, wall = self.loop.time(), self._wall()
        self._do(
            self.node.kernel_result(op, ok=ok, existed=existed, error=error, now=now, wall=wall)
        )

    async def _list(self, interfaces: tuple[str, ...]) -> None:
        """Addresses per pool interface and our MAC on it. A missing interface has none; one
        whose listing failed otherwise is left out (unknown, not empty)."""
        found: dict[str, set[IPInterface]] = {}
        macs: dict[str, bytes] = {}
        for iface in interfaces:
            try:
                with contextlib.suppress(AddressError):  # the listener still skips our frames
                    macs[iface] = await self.addresses.mac_address(iface)
                found[iface] = await self.addresses.list_addresses(iface)
            except InterfaceMissing as e:
                self._limited.error("interface_missing", key=f"list {iface}", error=str(e))
                found[iface] = set()
            except AddressError as e:
                self._limited.error("list_failed", key=f"list {iface}", error=str(e))
            except Exception as e:  # a bug below us: still an answer, or the node waits
                self._supervisor.failed("kernel", e)
        now, wall = self.loop.time(), self._wall()
        self._do(self.node.kernel_listing(found, macs=macs, now=now, wall=wall))

    # --- periodic work -----------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        """Compare the kernel with what the node believes: every reconcile_interval, and at
        once when netlink reports a change to a pool address (someone ran `ip addr del`)."""
        while True:
            # Not asyncio.wait_for: on 3.11 it can swallow a cancellation that arrives as
            # the event is set (then the exit would wait for this task forever).
            tick = self.loop.call_later(
                self.config.timing.reconcile_interval, self._reconcile_now.set
            )
            try:
                await self._reconcile_now.wait()
            finally:
                tick.cancel()
            self._reconcile_now.clear()
            self._supervisor.guard("reconcile", self._reconcile)

    def _reconcile(self) -> None:
        self._do(self.node.reconcile(now=self.loop.time(), wall=self._wall()))

    def _refresh_interval(self) -> float:
        return self.config.announce.refresh_interval or 3600.0  # 0: off (reload may set it)

    def _refresh(self) -> None:
        """announce.refresh_interval: every owned, held address once more (switches and hosts
        that age entries out faster than clients ask again)."""
        if self.config.announce.refresh_interval:
            self._do(self.node.refresh(now=self.loop.time()))

    def _stats(self) -> None:
        """Our load figures into the heartbeat, a snapshot to the exporter."""
        drops = self.transport.kernel_drops() if self.transport is not None else None
        if drops is not None:  # counted by the kernel: the core never saw these
            self.node.kernel_drops(drops)
        self.node.set_stats(self._collector.collect())
        self.metrics.publish(self.status())

    # --- the operator: state file, reload, commands ------------------------------------------

    def _load_overrides(self) -> None:
        try:
            table = load_overrides(self.config.state_dir)
        except OverridesError as e:
            log.error("overrides_unreadable", error=str(e), detail="starting with no overrides")
            return
        if table is not None:
            self.node.load_overrides(table)

    def reload(self) -> list[str]:
        """Re-read the config file and key; on any error nothing is applied."""
        new = load_config(self.config.path)
        key = load_node_key(new)
        now, wall = self.loop.time(), self._wall()
        changes, orders = self.node.reload(new, key, public_key_bytes(key), now=now, wall=wall)
        if new.log_level != self.config.log_level:
            configure_logging(new.log_level, new.log_format)
        self.hooks.hooks = new.hooks  # read at each fire: queued events run the new commands
        self.config, self.key = new, key
        self._do(orders)
        return changes

    def _reload_on_signal(self) -> None:
        try:
            self.reload()
        except (ConfigError, ReloadRefused, CommandRejected) as e:
            log.error("reload_failed", error=str(e), detail="config unchanged")

    async def _cmd_reload(self, request: dict[str, Any], caller: Caller) -> Any:
        try:
            return {"changes": self.reload()}
        except (ConfigError, ReloadRefused, CommandRejected) as e:
            log.error("reload_failed", error=str(e), uid=caller.uid, detail="config unchanged")
            raise RequestError(str(e)) from None

    async def _cmd_operator(self, request: dict[str, Any], caller: Caller) -> Any:
        now, wall = self.loop.time(), self._wall()
        try:
            reply, orders = self.node.command(
                str(request.get("cmd")), request, uid=caller.uid, now=now, wall=wall
            )
        except CommandRejected as e:
            raise RequestError(str(e)) from None
        self._do(orders)
        return reply

    async def _cmd_status(self, request: dict[str, Any], caller: Caller) -> dict[str, Any]:
        return self.status().to_json()

    def status(self) -> Status:
        return self.node.status(
            now=self.loop.time(),
            hook_counters=dict(self.hooks.counters),
            notify_sent=self.announcer.notify_sent,
            notify_dropped=self.announcer.notify_dropped,
            frames_sent={str(a): n for a, n in self.announcer.frames_sent.items()},
        )
