"""The heartbeat socket: UDP multicast on one interface, TTL 1, loopback off.

Only socket options live here; the protocol is in `core`, the event loop in `vipd.daemon`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct

IP_MULTICAST_ALL = 49  # Linux: deliver only groups this socket joined (not in `socket`)


class TransportError(Exception):
    """The heartbeat socket cannot be set up; the message says which interface/address."""


def open_multicast_socket(
    group: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, interface: str
) -> socket.socket:
    try:
        ifindex = socket.if_nametoindex(interface)
    except OSError:
        raise TransportError(f"interface {interface!r} does not exist") from None
    family = socket.AF_INET if group.version == 4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Bind to the group, not the wildcard, so unrelated unicast to this port is not read.
        sock.bind((str(group), port, 0, ifindex) if group.version == 6 else (str(group), port))
        # Without CAP_NET_RAW the group membership alone still scopes the socket.
        with contextlib.suppress(PermissionError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        if group.version == 4:
            mreqn = struct.pack("=4s4si", group.packed, b"\0" * 4, ifindex)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
            sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
        else:
            mreq6 = struct.pack("=16sI", group.packed, ifindex)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq6)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise TransportError(
            f"cannot join {group} port {port} on {interface!r}: {e.strerror or e}"
        ) from e
    return sock
