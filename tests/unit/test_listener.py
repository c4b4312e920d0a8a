"""The conflict listener without root: frames built with scapy through `parse_frame`, the
hand-assembled BPF filter run by a small classic-BPF interpreter, and `ConflictListener`
on a real event loop with fake packet sockets (socketpairs provide the readiness)."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.l2 import ARP, Dot1Q, Ether
from structlog.testing import capture_logs

from vipd.arp.frames import garp_reply, garp_request, unsolicited_na
from vipd.arp.listener import (
    ARP_REPLY,
    ARP_REQUEST,
    ETH_P_ARP,
    ETH_P_IPV6,
    MAX_FRAMES_PER_WAKEUP,
    NA,
    NA_FILTER,
    ConflictListener,
    Sighting,
    parse_frame,
)

IFACE = "eth0"
OTHER = "02:00:5e:00:00:bb"  # the other holder
OTHER_B = bytes.fromhex("02005e0000bb")
TLLA = "02:00:5e:00:00:cc"
TLLA_B = bytes.fromhex("02005e0000cc")
OWN = "02:00:5e:00:00:aa"
OWN_B = bytes.fromhex("02005e0000aa")
VIP4 = ipaddress.IPv4Address("203.0.113.10")
VIP4_B = ipaddress.IPv4Address("203.0.113.11")
UNWATCHED4 = ipaddress.IPv4Address("203.0.113.99")
VIP6 = ipaddress.IPv6Address("2001:db8:1::10")
NODE4 = "198.51.100.12"
NODE6 = "2001:db8::12"
BCAST = "ff:ff:ff:ff:ff:ff"


# -- frames -----------------------------------------------------------------------------------


def arp(
    op: int = 1,
    psrc: str = str(VIP4),
    pdst: str = str(VIP4),
    hwsrc: str = OTHER,
    src: str = OTHER,
    hwdst: str = "00:00:00:00:00:00",
) -> bytes:
    pkt = Ether(src=src, dst=BCAST) / ARP(op=op, hwsrc=hwsrc, psrc=psrc, hwdst=hwdst, pdst=pdst)
    return bytes(pkt).ljust(60, b"\x00")  # on the wire: padded to the Ethernet minimum


def na(
    target: str = str(VIP6),
    tlla: str | None = TLLA,
    hlim: int = 255,
    src: str = OTHER,
    options: Any = None,
) -> bytes:
    pkt = Ether(src=src, dst="33:33:00:00:00:01") / IPv6(src=target, dst="ff02::1", hlim=hlim)
    pkt = pkt / ICMPv6ND_NA(tgt=target, R=0, S=0, O=1)
    if options is not None:
        pkt = pkt / options
    if tlla is not None:
        pkt = pkt / ICMPv6NDOptDstLLAddr(lladdr=tlla)
    return bytes(pkt)


def ns(target: str = str(VIP6)) -> bytes:
    pkt = (
        Ether(src=OTHER, dst="33:33:ff:00:00:10")
        / IPv6(src=NODE6, dst="ff02::1:ff00:10", hlim=255)
        / ICMPv6ND_NS(tgt=target)
        / ICMPv6NDOptSrcLLAddr(lladdr=OTHER)
    )
    return bytes(pkt)


def with_payload_len(frame: bytes, payload_len: int) -> bytes:
    return frame[:18] + payload_len.to_bytes(2, "big") + frame[20:]


# -- parse_frame: ARP -------------------------------------------------------------------------


def test_gratuitous_arp_request() -> None:
    assert parse_frame(arp(op=1), IFACE) == Sighting(IFACE, VIP4, OTHER_B, ARP_REQUEST)


def test_gratuitous_arp_reply() -> None:
    frame = arp(op=2, hwdst=BCAST)
    assert parse_frame(frame, IFACE) == Sighting(IFACE, VIP4, OTHER_B, ARP_REPLY)


def test_ordinary_request_reports_the_sender_not_the_target() -> None:
    # The other holder resolving its router with our address as source: a claim.
    assert parse_frame(arp(psrc=str(VIP4), pdst=NODE4)) == Sighting("", VIP4, OTHER_B, ARP_REQUEST)
    # A client asking for our address claims only its own.
    asking = parse_frame(arp(psrc=NODE4, pdst=str(VIP4)))
    assert asking is not None
    assert asking.address == ipaddress.IPv4Address(NODE4)


def test_unicast_reply_to_a_client() -> None:
    pkt = Ether(src=OTHER, dst=OWN) / ARP(op=2, hwsrc=OTHER, psrc=str(VIP4), hwdst=OWN, pdst=NODE4)
    assert parse_frame(bytes(pkt)) == Sighting("", VIP4, OTHER_B, ARP_REPLY)


def test_mac_is_the_arp_sender_hardware_address_not_the_ethernet_source() -> None:
    sighting = parse_frame(arp(hwsrc=TLLA, src=OTHER))
    assert sighting is not None
    assert sighting.mac == TLLA_B


def test_probe_with_zero_sender_is_ignored() -> None:
    assert parse_frame(arp(psrc="0.0.0.0", pdst=str(VIP4))) is None


@pytest.mark.parametrize(
    "field, value",
    [("hwtype", 6), ("ptype", 0x86DD), ("hwlen", 8), ("plen", 16), ("op", 3), ("op", 0)],
)
def test_arp_other_than_ethernet_ipv4_request_or_reply_is_ignored(field: str, value: int) -> None:
    # Built raw (scapy would size addresses by hwlen/plen); only the one field differs.
    base = bytearray(arp())
    offsets = {
        "hwtype": (14, 2),
        "ptype": (16, 2),
        "hwlen": (18, 1),
        "plen": (19, 1),
        "op": (20, 2),
    }
    at, size = offsets[field]
    base[at : at + size] = value.to_bytes(size, "big")
    assert parse_frame(bytes(base)) is None


def test_our_own_announcement_frames_parse_back() -> None:
    assert parse_frame(garp_request(OWN_B, VIP4)) == Sighting("", VIP4, OWN_B, ARP_REQUEST)
    assert parse_frame(garp_reply(OWN_B, VIP4)) == Sighting("", VIP4, OWN_B, ARP_REPLY)
    assert parse_frame(unsolicited_na(OWN_B, VIP6)) == Sighting("", VIP6, OWN_B, NA)


# -- parse_frame: neighbour advertisements ----------------------------------------------------


def test_na_with_target_link_layer_option_reports_the_option() -> None:
    assert parse_frame(na(tlla=TLLA, src=OTHER), IFACE) == Sighting(IFACE, VIP6, TLLA_B, NA)


def test_na_without_option_reports_the_ethernet_source() -> None:
    assert parse_frame(na(tlla=None, src=OTHER)) == Sighting("", VIP6, OTHER_B, NA)


def test_na_option_after_other_options() -> None:
    frame = na(options=ICMPv6NDOptSrcLLAddr(lladdr=OWN), tlla=TLLA)
    assert parse_frame(frame) == Sighting("", VIP6, TLLA_B, NA)


def test_na_with_ethernet_padding_still_parses() -> None:
    assert parse_frame(na() + b"\x00" * 20) == Sighting("", VIP6, TLLA_B, NA)


def test_na_target_option_of_wrong_length_falls_back_to_ethernet_source() -> None:
    # type 2, length 2 (16 bytes): not an Ethernet address option.
    frame = na(tlla=None) + bytes([2, 2]) + TLLA_B + b"\x00" * 8
    frame = with_payload_len(frame, 24 + 16)
    assert parse_frame(frame) == Sighting("", VIP6, OTHER_B, NA)


def test_na_with_zero_length_option_is_invalid() -> None:
    frame = with_payload_len(na(tlla=None) + bytes([2, 0]) + b"\x00" * 6, 24 + 8)
    assert parse_frame(frame) is None


def test_na_with_option_running_past_the_payload_is_invalid() -> None:
    # The TLLA claims 16 bytes but only 8 are inside the payload.
    frame = bytearray(na(tlla=TLLA))
    frame[79] = 2
    assert parse_frame(bytes(frame)) is None


def test_na_with_hop_limit_64_is_ignored() -> None:
    assert parse_frame(na(hlim=64)) is None


def test_na_with_nonzero_code_is_ignored() -> None:
    frame = bytearray(na())
    frame[55] = 1
    assert parse_frame(bytes(frame)) is None


def test_na_for_a_multicast_target_is_ignored() -> None:
    assert parse_frame(na(target="ff02::1")) is None


def test_na_behind_an_extension_header_is_ignored() -> None:
    pkt = (
        Ether(src=OTHER, dst="33:33:00:00:00:01")
        / IPv6(src=str(VIP6), dst="ff02::1", hlim=255)
        / IPv6ExtHdrHopByHop()
        / ICMPv6ND_NA(tgt=str(VIP6))
        / ICMPv6NDOptDstLLAddr(lladdr=TLLA)
    )
    assert parse_frame(bytes(pkt)) is None


def test_neighbour_solicitation_is_ignored() -> None:
    assert parse_frame(ns()) is None


def test_other_icmpv6_and_ipv4_are_ignored() -> None:
    echo = Ether(src=OTHER) / IPv6(src=NODE6, dst=str(VIP6), hlim=255) / ICMPv6EchoRequest()
    assert parse_frame(bytes(echo)) is None
    udp = Ether(src=OTHER) / IP(src=str(VIP4), dst=NODE4) / UDP()
    assert parse_frame(bytes(udp)) is None


def test_ip_version_must_be_6() -> None:
    frame = bytearray(na())
    frame[14] = 0x40
    assert parse_frame(bytes(frame)) is None


@pytest.mark.parametrize("tpid", [0x8100, 0x88A8])
def test_vlan_tagged_frames_are_ignored(tpid: int) -> None:
    tagged_arp = (
        Ether(src=OTHER, dst=BCAST, type=tpid)
        / Dot1Q(vlan=20)
        / ARP(op=1, hwsrc=OTHER, psrc=str(VIP4), pdst=str(VIP4))
    )
    tagged_na = (
        Ether(src=OTHER, dst="33:33:00:00:00:01", type=tpid)
        / Dot1Q(vlan=20)
        / IPv6(src=str(VIP6), dst="ff02::1", hlim=255)
        / ICMPv6ND_NA(tgt=str(VIP6))
        / ICMPv6NDOptDstLLAddr(lladdr=TLLA)
    )
    assert parse_frame(bytes(tagged_arp)) is None
    assert parse_frame(bytes(tagged_na)) is None


def test_arp_truncated_at_every_length() -> None:
    frame = arp()
    whole = parse_frame(frame)
    assert whole is not None
    for n in range(len(frame)):
        # 42 bytes carry the whole ARP message; the rest is padding.
        assert parse_frame(frame[:n]) == (whole if n >= 42 else None), n


@pytest.mark.parametrize("frame", [na(tlla=TLLA), na(tlla=None)], ids=["tlla", "no-tlla"])
def test_na_truncated_at_every_length(frame: bytes) -> None:
    assert parse_frame(frame) is not None
    for n in range(len(frame)):
        assert parse_frame(frame[:n]) is None, n


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise(data: bytes) -> None:
    result = parse_frame(data)
    assert result is None or len(result.mac) == 6


_VALID = [arp(), arp(op=2), na(), na(tlla=None), ns(), unsolicited_na(OWN_B, VIP6)]


@settings(max_examples=2000, deadline=None)
@given(
    st.sampled_from(_VALID),
    st.lists(st.tuples(st.integers(0, 119), st.integers(0, 255)), max_size=6),
    st.integers(0, 120),
    st.binary(max_size=40),
)
def test_mutated_frames_never_raise(
    frame: bytes, flips: list[tuple[int, int]], cut: int, tail: bytes
) -> None:
    data = bytearray(frame)
    for at, value in flips:
        if at < len(data):
            data[at] = value
    mutated = bytes(data[:cut]) + tail
    result = parse_frame(mutated)
    assert result is None or (len(result.mac) == 6 and result.kind in (ARP_REQUEST, ARP_REPLY, NA))
    if result is not None and result.kind == NA:
        # What the parser accepts, the kernel-side filter must let through.
        assert run_bpf(NA_FILTER, mutated) > 0


# -- the BPF filter ---------------------------------------------------------------------------


def run_bpf(program: tuple[tuple[int, int, int, int], ...], frame: bytes) -> int:
    """Classic BPF as the kernel runs it, for the four instructions the filter uses.

    Returns how many bytes are accepted (0: dropped); a load past the end drops the frame,
    as in the kernel."""
    pc, acc = 0, 0
    for _ in range(len(program)):  # only forward jumps: at most len(program) steps
        code, jt, jf, k = program[pc]
        if code == 0x28:  # ldh [k]
            if k + 2 > len(frame):
                return 0
            acc = int.from_bytes(frame[k : k + 2], "big")
            pc += 1
        elif code == 0x30:  # ldb [k]
            if k + 1 > len(frame):
                return 0
            acc = frame[k]
            pc += 1
        elif code == 0x15:  # jeq #k
            pc += 1 + (jt if acc == k else jf)
        elif code == 0x06:  # ret #k
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
    raise AssertionError("program ran off its end")


def test_filter_accepts_neighbour_advertisements() -> None:
    for frame in (na(), na(tlla=None), unsolicited_na(OWN_B, VIP6), na() + b"\x00" * 10):
        assert run_bpf(NA_FILTER, frame) >= len(frame)


def test_filter_drops_everything_else() -> None:
    hop_by_hop = Ether() / IPv6(hlim=255) / IPv6ExtHdrHopByHop() / ICMPv6ND_NA(tgt=str(VIP6))
    echo = Ether() / IPv6(hlim=255) / ICMPv6EchoRequest()
    for frame in (
        ns(),
        na(hlim=64),
        bytes(hop_by_hop),
        bytes(echo),
        bytes(Ether() / IPv6() / UDP()),
        arp(),
        na()[:54],  # cut before the ICMPv6 type
        b"",
    ):
        assert run_bpf(NA_FILTER, frame) == 0


def test_filter_is_well_formed_for_the_kernel() -> None:
    # Jumps stay inside the program, and the last instruction returns.
    for pc, (code, jt, jf, _k) in enumerate(NA_FILTER):
        if code == 0x15:
            assert pc + 1 + max(jt, jf) < len(NA_FILTER)
    assert NA_FILTER[-1][0] == 0x06


# -- ConflictListener with fake sockets -------------------------------------------------------


class FakeSocket:
    """Frames queued by the test; a socketpair makes the fd readable while any are queued."""

    def __init__(self, interface: str, ethertype: int) -> None:
        self.interface = interface
        self.ethertype = ethertype
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self.queue: deque[tuple[bytes, tuple[Any, ...]] | BaseException] = deque()
        self.closed = False

    def deliver(
        self,
        frame: bytes,
        pkttype: int = socket.PACKET_BROADCAST,
        ifname: str | None = None,
        hatype: int = 1,
    ) -> None:
        address = (ifname or self.interface, self.ethertype, pkttype, hatype, frame[6:12])
        self._push((frame, address))

    def fail(self, exc: BaseException) -> None:
        self._push(exc)

    def _push(self, item: tuple[bytes, tuple[Any, ...]] | BaseException) -> None:
        if not self.queue:
            self._w.send(b"x")  # one byte while anything is queued: level-triggered
        self.queue.append(item)

    def fileno(self) -> int:
        return self._r.fileno()

    def recvfrom_into(self, buffer: bytearray) -> tuple[int, Any]:
        if not self.queue:
            raise BlockingIOError(errno.EAGAIN, "empty")
        item = self.queue.popleft()
        if not self.queue:
            self._r.recv(1)
        if isinstance(item, BaseException):
            raise item
        frame, address = item
        buffer[: len(frame)] = frame
        return len(frame), address

    def close(self) -> None:
        self.closed = True
        self._r.close()
        self._w.close()


class FakeKernel:
    def __init__(self, *interfaces: str) -> None:
        self.index = {name: i for i, name in enumerate(interfaces, start=2)}
        self.opened: list[FakeSocket] = []
        self.refuse: OSError | None = None

    def open_socket(self, interface: str, ethertype: int) -> FakeSocket:
        if interface not in self.index:
            raise OSError(errno.ENODEV, "No such device")
        if self.refuse is not None:
            raise self.refuse
        sock = FakeSocket(interface, ethertype)
        self.opened.append(sock)
        return sock

    def if_index(self, interface: str) -> int:
        if interface not in self.index:
            raise OSError("no interface with this name")  # what socket.if_nametoindex raises
        return self.index[interface]

    def open(self, interface: str = IFACE) -> dict[int, FakeSocket]:
        """The currently open socket per ethertype on `interface`."""
        return {s.ethertype: s for s in self.opened if s.interface == interface and not s.closed}

    def close_all(self) -> None:
        for s in self.opened:
            if not s.closed:
                s.close()


class Harness:
    def __init__(self, *interfaces: str) -> None:
        self.kernel = FakeKernel(*(interfaces or (IFACE,)))
        self.seen: list[Sighting] = []
        self.on_conflict: Callable[[Sighting], None] = self.seen.append
        self.listener = ConflictListener(
            asyncio.get_running_loop(),
            lambda s: self.on_conflict(s),
            open_socket=self.kernel.open_socket,
            if_index=self.kernel.if_index,
        )

    def arp_sock(self, interface: str = IFACE) -> FakeSocket:
        return self.kernel.open(interface)[ETH_P_ARP]

    def ip6_sock(self, interface: str = IFACE) -> FakeSocket:
        return self.kernel.open(interface)[ETH_P_IPV6]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def in_loop(body: Callable[[Harness], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    def test() -> None:
        async def main() -> None:
            h = Harness(IFACE, "eth1")
            try:
                await body(h)
            finally:
                h.listener.close()
                h.kernel.close_all()

        asyncio.run(main())

    test.__doc__ = body.__doc__
    test.__name__ = body.__name__
    return test


@in_loop
async def test_sockets_per_family(h: Harness) -> None:
    """An ARP socket only for IPv4 addresses, a filtered IPv6 one only for IPv6 ones."""
    h.listener.watch(IFACE, [VIP4], OWN_B)
    assert h.listener.listening == {(IFACE, "arp")}
    h.listener.watch(IFACE, [VIP4, VIP6], OWN_B)
    assert h.listener.listening == {(IFACE, "arp"), (IFACE, "ipv6")}
    arp_sock = h.arp_sock()
    h.listener.watch(IFACE, [VIP6], OWN_B)
    assert h.listener.listening == {(IFACE, "ipv6")}
    assert arp_sock.closed
    h.listener.watch(IFACE, [], OWN_B)
    assert h.listener.listening == frozenset()
    assert all(s.closed for s in h.kernel.opened)
    assert h.listener.watched(IFACE) == frozenset()


@in_loop
async def test_conflicts_are_reported_for_watched_addresses_only(h: Harness) -> None:
    """Other MACs claiming watched addresses are conflicts; our MAC, other addresses are not."""
    h.listener.watch(IFACE, [VIP4, VIP6], OWN_B)
    a, v6 = h.arp_sock(), h.ip6_sock()
    a.deliver(arp())  # conflict
    a.deliver(arp(psrc=str(UNWATCHED4), pdst=str(UNWATCHED4)))
    a.deliver(arp(hwsrc=OWN, src=OWN))  # ours
    a.deliver(arp(psrc="0.0.0.0"))  # probe
    a.deliver(arp(psrc=NODE4, pdst=str(VIP4)))  # a client asking
    v6.deliver(na(tlla=TLLA))  # conflict
    v6.deliver(na(tlla=OWN, src=OTHER))  # ours by the option, whatever the Ethernet source
    await settle()
    assert h.seen == [
        Sighting(IFACE, VIP4, OTHER_B, ARP_REQUEST),
        Sighting(IFACE, VIP6, TLLA_B, NA),
    ]
    assert (h.listener.frames_seen, h.listener.conflicts, h.listener.errors) == (7, 2, 0)


@in_loop
async def test_frames_not_from_the_wire_are_skipped(h: Harness) -> None:
    """Our outgoing frames, other hosts' unicast / other VLANs, stacked devices, non-Ethernet."""
    h.listener.watch(IFACE, [VIP4], OWN_B)
    a = h.arp_sock()
    a.deliver(arp(), pkttype=socket.PACKET_OUTGOING)
    a.deliver(arp(), pkttype=socket.PACKET_OTHERHOST)
    a.deliver(arp(), ifname=IFACE + ".20")
    a.deliver(arp(), hatype=772)  # ARPHRD_LOOPBACK
    await settle()
    assert h.seen == []
    assert h.listener.frames_seen == 4
    for pkttype in (socket.PACKET_HOST, socket.PACKET_BROADCAST, socket.PACKET_MULTICAST):
        a.deliver(arp(), pkttype=pkttype)
    await settle()
    assert len(h.seen) == 3


