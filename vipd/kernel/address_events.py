"""Kernel address notifications (rtnetlink RTM_NEWADDR / RTM_DELADDR) for the event loop.

`AddressWatcher` tells the daemon at once when an address appears on or disappears from any
interface of this network namespace (an operator's `ip addr del`, another tool, a link
going away), so reconciliation can repair drift immediately instead of at the next timer.

Threading model: one dedicated daemon thread owns a pyroute2 rtnetlink socket subscribed to
RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR (address notifications only: no link, route or
neighbour traffic) and blocks in poll(2) on it. Every parsed notification is handed to the
loop with ``loop.call_soon_threadsafe``. The reasons are those of `vipd.kernel.addresses`:
pyroute2's API is synchronous (its asyncio transport runs on the caller's loop and still uses
the old sync core in places), and a slow or stuck netlink read must never stall heartbeats, so the
reading stays off the loop; blocking reads cost nothing in a thread of their own.

The socket is pyroute2's `IPRSocket`, the rtnetlink socket without `IPRoute`'s private
asyncio loop: `IPRoute` would read datagrams into an internal queue on that loop, hiding them
from poll(2) and making the reader impossible to wake from another thread. With `IPRSocket`
the thread polls the netlink fd together with a wake-up pipe, so `close()` stops it within
milliseconds whatever the kernel is doing.

What the consumer gets (`on_change`, always called on the loop, never after `close()`):

* `AddressChange(kind="new"|"del", ifindex, address, flags)` per notification, in kernel
  order. Coalescing is the consumer's job: a burst of changes is a burst of calls. Treat
  them as triggers to reconcile, not as state to apply: after an overflow the kernel reports
  the loss first and then still delivers the notifications it had queued before it.
* `Resync(reason)`: events may have been lost, re-list everything. Sent once the subscription
  is in place (so a re-list done on receipt misses nothing): "started" after `start()`,
  "overflow" after the kernel dropped notifications (ENOBUFS: the socket's receive buffer
  was full) or a datagram could not be decoded, "reopened" after the socket failed and was
  replaced, "backlog" when the loop fell more than `max_backlog` events behind and the
  thread stopped queueing them.

Errors: ENOBUFS leaves the subscription intact (the kernel reports the loss once and keeps
queueing), so the same socket goes on being read. Any other socket error closes it and a
new one is opened after a backoff (0 s, then 0.1 s doubling to 5 s while failures repeat),
then "reopened" is sent. A handler that raises is logged and the next event still comes.
Nothing here raises into the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import structlog
from pyroute2 import IPRSocket
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_NEWADDR,
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV6_IFADDR,
)

from vipd.config import IPInterface
from vipd.kernel.addresses import ifa_address, ifa_flags

GROUPS = RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
#: Requested SO_RCVBUF in bytes (the kernel doubles it and caps it at net.core.rmem_max).
#: Each queued notification costs about 1 KiB of buffer (skb overhead included).
DEFAULT_RCVBUF = 1 << 20
#: Events handed to the loop but not yet delivered, beyond which the thread drops events
#: and sends one Resync("backlog") instead: bounds memory while the loop is stalled.
DEFAULT_MAX_BACKLOG = 10_000
BACKOFF_FIRST = 0.1  # seconds before the second consecutive reopen attempt
BACKOFF_MAX = 5.0  # seconds, cap of the doubling
HEALTHY_AFTER = 10.0  # seconds a socket must live for the backoff to start over
CLOSE_TIMEOUT = 1.0  # seconds close() waits for the thread

ResyncReason = Literal["started", "overflow", "reopened", "backlog"]

log = structlog.get_logger()


@dataclass(frozen=True)
class AddressChange:
    """The kernel added ("new") or removed ("del") `address` on interface `ifindex`.

    `flags` are the IFA_F_* bits (IFA_FLAGS when present, which carries all 32 bits,
    otherwise the header's 8): e.g. IFA_F_DADFAILED 0x08, IFA_F_NODAD 0x02,
    IFA_F_TENTATIVE 0x40. A "new" also arrives when an existing address changes flags
    (tentative -> dadfailed, lifetimes refreshed).
    """

    kind: Literal["new", "del"]
    ifindex: int
    address: IPInterface
    flags: int


@dataclass(frozen=True)
class Resync:
    """Address events may have been lost: list the kernel's addresses again."""

    reason: ResyncReason
    kind: Literal["resync"] = "resync"


AddressEvent = AddressChange | Resync


def change_from_message(msg: Any) -> AddressChange | None:
    """An `AddressChange` from a parsed pyroute2 ifaddrmsg; None for anything else."""
    header = msg.get("header") or {}
    msg_type = header.get("type")
    if msg_type == RTM_NEWADDR:
        kind: Literal["new", "del"] = "new"
    elif msg_type == RTM_DELADDR:
        kind = "del"
    else:
        return None
    address = ifa_address(msg)
    try:
        ifindex = int(msg["index"])
    except (KeyError, TypeError, ValueError):
        return None
    if address is None:
        return None
    return AddressChange(kind, ifindex, address, ifa_flags(msg))


class AddressWatcher:
    """Address add/delete notifications of this network namespace, delivered on `loop`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_change: Callable[[AddressEvent], None],
        *,
        rcvbuf: int = DEFAULT_RCVBUF,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
    ) -> None:
        if max_backlog < 1:
            raise ValueError(f"max_backlog must be at least 1, got {max_backlog}")
        self._loop = loop
        self._on_change = on_change
        self._rcvbuf = rcvbuf
        self._max_backlog = max_backlog
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._closed = False
        # Shared between the thread and the loop.
        self._lock = threading.Lock()
        self._backlog = 0  # events scheduled on the loop, not yet delivered
        self._dropping = False  # a Resync("backlog") is on its way; drop until it lands
        # Counters (for metrics and tests); written by the thread only, except `delivered`.
        self.received = 0  # address notifications read from the kernel
        self.delivered = 0  # events (changes and resyncs) passed to on_change
        self.dropped = 0  # changes dropped because the loop was too far behind
        self.overflows = 0  # ENOBUFS reports
        self.reopens = 0  # sockets replaced after an error

    @property
    def running(self) -> bool:
        """Whether the reader thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the reader thread; a Resync("started") follows once subscribed.

        Idempotent; raises RuntimeError after close().
        """
        if self._closed:
            raise RuntimeError("address watcher is closed")
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="vipd-address-events", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread (waits at most ~1 s) and close the socket; idempotent.

        No `on_change` call happens after this returns, even for events already queued.
        """
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        with self._lock, contextlib.suppress(OSError):  # BlockingIOError: already awake
            os.write(self._wake_w, b"x")
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(CLOSE_TIMEOUT)
            if thread.is_alive():
                # Only possible if a syscall hung; the thread closes the pipe when it exits.
                log.error("address_events_thread_stuck", timeout=CLOSE_TIMEOUT)
                return
        self._close_pipe()

    # -- loop side ------------------------------------------------------------------------

    def _dispatch(self, events: Sequence[AddressEvent]) -> None:
        with self._lock:
            for event in events:
                if isinstance(event, Resync):
                    if event.reason == "backlog":
                        self._dropping = False
                else:
                    self._backlog -= 1
        if self._closed:
            return
        for event in events:
            if self._closed:  # on_change may close us
                return
            self.delivered += 1
            try:
                self._on_change(event)
            except Exception:
                log.exception("address_event_handler_failed", change=repr(event))

    # -- thread side ----------------------------------------------------------------------

    def _schedule(self, changes: Sequence[AddressChange], resync: Resync | None = None) -> bool:
        """Hand `changes` (then `resync`) to the loop; False when the loop is gone."""
        batch: list[AddressEvent] = []
        with self._lock:
            if changes:
                if self._dropping or self._backlog + len(changes) > self._max_backlog:
                    self.dropped += len(changes)
                    if not self._dropping:
                        self._dropping = True
                        log.warning(
                            "address_events_backlog",
                            backlog=self._backlog,
                            max_backlog=self._max_backlog,
                        )
                        batch.append(Resync("backlog"))
                else:
                    self._backlog += len(changes)
                    batch.extend(changes)
            if resync is not None:
                batch.append(resync)
        if not batch:
            return True
        try:
            self._loop.call_soon_threadsafe(self._dispatch, batch)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            log.info("address_events_loop_closed")
            return False
        return True

    def _run(self) -> None:
        failures = 0
        first = True
        try:
            while not self._stop.is_set():
                opened_at = time.monotonic()
                error: str | None
                try:
                    sock = self._open()
                    if sock is None:
                        error = "open failed"
                    else:
                        reason: ResyncReason = "started" if first else "reopened"
                        self.reopens += not first
                        first = False
                        log.info("address_events_subscribed", reason=reason)
                        try:
                            if not self._schedule((), Resync(reason)):
                                return
                            error = self._read(sock)
                        finally:
                            with contextlib.suppress(Exception):
                                sock.close()
                        if error is None:
                            return  # stopped, or the loop is gone
                except Exception as exc:  # a bug must not leave the daemon deaf: start over
                    log.exception("address_events_thread_error")
                    error = repr(exc)
                if time.monotonic() - opened_at >= HEALTHY_AFTER:
                    failures = 0
                delay = 0.0 if failures == 0 else BACKOFF_FIRST * 2 ** (failures - 1)
                delay = min(BACKOFF_MAX, delay)
                failures += 1
                log.warning("address_events_reopen", error=error, retry_in=delay)
                if self._stop.wait(delay):
                    return
        finally:
            if self._closed:  # close() may have given up waiting for us
                self._close_pipe()

    def _open(self) -> Any:
        try:
            sock = IPRSocket(rcvbuf=self._rcvbuf, groups=GROUPS)
        except OSError as exc:
            log.error("address_events_socket_failed", op="open", error=str(exc))
            return None
        try:
            sock.bind(groups=GROUPS)
            sock.socket.setblocking(False)
        except (OSError, KeyError) as exc:  # KeyError: pyroute2 found no free port id
            log.error("address_events_socket_failed", op="bind", error=str(exc))
            with contextlib.suppress(Exception):
                sock.close()
            return None
        return sock

    def _read(self, sock: Any) -> str | None:
        """Read until stopped (None) or the socket fails (the error's text)."""
        poller = select.poll()
        fd = sock.fileno()
        poller.register(fd, select.POLLIN | select.POLLERR)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            ready = poller.poll()
            if self._stop.is_set():
                return None
            if not any(f == fd for f, _ in ready):
                continue
            try:
                msgs = sock.get()
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overflows += 1
                    log.warning("address_events_overflow", overflows=self.overflows)
                    if not self._schedule((), Resync("overflow")):
                        return None
                    continue
                return f"{errno.errorcode.get(exc.errno or 0, '?')}: {exc}"
            except Exception as exc:  # undecodable datagram: events may be lost
                log.warning("address_events_parse_failed", error=str(exc))
                if not self._schedule((), Resync("overflow")):
                    return None
                continue
            changes = [c for c in map(change_from_message, msgs) if c is not None]
            self.received += len(changes)
            if changes and not self._schedule(changes):
                return None

    def _close_pipe(self) -> None:
        # Called by close() or by the exiting thread, whichever is last: exactly once, or a
        # second os.close could hit an unrelated file that reused the number.
        with self._lock:
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
