"""The heartbeat socket: UDP multicast on one interface (TTL 1, loopback off), or unicast to
each peer's roster address for networks that filter multicast.

Only socket options live here; the protocol is in the core, the event loop in the daemon
(`vipd.kernel.heartbeats` reads and sends).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import struct

from vipd.errors import TransportError as TransportError  # re-exported

IP_MULTICAST_ALL = 49  # Linux: deliver only groups this socket joined (not in `socket`)


def _ifindex(interface: str) -> int:
    try:
        return socket.if_nametoindex(interface)
    except OSError:
        raise TransportError(
            f"interface {interface!r} does not exist",
            "cluster.interface",
            "name an interface this node has (ip link)",
        ) from None


def open_multicast_socket(
    group: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, interface: str
) -> socket.socket:
    ifindex = _ifindex(interface)
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
            f"cannot join {group} port {port} on {interface!r}: {e.strerror or e}",
            "cluster.multicast_group",
            "check the group, the port (in use?) and the interface",
        ) from e
    return sock


def open_unicast_socket(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, interface: str
) -> socket.socket:
    """A UDP socket bound to this node's own roster address; TTL/hop limit 1 so heartbeats
    never cross a router, like the multicast ones."""
    ifindex = _ifindex(interface)
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        with contextlib.suppress(PermissionError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        if address.version == 4:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
            sock.bind((str(address), port))
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 1)
            sock.bind((str(address), port, 0, ifindex if address.is_link_local else 0))
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise TransportError(
            f"cannot bind {address} port {port} on {interface!r}: {e.strerror or e}",
            "roster.address",
            "this node's roster address must be configured on cluster.interface",
        ) from e
    return sock


def kernel_drops(sock: socket.socket) -> int | None:
    """Datagrams the kernel dropped for this socket (receive buffer full: a flood, or a
    stalled loop), from the "drops" column of /proc/self/net/udp{,6}; None if not found."""
    inode = str(os.fstat(sock.fileno()).st_ino)
    for table in ("/proc/self/net/udp", "/proc/self/net/udp6"):
        try:
            with open(table) as f:
                next(f, None)  # header
                for line in f:
                    fields = line.split()
                    if len(fields) >= 13 and fields[9] == inode:
                        return int(fields[-1])
        except OSError:
            continue
    return None
