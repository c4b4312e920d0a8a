"""Announcing held addresses: a burst of GARP / unsolicited NA at once, then repeats.

Repeats matter because the first frames of a failover race the switch relearning the
port and hosts whose entries are locked for a moment after their last update; later ones
catch whoever missed the first (the default offsets 0, 0.05, 1, 2, 5 s follow keepalived's
"burst now, repeat later" practice).

`RawAnnouncer` runs entirely on the event loop: frames are built once per (MAC, address)
and cached, the burst at offset 0 goes out inside `announce()` when the MAC is known, and
repeats are `loop.call_later` handles, so `cancel()` on release is exact. Nothing here
raises into the loop: send and MAC-lookup failures are logged and counted.

The MAC comes from an injected `mac_lookup(interface)`; it may be synchronous or return an
awaitable (the daemon passes `AddressManager.mac_address`). Results are cached per
interface and one lookup per interface is in flight at a time, so a cold start announcing
hundreds of addresses makes one netlink request, not hundreds.

Three ways to announce, sharing the MAC lookup, the frame cache and the check that the
interface still is the device the MAC was read from:

* `announce()`: a claim. The whole schedule; its first burst also queues the notify list
  (`vipd.arp.notify`, throttled). A new call restarts the schedule.
* `announce_once()`: one burst now (periodic refresh, answering another MAC that claims
  the address). It neither restarts nor cancels a running schedule and does not notify.
* `cancel()`: a release. Stops the schedule, pending one-shots and queued notify frames.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from vipd.arp.frames import announcement_frames
from vipd.arp.notify import IPNetwork, Notifier
from vipd.arp.sender import FrameSender
from vipd.config import IPInterface

MacLookup = Callable[[str], bytes | Awaitable[bytes]]

DEFAULT_SCHEDULE: tuple[float, ...] = (0.0, 0.05, 1.0, 2.0, 5.0)
DEFAULT_NOTIFY_RATE = 500.0  # frames/s, as `config.Announce.notify_rate`

log = structlog.get_logger()


class Announcer(Protocol):
    """Tells the link that this node now answers for an address (see docs/internals.md)."""

    #: Frames that left, per address, cumulative (exported as a metric).
    frames_sent: dict[IPInterface, int]

    def announce(self, interface: str, address: IPInterface) -> None:
        """A claim: burst now plus scheduled repeats (and the notify list); a new call
        restarts the schedule."""
        ...

    def announce_once(self, interface: str, address: IPInterface) -> None:
        """One burst now (refresh, defence); a running schedule is left as it is."""
        ...

    def cancel(self, address: IPInterface) -> None:
        """Stop pending repeats and notify frames (the address is being released)."""
        ...

    def close(self) -> None: ...

    @property
    def notify_sent(self) -> int:
        """Notify-list frames that left, cumulative."""
        ...

    @property
    def notify_dropped(self) -> int:
        """Notify-list frames dropped because the queue was full, cumulative."""
        ...


class FrameSink(Protocol):
    """What the announcer needs from a per-interface sender (`FrameSender`)."""

    def current_generation(self) -> int:
        """Changes whenever the interface name starts denoting another device."""
        ...

    def send(self, frame: bytes) -> bool: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class _Burst:
    """One announcement run: a claim's schedule or a one-shot (offsets (0,))."""

    interface: str
    address: IPInterface
    offsets: tuple[float, ...]
    claim: bool  # announce(): its first burst notifies; False: announce_once()
    handles: list[asyncio.TimerHandle] = field(default_factory=list)
    waiter: asyncio.Task[None] | None = None  # waiting for the MAC lookup
    mac: bytes = b""
    epoch: int = 0  # sender generation the frames' MAC belongs to
    remaining: int = 0
    live: bool = True  # False once finished, cancelled or superseded

    def cancel(self) -> None:
        self.live = False
        for handle in self.handles:
            handle.cancel()
        self.handles.clear()
        if self.waiter is not None:
            self.waiter.cancel()
            self.waiter = None


