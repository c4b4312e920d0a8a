"""Noticing another machine announcing or answering for an address this node holds.

A conflict is a frame, received from the wire on the interface that holds the address, in
which a MAC other than ours claims one of our addresses:

* ARP request or reply (Ethernet/IPv4) whose *sender* protocol address is ours: a
  gratuitous ARP from another holder, or that holder resolving something with our address
  as its source. The sender MAC is the claimant. A sender address of 0.0.0.0 is an RFC 5227
  probe ("may I take it?"), not a claim; the kernel answers probes for addresses we hold.
  Requests whose *target* is ours are clients asking, not claims.
* ICMPv6 neighbour advertisement (hop limit 255, no extension headers) whose target is
  ours. The claimant is the Target Link-Layer Address option, or the Ethernet source when
  the option is absent.

The daemon answers a conflict by announcing the address again (`vipd.node.defend` decides
when), so the last word on the link is ours: a stale claim from a peer that was on the
other side of a partition, or a machine configured by hand with our address.

What we can see. The sockets take what the NIC delivers to this host: broadcast, the
multicast groups we are in, and unicast to our MAC. On a switched LAN that is enough for
the frames that move neighbour caches in bulk: gratuitous ARP requests and replies are
broadcast, a holder's own ARP requests (sender = the address) are broadcast, and
unsolicited NAs go to all-nodes (ff02::1), which every IPv6 host receives. What we cannot
see: the other holder's unicast ARP replies and solicited NAs to individual clients, and
its traffic in general. A duplicate that never broadcasts (it answers clients one by one
and never asks anything itself) poisons those clients silently until it does; only a
monitor port or a switch feature (ARP inspection, port security) sees that. Holding the
address ourselves still counts: clients that resolve it get two replies and most keep the
later one, and every defence we send refreshes them all.

Frames that are ignored even when they parse:
* PACKET_OUTGOING (our own frames seen by a tap; sockets bound to one ethertype do not
  get them from the transmit path, but the check is cheap and exact);
* PACKET_OTHERHOST: unicast to another MAC (seen in promiscuous mode) and, above all,
  frames of other VLANs: the kernel strips an 802.1Q tag before protocol delivery and,
  when no VLAN device takes the frame, hands it on untagged with this type. Someone on
  another VLAN using the same address is no conflict;
* frames delivered through a device stacked on ours (a VLAN device on top of the watched
  interface shows up with that device's name), and non-Ethernet devices.

Per received frame the work is `parse_frame`: struct unpacking, no scapy. IPv6 sockets
carry a classic BPF filter that passes only neighbour advertisements, so the daemon does
not wake up for every IPv6 packet on the link; ARP is rare enough to read all of it.

Nothing raises into the event loop: socket errors are logged and counted, the socket is
closed and reopened on the next `watch()` (a link that merely went down keeps its socket:
the kernel resumes delivery when it comes back up).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import structlog

log = structlog.get_logger()

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# <linux/if_ether.h>
ETH_P_IP: Final = 0x0800
ETH_P_ARP: Final = 0x0806
ETH_P_IPV6: Final = 0x86DD
ETH_HLEN: Final = 14
ARPHRD_ETHER: Final = 1  # <linux/if_arp.h>
IPPROTO_ICMPV6: Final = 58
ND_NEIGHBOR_ADVERT: Final = 136
ND_OPT_TARGET_LL_ADDR: Final = 2
SO_ATTACH_FILTER: Final = 26  # <asm-generic/socket.h>; Python has no name for it

ARP_REQUEST: Final = "arp-request"
ARP_REPLY: Final = "arp-reply"
NA: Final = "na"

_ARP = struct.Struct("!HHBBH6s4s6s4s")  # htype ptype hlen plen op sha spa tha tpa (28 bytes)
_IPV6 = struct.Struct("!IHBB16s16s")  # version/class/flow, payload len, next hdr, hops, src, dst
_ICMPV6_NA = struct.Struct("!BBHI16s")  # type code checksum flags target (24 bytes)
_ARP_LEN: Final = ETH_HLEN + _ARP.size  # 42
_NA_OPTIONS: Final = ETH_HLEN + _IPV6.size + _ICMPV6_NA.size  # 78: first ND option

#: Frames read per wakeup at most, so a flood on one socket cannot starve the event loop
#: (the rest stays queued in the kernel and wakes us again at once).
MAX_FRAMES_PER_WAKEUP: Final = 256
_RECV_BUFFER: Final = 65536  # any frame the kernel can deliver, whatever the MTU


@dataclass(frozen=True, slots=True)
class Sighting:
    """`mac` claimed `address` on `interface` with a frame of `kind`."""

    interface: str
    address: IPAddress
    mac: bytes  # 6 bytes
    kind: str  # ARP_REQUEST, ARP_REPLY or NA


def parse_frame(frame: bytes, interface: str = "") -> Sighting | None:
    """Who claims which address in one Ethernet frame (no FCS), or None.

    Never raises: anything that is not an untagged Ethernet ARP request/reply with a
    non-zero sender address, or an untagged neighbour advertisement with hop limit 255
    directly after the IPv6 header and a well-formed option list, is None.
    `interface` is copied into the sighting.
    """
    if len(frame) < ETH_HLEN:
        return None
    ethertype = int.from_bytes(frame[12:14], "big")
    if ethertype == ETH_P_ARP:
        return _parse_arp(frame, interface)
    if ethertype == ETH_P_IPV6:
        return _parse_na(frame, interface)
    return None  # VLAN-tagged (0x8100...) or another protocol


def _parse_arp(frame: bytes, interface: str) -> Sighting | None:
    if len(frame) < _ARP_LEN:
        return None
    htype, ptype, hlen, plen, op, sha, spa, _tha, _tpa = _ARP.unpack_from(frame, ETH_HLEN)
    if (htype, ptype, hlen, plen) != (1, ETH_P_IP, 6, 4) or op not in (1, 2):
        return None
    if spa == b"\x00\x00\x00\x00":
        return None  # RFC 5227 probe: asks about the address, claims nothing
    kind = ARP_REQUEST if op == 1 else ARP_REPLY
    return Sighting(interface, ipaddress.IPv4Address(spa), sha, kind)


def _parse_na(frame: bytes, interface: str) -> Sighting | None:
    if len(frame) < _NA_OPTIONS:
        return None
    vtf, payload_len, next_header, hop_limit, _src, _dst = _IPV6.unpack_from(frame, ETH_HLEN)
    end = ETH_HLEN + _IPV6.size + payload_len
    if (
        vtf >> 28 != 6
        or next_header != IPPROTO_ICMPV6  # extension headers: not an ND message we honour
        or hop_limit != 255  # crossed a router; receivers drop it (RFC 4861 7.1.2)
        or end > len(frame)  # truncated (Ethernet padding makes frames longer, not shorter)
        or end < _NA_OPTIONS
    ):
        return None
    icmp_type, code, _checksum, _flags, target = _ICMPV6_NA.unpack_from(
        frame, ETH_HLEN + _IPV6.size
    )
    if icmp_type != ND_NEIGHBOR_ADVERT or code != 0 or target[0] == 0xFF:  # ff00::/8
        return None
    mac: bytes | None = None
    offset = _NA_OPTIONS
    while offset < end:
        if offset + 2 > end:
            return None
        opt_type, opt_len = frame[offset], frame[offset + 1]
        size = opt_len * 8
        if size == 0 or offset + size > end:
            return None  # RFC 4861 4.6: a zero-length option invalidates the message
        if opt_type == ND_OPT_TARGET_LL_ADDR and opt_len == 1 and mac is None:
            mac = bytes(frame[offset + 2 : offset + 8])
        offset += size
    if mac is None:
        mac = bytes(frame[6:12])  # no option: the Ethernet source is the claimant
    return Sighting(interface, ipaddress.IPv6Address(target), mac, NA)


# --- the BPF filter ------------------------------------------------------------------------

# Classic BPF, <linux/filter.h>: struct sock_filter { u16 code; u8 jt; u8 jf; u32 k; }.
# Jump offsets count instructions after the next one. Offsets into the frame are from the
# start of the Ethernet header (SOCK_RAW); a VLAN tag never shows here (the kernel has
# moved it to metadata before protocol delivery).
_BPF_LD_H_ABS: Final = 0x28  # A = u16 at [k]
_BPF_LD_B_ABS: Final = 0x30  # A = u8 at [k]
_BPF_JEQ_K: Final = 0x15  # if A == k: skip jt else skip jf
_BPF_RET_K: Final = 0x06  # accept k bytes (0: drop)
_ACCEPT_ALL: Final = 0x40000  # more than any frame

#: Passes only ICMPv6 neighbour advertisements with hop limit 255 and no extension headers.
NA_FILTER: Final[tuple[tuple[int, int, int, int], ...]] = (
    (_BPF_LD_H_ABS, 0, 0, 12),  # 0: A = ethertype
    (_BPF_JEQ_K, 0, 7, ETH_P_IPV6),  # 1: IPv6? else drop (-> 9)
    (_BPF_LD_B_ABS, 0, 0, ETH_HLEN + 6),  # 2: A = next header (IPv6 byte 6)
    (_BPF_JEQ_K, 0, 5, IPPROTO_ICMPV6),  # 3: ICMPv6 right after the header? else drop
    (_BPF_LD_B_ABS, 0, 0, ETH_HLEN + 7),  # 4: A = hop limit (IPv6 byte 7)
    (_BPF_JEQ_K, 0, 3, 255),  # 5: 255 (on-link ND)? else drop
    (_BPF_LD_B_ABS, 0, 0, ETH_HLEN + 40),  # 6: A = ICMPv6 type (first byte after IPv6)
    (_BPF_JEQ_K, 0, 1, ND_NEIGHBOR_ADVERT),  # 7: neighbour advertisement? else drop
    (_BPF_RET_K, 0, 0, _ACCEPT_ALL),  # 8: accept the whole frame
    (_BPF_RET_K, 0, 0, 0),  # 9: drop
)


def attach_filter(sock: socket.socket, program: Iterable[tuple[int, int, int, int]]) -> None:
    """SO_ATTACH_FILTER with a classic BPF program (the kernel copies it)."""
    code = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buf = ctypes.create_string_buffer(code, len(code))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; } (native layout)
    fprog = struct.pack("HP", len(code) // 8, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def open_packet_socket(interface: str, ethertype: int) -> socket.socket:
    """A non-blocking AF_PACKET socket receiving `ethertype` frames on `interface` only.

    Created with protocol 0, which receives nothing: the filter (IPv6) is attached before
    `bind` starts delivery, so no unfiltered frame is ever queued.
    """
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.setblocking(False)
        if ethertype == ETH_P_IPV6:
            attach_filter(sock, NA_FILTER)
        sock.bind((interface, ethertype))  # Python converts the protocol to network order
    except OSError:
        sock.close()
        raise
    return sock


# --- the listener --------------------------------------------------------------------------


class PacketSocket(Protocol):
    """What the listener needs from a socket (a real AF_PACKET socket, or a test fake)."""

    def fileno(self) -> int: ...

    def recvfrom_into(self, buffer: bytearray) -> tuple[int, Any]: ...

    def close(self) -> None: ...


SocketOpener = Callable[[str, int], PacketSocket]
_KIND = {ETH_P_ARP: "arp", ETH_P_IPV6: "ipv6"}


@dataclass(eq=False)
class _Tap:
    ethertype: int
    sock: PacketSocket
    fd: int
    ifindex: int


@dataclass(eq=False)
class _Watch:
    interface: str
    addresses: frozenset[IPAddress] = frozenset()
    own_mac: bytes | None = None
    taps: dict[int, _Tap] = field(default_factory=dict)


class ConflictListener:
    """Raw-socket listener calling `on_conflict(sighting)` for claims of watched addresses.

    `watch(interface, addresses, own_mac)` sets what is watched on one interface; sockets
    open lazily (one for ARP if an IPv4 address is watched, one for neighbour
    advertisements if an IPv6 one is) and are read on the event loop. `on_conflict` runs on
    the event loop, once per conflicting frame; it may call `watch` or `close`.

    Counters (cumulative, for metrics): `frames_seen` (frames read from the sockets),
    `conflicts` (sightings passed to `on_conflict`), `errors` (socket open/read failures
    and exceptions from `on_conflict`).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_conflict: Callable[[Sighting], None],
        *,
        open_socket: SocketOpener = open_packet_socket,
        if_index: Callable[[str], int] = socket.if_nametoindex,
    ) -> None:
        self._loop = loop
        self._on_conflict = on_conflict
        self._open_socket = open_socket
        self._if_index = if_index
        self.frames_seen = 0
        self.conflicts = 0
        self.errors = 0
        self._watches: dict[str, _Watch] = {}
        self._open_failing: dict[str, int] = {}  # interface -> errno of the current streak
        self._buf = bytearray(_RECV_BUFFER)
        self._closed = False

    @property
    def listening(self) -> frozenset[tuple[str, str]]:
        """Open sockets as (interface, "arp" | "ipv6")."""
        return frozenset(
            (w.interface, _KIND[t.ethertype])
            for w in self._watches.values()
            for t in w.taps.values()
        )

    def watched(self, interface: str) -> frozenset[IPAddress]:
        w = self._watches.get(interface)
        return w.addresses if w is not None else frozenset()

    def watch(self, interface: str, addresses: Iterable[IPAddress], own_mac: bytes | None) -> None:
        """Watch exactly `addresses` on `interface` from now on (empty: stop listening there).

        Frames whose claimant is `own_mac` are ours (None: every MAC counts). IPv4/IPv6
        interfaces are accepted and reduced to their address. Never raises for kernel-side
        trouble: a missing interface is logged once per streak and tried again on the next
        call, as is a socket that failed.
        """
        if own_mac is not None and len(own_mac) != 6:
            raise ValueError(f"own_mac must be 6 bytes, got {own_mac.hex()}")
        if self._closed:
            log.warning("conflict_listener_watch_after_close", interface=interface)
            return
        # `.packed` reduces an IPv4Interface/IPv6Interface (which compares with its network)
        # and a scoped IPv6 address to the bare address that frames carry.
        wanted = frozenset(ipaddress.ip_address(a.packed) for a in addresses)
        if not wanted:
            self._unwatch(interface)
            return
        state = self._watches.get(interface)
        if state is None:
            state = self._watches[interface] = _Watch(interface)
        state.addresses = wanted
        state.own_mac = bytes(own_mac) if own_mac is not None else None
        needed = {ETH_P_ARP if a.version == 4 else ETH_P_IPV6 for a in wanted}
        try:
            index = self._if_index(interface)
        except OSError as exc:
            for tap in list(state.taps.values()):
                self._close_tap(state, tap)
            self._open_failed(interface, exc)
            return
        for tap in list(state.taps.values()):
            # Not needed any more, or the name now denotes another device (deleted and
            # recreated: a packet socket stays bound to the old ifindex, and hears nothing).
            if tap.ethertype not in needed or tap.ifindex != index:
                self._close_tap(state, tap)
        for ethertype in sorted(needed - state.taps.keys()):
            if not self._open_tap(state, ethertype, index):
                return
        self._open_succeeded(interface)

    def close(self) -> None:
        """Close every socket; idempotent. Later `watch` calls are ignored (logged)."""
        self._closed = True
        for interface in list(self._watches):
            self._unwatch(interface)

    # -- sockets --------------------------------------------------------------------------

    def _unwatch(self, interface: str) -> None:
        state = self._watches.pop(interface, None)
        if state is not None:
            for tap in list(state.taps.values()):
                self._close_tap(state, tap)
        self._open_failing.pop(interface, None)

    def _open_tap(self, state: _Watch, ethertype: int, index: int) -> bool:
        try:
            sock = self._open_socket(state.interface, ethertype)
        except OSError as exc:
            self._open_failed(state.interface, exc)
            return False
        tap = _Tap(ethertype, sock, sock.fileno(), index)
        state.taps[ethertype] = tap
        self._loop.add_reader(tap.fd, self._readable, state, tap)
        return True

    def _close_tap(self, state: _Watch, tap: _Tap) -> None:
        if state.taps.get(tap.ethertype) is tap:
            del state.taps[tap.ethertype]
        self._loop.remove_reader(tap.fd)
        with contextlib.suppress(OSError):
            tap.sock.close()

    def _open_failed(self, interface: str, exc: OSError) -> None:
        self.errors += 1
        # if_nametoindex raises OSError without errno for an unknown name.
        code = exc.errno if exc.errno is not None else errno.ENODEV
        if self._open_failing.get(interface) == code:
            return  # same trouble as last time: already logged
        self._open_failing[interface] = code
        log.warning(
            "conflict_listener_interface_missing"
            if code in (errno.ENODEV, errno.ENXIO)
            else "conflict_listener_open_failed",
            interface=interface,
            errno=errno.errorcode.get(code, str(code)),
            error=os.strerror(code),
            retry="on the next watch()",
        )

    def _open_succeeded(self, interface: str) -> None:
        if self._open_failing.pop(interface, None) is not None:
            log.info("conflict_listener_listening", interface=interface)

    # -- reading --------------------------------------------------------------------------

    def _readable(self, state: _Watch, tap: _Tap) -> None:
        # Runs on the event loop: nothing may escape.
        try:
            found = self._drain(state, tap)
        except Exception:
            self.errors += 1
            log.exception("conflict_listener_failed", interface=state.interface)
            self._close_tap(state, tap)  # reopened on the next watch(); no busy loop
            return
        for sighting in found:
            self._report(sighting)

    def _drain(self, state: _Watch, tap: _Tap) -> list[Sighting]:
        found: list[Sighting] = []
        if (
            self._watches.get(state.interface) is not state
            or state.taps.get(tap.ethertype) is not tap
        ):
            return found  # closed since the wakeup was scheduled
        for _ in range(MAX_FRAMES_PER_WAKEUP):
            try:
                size, address = tap.sock.recvfrom_into(self._buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._read_failed(state, tap, exc)
                break
            self.frames_seen += 1
            if not _from_the_wire(address, state.interface):
                continue
            sighting = parse_frame(bytes(self._buf[:size]), state.interface)
            if sighting is not None and sighting.address in state.addresses:
                found.append(sighting)
        return found

    def _read_failed(self, state: _Watch, tap: _Tap, exc: OSError) -> None:
        self.errors += 1
        code = exc.errno if exc.errno is not None else errno.EIO
        # ENETDOWN is reported once when the link goes down; the socket stays bound and
        # the kernel resumes delivery when the link is up again. If the device itself is
        # gone (or replaced), the socket is dead: close it.
        try:
            same_device = self._if_index(state.interface) == tap.ifindex
        except OSError:
            same_device = False
        keep = code == errno.ENETDOWN and same_device
        log.warning(
            "conflict_listener_read_failed",
            interface=state.interface,
            socket=_KIND.get(tap.ethertype, hex(tap.ethertype)),
            errno=errno.errorcode.get(code, str(code)),
            error=os.strerror(code),
            action="kept (resumes when the link is up)" if keep else "closed until next watch()",
            listener_errors=self.errors,
        )
        if not keep:
            self._close_tap(state, tap)

    def _report(self, sighting: Sighting) -> None:
        # Checked again here, not while draining: an earlier callback may have changed
        # what is watched.
        state = self._watches.get(sighting.interface)
        if (
            state is None
            or sighting.address not in state.addresses
            or (state.own_mac is not None and sighting.mac == state.own_mac)
        ):
            return
        self.conflicts += 1
        log.debug(
            "address_conflict_seen",
            interface=sighting.interface,
            address=str(sighting.address),
            mac=sighting.mac.hex(":"),
            kind=sighting.kind,
        )
        try:
            self._on_conflict(sighting)
        except Exception:
            self.errors += 1
            log.exception(
                "conflict_callback_failed",
                interface=sighting.interface,
                address=str(sighting.address),
            )


def _from_the_wire(address: Any, interface: str) -> bool:
    """Whether a frame with this recvfrom() address counts (see the module docstring)."""
    try:
        ifname, _proto, pkttype, hatype = address[:4]
    except (TypeError, ValueError):
        return False
    return (
        ifname == interface
        and hatype == ARPHRD_ETHER
        and pkttype not in (socket.PACKET_OUTGOING, socket.PACKET_OTHERHOST)
    )