@in_loop
async def test_unknown_own_mac_reports_every_mac(h: Harness) -> None:
    """own_mac=None: no frame is recognised as ours by its MAC."""
    h.listener.watch(IFACE, [VIP4], None)
    h.arp_sock().deliver(arp(hwsrc=OWN, src=OWN))
    await settle()
    assert h.seen == [Sighting(IFACE, VIP4, OWN_B, ARP_REQUEST)]


@in_loop
async def test_interfaces_and_scoped_addresses_are_reduced_to_addresses(h: Harness) -> None:
    """The daemon's pool holds IPv4Interface/IPv6Interface objects; frames carry addresses."""
    h.listener.watch(
        IFACE,
        [ipaddress.IPv4Interface("203.0.113.10/24"), ipaddress.IPv6Interface("2001:db8:1::10/64")],
        OWN_B,
    )
    assert h.listener.watched(IFACE) == {VIP4, VIP6}
    h.arp_sock().deliver(arp())
    h.ip6_sock().deliver(na())
    await settle()
    assert [s.address for s in h.seen] == [VIP4, VIP6]


@in_loop
async def test_watch_replaces_the_set_and_interfaces_are_separate(h: Harness) -> None:
    """A later watch() replaces the set; each interface has its own set and sockets."""
    h.listener.watch(IFACE, [VIP4], OWN_B)
    h.listener.watch("eth1", [VIP4_B], OWN_B)
    h.listener.watch(IFACE, [VIP4_B], OWN_B)
    h.arp_sock().deliver(arp(psrc=str(VIP4)))  # no longer watched on eth0
    h.arp_sock().deliver(arp(psrc=str(VIP4_B)))
    h.arp_sock("eth1").deliver(arp(psrc=str(VIP4)))  # never watched on eth1
    await settle()
    assert h.seen == [Sighting(IFACE, VIP4_B, OTHER_B, ARP_REQUEST)]
    assert len(h.kernel.opened) == 2  # the eth0 socket was kept across the change


