"""One long-lived raw packet socket per interface for announcement frames.

Why not `scapy.sendp()`: it opens a socket, resolves the interface and closes again on
every call, blocking the event loop for all of it. A non-blocking AF_PACKET socket bound
once sends a prebuilt frame with one syscall.

Sending never raises: announcing is best effort and runs in timer callbacks on the event
loop, where an exception would only end up in the loop's exception handler. Failures are
counted and logged once per streak (the first failure, then a summary on recovery), so an
interface that is down does not print a line per frame per address.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

import structlog

log = structlog.get_logger()

# The socket is bound to an ifindex that no longer exists (interface deleted, maybe
# recreated under the same name with a new index): reopening by name may fix it.
_DEVICE_GONE = frozenset({errno.ENXIO, errno.ENODEV})
SIOCGIFHWADDR = 0x8927  # <linux/sockios.h>


class FrameSender:
    """Sends raw Ethernet frames on one interface; follows it when it is recreated.

    An AF_PACKET socket is bound to an ifindex, not a name: after `ip link del` + `add`
    the old socket fails with ENXIO and the name belongs to a new device, with a new MAC.
    The MAC can also change under a live device (`ip link set ... address`, a bond with
    `fail_over_mac=active`). `generation` counts changes of (ifindex, MAC), so a user
    caching the MAC and frames built from it knows to refresh them.
    """

    def __init__(self, interface: str) -> None:
        self.interface = interface
        self.sent = 0
        self.errors = 0
        self.generation = 0
        self._sock: socket.socket | None = None
        self._identity: tuple[int, bytes] | None = None  # (ifindex, MAC) last seen
        self._streak = 0  # consecutive failures
        self._streak_errno: int | None = None

    def _open(self) -> socket.socket:
        # Protocol 0: the socket receives nothing, so no buffer fills with traffic we
        # never read.
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            sock.setblocking(False)
            sock.bind((self.interface, 0))
            self._observe(sock)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        return sock

    def _observe(self, sock: socket.socket) -> None:
        index = socket.if_nametoindex(self.interface)
        request = struct.pack("16s16x", self.interface.encode())  # struct ifreq
        ifreq = fcntl.ioctl(sock.fileno(), SIOCGIFHWADDR, request)
        identity = (index, bytes(ifreq[18:24]))  # ifr_hwaddr.sa_data
        if self._identity is not None and identity != self._identity:
            self.generation += 1
        self._identity = identity

    def current_generation(self) -> int:
        """Re-check which device the name denotes and its MAC (two ioctls).

        Call before sending frames that embed the device's MAC, so frames built for a
        device that was since replaced (or re-addressed) are not sent even once.
        """
        try:
            index = socket.if_nametoindex(self.interface)
            if self._sock is None or self._identity is None or index != self._identity[0]:
                self._close_socket()
                self._open()
            else:
                self._observe(self._sock)
        except OSError:
            pass  # gone for now; send() reports it
        return self.generation

    def send(self, frame: bytes) -> bool:
        """Send one complete Ethernet frame; False (logged, counted) if it was not sent."""
        for attempt in (0, 1):
            fresh = self._sock is None
            try:
                sock = self._sock if self._sock is not None else self._open()
                sock.send(frame)
            except OSError as exc:
                code = exc.errno or errno.EIO
                if code in _DEVICE_GONE:
                    self._close_socket()
                    # An old socket may just be bound to a deleted ifindex: retry once on a
                    # fresh one. A fresh socket failing means the interface is really gone.
                    if attempt == 0 and not fresh:
                        continue
                self._failed(code)
                return False
            self._succeeded()
            return True
        raise AssertionError("unreachable")  # pragma: no cover

    def _failed(self, code: int) -> None:
        self.errors += 1
        self._streak += 1
        if self._streak == 1 or code != self._streak_errno:
            # ENOBUFS/EAGAIN: the qdisc or driver queue is full; ENETDOWN: link is down.
            log.warning(
                "announce_send_failed",
                interface=self.interface,
                errno=errno.errorcode.get(code, str(code)),
                error=os.strerror(code),
                send_errors=self.errors,
            )
        self._streak_errno = code

    def _succeeded(self) -> None:
        self.sent += 1
        if self._streak:
            log.info(
                "announce_send_recovered",
                interface=self.interface,
                failed_frames=self._streak,
            )
            self._streak = 0
            self._streak_errno = None

    def _close_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def close(self) -> None:
        self._close_socket()