class RawAnnouncer:
    """`Announcer` sending prebuilt frames on one AF_PACKET socket per interface.

    Addresses are keyed exactly as given (an `IPInterface`, prefix included): pass the same
    objects to `announce` and `cancel`, as the daemon does with its configured pool.
    Counters for metrics: `frames_sent[address]` (broadcast announcement frames that left,
    cumulative), `send_errors`, `lookup_errors`, `notify_sent`, `notify_dropped`.

    `na_router` is the router flag of the neighbour advertisements (config
    `announce.na_router`); `notify` and `notify_rate` the notify list and its budget in
    frames/s (`announce.notify`, `announce.notify_rate`; see `vipd.arp.notify.Notifier`).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        mac_lookup: MacLookup,
        schedule: Iterable[float] = DEFAULT_SCHEDULE,
        *,
        sender_factory: Callable[[str], FrameSink] = FrameSender,
        na_router: bool = False,
        notify: Iterable[IPNetwork] = (),
        notify_rate: float = DEFAULT_NOTIFY_RATE,
    ) -> None:
        offsets = tuple(sorted(float(s) for s in schedule))
        if not offsets or offsets[0] < 0:
            raise ValueError(f"announce schedule needs offsets >= 0 seconds, got {schedule!r}")
        self._loop = loop
        self._mac_lookup = mac_lookup
        self.schedule = offsets
        self.na_router = na_router
        self._sender_factory = sender_factory
        self.frames_sent: dict[IPInterface, int] = {}
        self.send_errors = 0
        self.lookup_errors = 0
        # interface -> (MAC, sender generation read before the lookup started)
        self._macs: dict[str, tuple[bytes, int]] = {}
        self._lookups: dict[str, asyncio.Task[tuple[bytes, int] | None]] = {}
        self._frames: dict[tuple[bytes, IPInterface], tuple[bytes, ...]] = {}
        self._senders: dict[str, FrameSink] = {}
        self._bursts: dict[IPInterface, _Burst] = {}  # running claim schedules
        self._once: set[_Burst] = set()  # one-shots waiting for their MAC
        self.notifier = Notifier(
            loop,
            notify,
            rate=notify_rate,
            sender_for=self._sender,
            na_router=na_router,
            on_interface_changed=self._notify_interface_changed,
        )
        self._closed = False

    @property
    def pending(self) -> frozenset[IPInterface]:
        """Addresses with repeats still scheduled (or waiting for their MAC)."""
        return frozenset(self._bursts)

    @property
    def notify_sent(self) -> int:
        return self.notifier.notify_sent

    @property
    def notify_dropped(self) -> int:
        return self.notifier.notify_dropped

    def announce(self, interface: str, address: IPInterface) -> None:
        if self._closed:
            log.warning("announce_after_close", interface=interface, address=str(address))
            return
        # A fresh claim (takeover, re-announce after a heal) supersedes a running schedule
        # and the notify frames still queued for it.
        self._stop_schedule(address)
        burst = _Burst(interface, address, self.schedule, claim=True)
        self._bursts[address] = burst
        self._launch(burst)

    def announce_once(self, interface: str, address: IPInterface) -> None:
        if self._closed:
            log.warning("announce_after_close", interface=interface, address=str(address))
            return
        burst = _Burst(interface, address, (0.0,), claim=False)
        self._once.add(burst)
        self._launch(burst)

    def cancel(self, address: IPInterface) -> None:
        self._stop_schedule(address)
        for burst in [b for b in self._once if b.address == address]:
            burst.cancel()
            self._once.discard(burst)

    def close(self) -> None:
        """Cancel every schedule and lookup and close the sockets; idempotent."""
        self._closed = True
        for burst in [*self._bursts.values(), *self._once]:
            burst.cancel()
        self._bursts.clear()
        self._once.clear()
        self.notifier.close()
        for lookup in self._lookups.values():
            lookup.cancel()
        self._lookups.clear()
        for sender in self._senders.values():
            sender.close()
        self._senders.clear()

    # -- internals ------------------------------------------------------------------------

    def _stop_schedule(self, address: IPInterface) -> None:
        burst = self._bursts.pop(address, None)
        if burst is not None:
            burst.cancel()
        self.notifier.cancel(address)

    def _launch(self, burst: _Burst) -> None:
        """Start `burst` now if its interface's MAC is known, else once it is looked up."""
        interface = burst.interface
        known = self._macs.get(interface)
        if known is not None:
            self._start(burst, known)
            return
        lookup = self._lookups.get(interface)
        if lookup is None:
            # Read before asking: if the device is replaced meanwhile, the epoch is stale
            # and the first send triggers a fresh lookup rather than trusting this MAC.
            epoch = self._sender(interface).current_generation()
            try:
                result = self._mac_lookup(interface)
            except Exception as exc:
                self._lookup_failed(interface, exc)
                self._finish(burst)
                return
            if not inspect.isawaitable(result):
                if self._remember_mac(interface, result, epoch):
                    self._start(burst, self._macs[interface])
                else:
                    self._finish(burst)
                return
            lookup = self._loop.create_task(self._await_mac(interface, result, epoch))
            self._lookups[interface] = lookup
        burst.waiter = self._loop.create_task(self._start_when_known(burst, lookup))

    def _remember_mac(self, interface: str, mac: bytes, epoch: int) -> bool:
        if not isinstance(mac, bytes) or len(mac) != 6:
            self._lookup_failed(interface, ValueError(f"not a 6-byte MAC: {mac!r}"))
            return False
        self._macs[interface] = (mac, epoch)
        return True

    async def _await_mac(
        self, interface: str, result: Awaitable[bytes], epoch: int
    ) -> tuple[bytes, int] | None:
        # Returns None on failure instead of raising: nobody may be left awaiting this
        # task, and an unretrieved exception would be logged by asyncio at GC time.
        try:
            mac = await result
        except Exception as exc:
            self._lookup_failed(interface, exc)
            return None
        finally:
            self._lookups.pop(interface, None)
        return self._macs[interface] if self._remember_mac(interface, mac, epoch) else None

    async def _start_when_known(
        self, burst: _Burst, lookup: asyncio.Task[tuple[bytes, int] | None]
    ) -> None:
        # shield: cancelling one address's burst must not cancel the shared lookup.
        known = await asyncio.shield(lookup)
        burst.waiter = None
        if known is None:
            self._finish(burst)
        elif burst.live:
            self._start(burst, known)

    def _lookup_failed(self, interface: str, exc: Exception) -> None:
        self.lookup_errors += 1
        log.warning(
            "announce_mac_lookup_failed",
            interface=interface,
            error=str(exc),
            error_type=type(exc).__name__,
        )

    def _start(self, burst: _Burst, known: tuple[bytes, int]) -> None:
        burst.mac, burst.epoch = known
        frames = self._frames_for(burst.mac, burst.address)
        burst.remaining = len(burst.offsets)
        for i, offset in enumerate(burst.offsets):
            first = i == 0
            if offset == 0:
                self._fire(burst, frames, first)
            else:
                handle = self._loop.call_later(offset, self._fire, burst, frames, first)
                burst.handles.append(handle)

    def _frames_for(self, mac: bytes, address: IPInterface) -> tuple[bytes, ...]:
        key = (mac, address)
        frames = self._frames.get(key)
        if frames is None:
            frames = self._frames[key] = announcement_frames(mac, address, router=self.na_router)
        return frames

    def _fire(self, burst: _Burst, frames: tuple[bytes, ...], first: bool) -> None:
        if not burst.live:
            return  # cancelled or superseded between scheduling and firing
        sender = self._sender(burst.interface)
        generation = sender.current_generation()
        if generation != burst.epoch:
            # The name now denotes another device (deleted and recreated) or the MAC was
            # changed: announcing the old MAC would black-hole the address. Forget it and
            # start over with a fresh lookup (a schedule restarts; a one-shot is redone).
            self._forget_mac(burst.interface, generation)
            log.info(
                "announce_interface_changed",
                interface=burst.interface,
                address=str(burst.address),
            )
            self._finish(burst)
            if burst.claim:
                self.announce(burst.interface, burst.address)
            else:
                self.announce_once(burst.interface, burst.address)
            return
        ok = 0
        for frame in frames:
            if sender.send(frame):
                ok += 1
            else:
                self.send_errors += 1
        self.frames_sent[burst.address] = self.frames_sent.get(burst.address, 0) + ok
        if first and burst.claim:
            self.notifier.notify(burst.interface, burst.address, burst.mac, burst.epoch)
        burst.remaining -= 1
        if burst.remaining <= 0:
            self._finish(burst)

    def _forget_mac(self, interface: str, generation: int) -> None:
        """Drop the cached MAC (and its frames) of `interface` unless read in `generation`."""
        known = self._macs.get(interface)
        if known is not None and known[1] != generation:
            del self._macs[interface]
            self._frames = {k: v for k, v in self._frames.items() if k[0] != known[0]}

    def _notify_interface_changed(self, interface: str, address: IPInterface) -> None:
        # The notifier found the device replaced before it sent all of a claim's frames:
        # the claim's MAC is stale everywhere, so announce it again (the notify list too).
        self._forget_mac(interface, self._sender(interface).current_generation())
        log.info("announce_interface_changed", interface=interface, address=str(address))
        self.announce(interface, address)

    def _finish(self, burst: _Burst) -> None:
        burst.cancel()
        if self._bursts.get(burst.address) is burst:
            del self._bursts[burst.address]
        self._once.discard(burst)

    def _sender(self, interface: str) -> FrameSink:
        sender = self._senders.get(interface)
        if sender is None:
            sender = self._senders[interface] = self._sender_factory(interface)
        return sender