@in_loop
async def test_own_mac_change_applies(h: Harness) -> None:
    """watch() with a new own_mac: frames from the old MAC become conflicts."""
    h.listener.watch(IFACE, [VIP4], OTHER_B)
    h.arp_sock().deliver(arp())
    await settle()
    assert h.seen == []
    h.listener.watch(IFACE, [VIP4], OWN_B)
    h.arp_sock().deliver(arp())
    await settle()
    assert h.seen == [Sighting(IFACE, VIP4, OTHER_B, ARP_REQUEST)]


@in_loop
async def test_a_wakeup_reads_at_most_the_bound(h: Harness) -> None:
    """A flood is read in batches of MAX_FRAMES_PER_WAKEUP; every frame gets its turn."""
    counts: list[int] = []
    h.on_conflict = lambda s: counts.append(h.listener.frames_seen)
    h.listener.watch(IFACE, [VIP4], OWN_B)
    total = MAX_FRAMES_PER_WAKEUP + 44
    for _ in range(total):
        h.arp_sock().deliver(arp())
    await settle()
    # Conflicts are reported after each batch is read: the first batch saw 256 frames.
    assert counts == [MAX_FRAMES_PER_WAKEUP] * MAX_FRAMES_PER_WAKEUP + [total] * 44


@in_loop
async def test_missing_interface_warns_once_per_streak(h: Harness) -> None:
    """No raise; one warning while it stays missing; sockets open once it exists."""
    with capture_logs() as logs:
        for _ in range(3):
            h.listener.watch("eth9", [VIP4], OWN_B)
        assert h.listener.listening == frozenset()
        assert h.listener.errors == 3
        h.kernel.index["eth9"] = 9
        h.listener.watch("eth9", [VIP4], OWN_B)
        assert h.listener.listening == {("eth9", "arp")}
        del h.kernel.index["eth9"]
        h.listener.watch("eth9", [VIP4], OWN_B)  # a new streak: warned again
        assert h.listener.listening == frozenset()
    events = [e["event"] for e in logs]
    assert events == [
        "conflict_listener_interface_missing",
        "conflict_listener_listening",
        "conflict_listener_interface_missing",
    ]
    assert logs[0]["interface"] == "eth9"


