"""sd_notify without a dependency: one datagram to $NOTIFY_SOCKET (a no-op outside systemd).

The watchdog follows sd_watchdog_enabled(3): systemd sets WATCHDOG_USEC (and WATCHDOG_PID);
we ping at half that period, from the event loop, so a stuck loop is what it catches.
"""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), path)
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings, or None when no watchdog is asked of this process."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        period = int(usec) / 1e6
    except ValueError:
        return None
    return period / 2 if period > 0 else None


def extend_timeout(seconds: float) -> bool:
    """Ask for `seconds` more before systemd gives up on a start or stop in progress."""
    return notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")
