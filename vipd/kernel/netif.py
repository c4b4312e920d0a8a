"""Interface facts read with one ioctl (works in any network namespace, no sysfs needed)."""

from __future__ import annotations

import fcntl
import socket
import struct

SIOCGIFHWADDR = 0x8927


def mac_address(interface: str) -> bytes:
    """The interface's 6-byte hardware address. Raises OSError if it does not exist."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        req = struct.pack("256s", interface.encode()[:15])
        res = fcntl.ioctl(sock.fileno(), SIOCGIFHWADDR, req)
    return res[18:24]