@in_loop
async def test_open_failure_other_than_missing_is_logged_and_retried(h: Harness) -> None:
    """EPERM (no CAP_NET_RAW): logged once, retried on every watch()."""
    h.kernel.refuse = PermissionError(errno.EPERM, "Operation not permitted")
    with capture_logs() as logs:
        h.listener.watch(IFACE, [VIP4], OWN_B)
        h.listener.watch(IFACE, [VIP4], OWN_B)
        h.kernel.refuse = None
        h.listener.watch(IFACE, [VIP4], OWN_B)
    assert [e["event"] for e in logs] == [
        "conflict_listener_open_failed",
        "conflict_listener_listening",
    ]
    assert logs[0]["errno"] == "EPERM"
    assert h.listener.listening == {(IFACE, "arp")}


@in_loop
async def test_read_error_closes_the_socket_until_the_next_watch(h: Harness) -> None:
    """A socket error is counted and logged, never raised; watch() opens a fresh socket."""
    h.listener.watch(IFACE, [VIP4], OWN_B)
    broken = h.arp_sock()
    with capture_logs() as logs:
        broken.fail(OSError(errno.EIO, "I/O error"))
        broken.deliver(arp())  # queued behind the error: lost with the socket
        await settle()
    assert broken.closed
    assert h.listener.errors == 1
    assert h.listener.listening == frozenset()
    assert logs[0]["event"] == "conflict_listener_read_failed"
    assert logs[0]["errno"] == "EIO"
    h.listener.watch(IFACE, [VIP4], OWN_B)
    fresh = h.arp_sock()
    assert fresh is not broken
    fresh.deliver(arp())
    await settle()
    assert len(h.seen) == 1


