"""The asyncio adapter for the membership core: socket readiness, the loop's clock, one timer.

It feeds datagrams and timer expiries to the sans-IO core, sends what the core wants sent,
and calls `on_update` after every input so the daemon can act on the core's events. It makes
no protocol decisions.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Sequence

import structlog

from vipd.host.ratelimit import RateLimitedLog
from vipd.kernel.transport import kernel_drops
from vipd.membership.core import MembershipCore

RECV_BUFFER = 2048  # > wire.MAX_DATAGRAM, so an oversized datagram is seen as such
MAX_READS_PER_WAKEUP = 64  # a flood must not starve the timers

log = structlog.get_logger("vipd.membership")


class MembershipDriver:
    def __init__(
        self,
        core: MembershipCore,
        sock: socket.socket,
        destinations: Sequence[tuple[str, int]],
        loop: asyncio.AbstractEventLoop,
        on_update: Callable[[], None],
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.core = core
        self._sock = sock
        self._destinations = tuple(destinations)
        self._loop = loop
        self._on_update = on_update
        self._wall = wall_clock
        self._timer: asyncio.TimerHandle | None = None
        self._errors = RateLimitedLog(log, interval=10.0)
        self._open = False

    def start(self) -> None:
        self._open = True
        self._loop.add_reader(self._sock.fileno(), self._on_readable)
        self.flush()

    def close(self) -> None:
        """Send what is pending (a last LEAVING heartbeat), then stop and close the socket."""
        if not self._open:
            return
        self.flush()
        self._open = False
        if self._timer is not None:
            self._timer.cancel()
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    def flush(self) -> None:
        """Send whatever the core has due and re-arm the timer. Idempotent: cheap to repeat."""
        if not self._open:
            return
        now = self._loop.time()
        for datagram in self.core.datagrams_to_send(now=now, wall=self._wall()):
            for destination in self._destinations:
                try:
                    self._sock.sendto(datagram, destination)
                except OSError as e:  # ENETDOWN, ENOBUFS...: counted, retried at the next beat
                    self.core.counters["tx_errors"] += 1
                    self._errors.warning(
                        "send_failed",
                        key=f"send {destination[0]}",
                        to=destination[0],
                        error=e.strerror,
                    )
        when = self.core.get_timer()
        if self._timer is not None:
            if self._timer.when() == when:
                return
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)

    def kernel_drops(self) -> int | None:
        return kernel_drops(self._sock) if self._open else None

    def _on_readable(self) -> None:
        for _ in range(MAX_READS_PER_WAKEUP):
            try:
                data, addr = self._sock.recvfrom(RECV_BUFFER)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._errors.warning("receive_failed", key="recv", error=e.strerror)
                break
            self.core.receive(data, addr[0], now=self._loop.time(), wall=self._wall())
        self._on_update()
        self.flush()

    def _on_timer(self) -> None:
        self._timer = None
        self.core.handle_timer(now=self._loop.time())
        self._on_update()
        self.flush()
