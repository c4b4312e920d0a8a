"""The heartbeat socket as the daemon uses it: read in batches on readiness, send to every
destination, report the kernel's drop count. No protocol decisions."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Sequence
from typing import Protocol

import structlog

from vipd.config import Config
from vipd.host.ratelimit import RateLimitedLog
from vipd.kernel.transport import kernel_drops, open_multicast_socket, open_unicast_socket

RECV_BUFFER = 2048  # > wire.MAX_DATAGRAM, so an oversized datagram is seen as such
MAX_READS_PER_WAKEUP = 64  # a flood must not starve the timers

log = structlog.get_logger("vipd.transport")

OnDatagrams = Callable[[list[tuple[bytes, str]]], None]


class Transport(Protocol):
    """What the daemon needs of its heartbeat transport (a fake stands in for tests)."""

    def start(self, on_datagrams: OnDatagrams) -> None: ...

    def send(self, data: bytes) -> list[tuple[str, str]]:
        """Send to every destination; returns (destination, error) for each failure."""
        ...

    def kernel_drops(self) -> int | None: ...

    def close(self) -> None: ...


class SocketTransport:
    def __init__(
        self,
        sock: socket.socket,
        destinations: Sequence[tuple[str, int]],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._sock = sock
        self._destinations = tuple(destinations)
        self._loop = loop
        self._errors = RateLimitedLog(log, interval=10.0)
        self._open = False

    def start(self, on_datagrams: OnDatagrams) -> None:
        self._open = True
        self._loop.add_reader(self._sock.fileno(), self._readable, on_datagrams)

    def send(self, data: bytes) -> list[tuple[str, str]]:
        failed: list[tuple[str, str]] = []
        for destination in self._destinations:
            try:
                self._sock.sendto(data, destination)
            except OSError as e:  # ENETDOWN, ENOBUFS...: counted, retried at the next beat
                failed.append((destination[0], e.strerror or str(e)))
        return failed

    def kernel_drops(self) -> int | None:
        return kernel_drops(self._sock) if self._open else None

    def close(self) -> None:
        if self._open:
            self._open = False
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    def _readable(self, on_datagrams: OnDatagrams) -> None:
        batch: list[tuple[bytes, str]] = []
        for _ in range(MAX_READS_PER_WAKEUP):
            try:
                data, addr = self._sock.recvfrom(RECV_BUFFER)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._errors.warning("receive_failed", key="recv", error=e.strerror)
                break
            batch.append((data, addr[0]))
        on_datagrams(batch)


def open_transport(cfg: Config, loop: asyncio.AbstractEventLoop) -> SocketTransport:
    """The heartbeat socket and where each heartbeat goes (the group, or every peer)."""
    if cfg.transport == "multicast":
        sock = open_multicast_socket(cfg.multicast_group, cfg.port, cfg.interface)
        return SocketTransport(sock, [(str(cfg.multicast_group), cfg.port)], loop)
    me = cfg.member(cfg.node)
    assert me is not None and me.address is not None  # enforced by the config loader
    peers = [(str(m.address), cfg.port) for m in cfg.roster if m.name != cfg.node and m.address]
    return SocketTransport(open_unicast_socket(me.address, cfg.port, cfg.interface), peers, loop)