@in_loop
async def test_link_down_keeps_the_socket(h: Harness) -> None:
    """ENETDOWN on the same device: the kernel resumes delivery on link up; keep the socket."""
    h.listener.watch(IFACE, [VIP4], OWN_B)
    sock = h.arp_sock()
    sock.fail(OSError(errno.ENETDOWN, "Network is down"))
    sock.deliver(arp())
    await settle()
    assert not sock.closed
    assert h.listener.errors == 1
    assert len(h.seen) == 1


@in_loop
async def test_deleted_interface_closes_the_socket(h: Harness) -> None:
    """ENETDOWN because the device is gone: the socket is dead; reopen on the next watch."""
    h.listener.watch(IFACE, [VIP4], OWN_B)
    sock = h.arp_sock()
    del h.kernel.index[IFACE]
    sock.fail(OSError(errno.ENETDOWN, "Network is down"))
    await settle()
    assert sock.closed
    h.kernel.index[IFACE] = 42  # recreated: a new ifindex
    h.listener.watch(IFACE, [VIP4], OWN_B)
    assert h.listener.listening == {(IFACE, "arp")}


@in_loop
async def test_recreated_interface_is_followed_on_watch(h: Harness) -> None:
    """A socket bound to an old ifindex hears nothing: watch() replaces it."""
    h.listener.watch(IFACE, [VIP4], OWN_B)
    old = h.arp_sock()
    h.listener.watch(IFACE, [VIP4], OWN_B)
    assert not old.closed  # same device: kept
    h.kernel.index[IFACE] = 77
    h.listener.watch(IFACE, [VIP4], OWN_B)
    assert old.closed
    assert h.arp_sock() is not old


