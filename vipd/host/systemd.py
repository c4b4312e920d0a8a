"""sd_notify without a dependency: one datagram to $NOTIFY_SOCKET (a no-op outside systemd)."""

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
