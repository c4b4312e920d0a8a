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
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from vipd.arp.frames import announcement_frames
from vipd.arp.sender import FrameSender
from vipd.config import IPInterface

MacLookup = Callable[[str], bytes | Awaitable[bytes]]

DEFAULT_SCHEDULE: tuple[float, ...] = (0.0, 0.05, 1.0, 2.0, 5.0)

log = structlog.get_logger()


class Announcer(Protocol):
    """Tells the link that this node now answers for an address (see docs/internals.md)."""

    #: Frames that left, per address, cumulative (exported as a metric).
    frames_sent: dict[IPInterface, int]

    def announce(self, interface: str, address: IPInterface) -> None:
        """Burst now plus scheduled repeats; a new call restarts the schedule."""
        ...

    def cancel(self, address: IPInterface) -> None:
        """Stop pending repeats (the address is being released)."""
        ...

    def close(self) -> None: ...


class FrameSink(Protocol):
    """What the announcer needs from a per-interface sender (`FrameSender`)."""

    def current_generation(self) -> int:
        """Changes whenever the interface name starts denoting another device."""
        ...

    def send(self, frame: bytes) -> bool: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class _Burst:
    interface: str
    address: IPInterface
    handles: list[asyncio.TimerHandle] = field(default_factory=list)
    waiter: asyncio.Task[None] | None = None  # waiting for the MAC lookup
    epoch: int = 0  # sender generation the frames' MAC belongs to
    remaining: int = 0

    def cancel(self) -> None:
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
    Counters for metrics: `frames_sent[address]` (frames that left, cumulative),
    `send_errors`, `lookup_errors`.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        mac_lookup: MacLookup,
        schedule: Iterable[float] = DEFAULT_SCHEDULE,
        *,
        sender_factory: Callable[[str], FrameSink] = FrameSender,
    ) -> None:
        offsets = tuple(sorted(float(s) for s in schedule))
        if not offsets or offsets[0] < 0:
            raise ValueError(f"announce schedule needs offsets >= 0 seconds, got {schedule!r}")
        self._loop = loop
        self._mac_lookup = mac_lookup
        self.schedule = offsets
        self._sender_factory = sender_factory
        self.frames_sent: dict[IPInterface, int] = {}
        self.send_errors = 0
        self.lookup_errors = 0
        # interface -> (MAC, sender generation read before the lookup started)
        self._macs: dict[str, tuple[bytes, int]] = {}
        self._lookups: dict[str, asyncio.Task[tuple[bytes, int] | None]] = {}
        self._frames: dict[tuple[bytes, IPInterface], tuple[bytes, ...]] = {}
        self._senders: dict[str, FrameSink] = {}
        self._bursts: dict[IPInterface, _Burst] = {}
        self._closed = False

    @property
    def pending(self) -> frozenset[IPInterface]:
        """Addresses with repeats still scheduled (or waiting for their MAC)."""
        return frozenset(self._bursts)

    def announce(self, interface: str, address: IPInterface) -> None:
        if self._closed:
            log.warning("announce_after_close", interface=interface, address=str(address))
            return
        # A fresh announce (takeover, conflict seen, refresh) supersedes a running schedule.
        self.cancel(address)
        burst = _Burst(interface, address)
        self._bursts[address] = burst
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

    def cancel(self, address: IPInterface) -> None:
        burst = self._bursts.pop(address, None)
        if burst is not None:
            burst.cancel()

    def close(self) -> None:
        """Cancel every schedule and lookup and close the sockets; idempotent."""
        self._closed = True
        for burst in self._bursts.values():
            burst.cancel()
        self._bursts.clear()
        for lookup in self._lookups.values():
            lookup.cancel()
        self._lookups.clear()
        for sender in self._senders.values():
            sender.close()
        self._senders.clear()

    # -- internals ------------------------------------------------------------------------

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
        elif self._bursts.get(burst.address) is burst:
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
        mac, burst.epoch = known
        frames = self._frames_for(mac, burst.address)
        burst.remaining = len(self.schedule)
        for offset in self.schedule:
            if offset == 0:
                self._fire(burst, frames)
            else:
                burst.handles.append(self._loop.call_later(offset, self._fire, burst, frames))

    def _frames_for(self, mac: bytes, address: IPInterface) -> tuple[bytes, ...]:
        key = (mac, address)
        frames = self._frames.get(key)
        if frames is None:
            frames = self._frames[key] = announcement_frames(mac, address)
        return frames

    def _fire(self, burst: _Burst, frames: tuple[bytes, ...]) -> None:
        if self._bursts.get(burst.address) is not burst:
            return  # cancelled or superseded between scheduling and firing
        sender = self._sender(burst.interface)
        generation = sender.current_generation()
        if generation != burst.epoch:
            # The name now denotes another device (deleted and recreated) or the MAC was
            # changed: announcing the old MAC would black-hole the address. Forget it and
            # start over with a fresh lookup.
            known = self._macs.get(burst.interface)
            if known is not None and known[1] != generation:
                del self._macs[burst.interface]
                self._frames = {k: v for k, v in self._frames.items() if k[0] != known[0]}
            log.info(
                "announce_interface_changed",
                interface=burst.interface,
                address=str(burst.address),
            )
            self.announce(burst.interface, burst.address)
            return
        ok = 0
        for frame in frames:
            if sender.send(frame):
                ok += 1
            else:
                self.send_errors += 1
        self.frames_sent[burst.address] = self.frames_sent.get(burst.address, 0) + ok
        burst.remaining -= 1
        if burst.remaining <= 0:
            self._finish(burst)

    def _finish(self, burst: _Burst) -> None:
        if self._bursts.get(burst.address) is burst:
            del self._bursts[burst.address]

    def _sender(self, interface: str) -> FrameSink:
        sender = self._senders.get(interface)
        if sender is None:
            sender = self._senders[interface] = self._sender_factory(interface)
        return sender


class FakeAnnouncer:
    """In-memory `Announcer` for unit tests.

    `calls` records ("announce", interface, address), ("cancel", None, address) and
    ("close", None, None); `active` maps addresses whose schedule would still be running
    to their interface.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None, IPInterface | None]] = []
        self.active: dict[IPInterface, str] = {}
        self.frames_sent: dict[IPInterface, int] = {}
        self.closed = False

    def announce(self, interface: str, address: IPInterface) -> None:
        self.calls.append(("announce", interface, address))
        self.active[address] = interface
        self.frames_sent[address] = self.frames_sent.get(address, 0) + 1

    def cancel(self, address: IPInterface) -> None:
        self.calls.append(("cancel", None, address))
        self.active.pop(address, None)

    def close(self) -> None:
        self.calls.append(("close", None, None))
        self.active.clear()
        self.closed = True

    def announced(self, address: IPInterface) -> int:
        """How many times `address` was announced."""
        return sum(1 for op, _, a in self.calls if op == "announce" and a == address)