@in_loop
async def test_callback_errors_are_contained(h: Harness) -> None:
    """An exception in on_conflict is counted and logged; the rest of the batch still runs."""
    calls: list[Sighting] = []

    def explode(s: Sighting) -> None:
        calls.append(s)
        raise RuntimeError("boom")

    h.on_conflict = explode
    h.listener.watch(IFACE, [VIP4], OWN_B)
    with capture_logs() as logs:
        h.arp_sock().deliver(arp())
        h.arp_sock().deliver(arp(op=2))
        await settle()
    assert len(calls) == 2
    assert h.listener.errors == 2
    assert [e["event"] for e in logs if e["log_level"] == "error"] == [
        "conflict_callback_failed"
    ] * 2


@in_loop
async def test_unexpected_exception_while_reading_is_contained(h: Harness) -> None:
    """Not even a bug in the read path escapes into the loop (and it does not spin)."""
    h.listener.watch(IFACE, [VIP4], OWN_B)
    sock = h.arp_sock()
    sock.fail(RuntimeError("bug"))
    await settle()
    assert h.listener.errors == 1
    assert sock.closed


@in_loop
async def test_callback_may_unwatch_mid_batch(h: Harness) -> None:
    """Sightings of a batch are checked against what is watched when they are reported."""

    def unwatch(s: Sighting) -> None:
        h.seen.append(s)
        h.listener.watch(IFACE, [], OWN_B)

    h.on_conflict = unwatch
    h.listener.watch(IFACE, [VIP4], OWN_B)
    sock = h.arp_sock()
    sock.deliver(arp())
    sock.deliver(arp())
    await settle()
    assert len(h.seen) == 1
    assert sock.closed


@in_loop
async def test_close_is_idempotent_and_final(h: Harness) -> None:
    """close() closes every socket, twice is fine, watch() afterwards does nothing."""
    h.listener.watch(IFACE, [VIP4, VIP6], OWN_B)
    h.listener.watch("eth1", [VIP4], OWN_B)
    h.listener.close()
    h.listener.close()
    assert all(s.closed for s in h.kernel.opened)
    assert h.listener.listening == frozenset()
    h.listener.watch(IFACE, [VIP4], OWN_B)
    assert h.listener.listening == frozenset()
    assert len(h.kernel.opened) == 3


@in_loop
async def test_own_mac_must_be_six_bytes(h: Harness) -> None:
    """A wrong MAC is a programming error: it fails loudly."""
    with pytest.raises(ValueError, match="6 bytes"):
        h.listener.watch(IFACE, [VIP4], OWN_B[:5])
