"""The notify list: frames parsed back with scapy, netblock expansion, the throttle, and its
wiring into RawAnnouncer (claims notify, one-shots and repeats do not, releases drop)."""

from __future__ import annotations

import asyncio
import ipaddress
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether
from structlog.testing import capture_logs

from tests.unit.test_arp_frames import (
    MAC,
    MAC_TEXT,
    Harness,
    RecordingSender,
    advance,
    in_loop,
)
from vipd.arp.announcer import RawAnnouncer
from vipd.arp.notify import (
    MAX_QUEUED,
    IPAddress,
    IPNetwork,
    Notifier,
    NotifyFrames,
    expand_targets,
    notify_arp_reply,
    notify_na,
    notify_targets,
    solicited_node_mac,
)
from vipd.config import IPInterface

VIP4 = ipaddress.IPv4Interface("203.0.113.10/32")
VIP6 = ipaddress.IPv6Interface("2001:db8:1::10/128")
ROUTER4 = ipaddress.IPv4Address("198.51.100.1")
ROUTER6 = ipaddress.IPv6Address("2001:db8::1:2:3")
MAC2 = bytes.fromhex("02005e0000bb")


def nets(*texts: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


def v4(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(text)


def v6(text: str) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(text)


# -- frames ---------------------------------------------------------------------------------


def test_arp_reply_addressed_to_target() -> None:
    frame = notify_arp_reply(MAC, VIP4.ip, ROUTER4)
    assert len(frame) == 60
    pkt = Ether(frame)
    assert pkt.dst == "ff:ff:ff:ff:ff:ff"  # we do not know the target's MAC
    assert pkt.src == MAC_TEXT
    assert pkt.type == 0x0806
    arp = pkt[ARP]
    assert (arp.hwtype, arp.ptype, arp.hwlen, arp.plen) == (1, 0x0800, 6, 4)
    assert arp.op == 2
    assert arp.hwsrc == MAC_TEXT
    assert arp.psrc == "203.0.113.10"
    assert arp.hwdst == "ff:ff:ff:ff:ff:ff"
    assert arp.pdst == "198.51.100.1"


@pytest.mark.parametrize("router", [False, True])
def test_na_addressed_to_target(router: bool) -> None:
    frame = notify_na(MAC, VIP6.ip, ROUTER6, router=router)
    pkt = Ether(frame)
    assert pkt.dst == "33:33:ff:02:00:03"  # solicited-node group of 2001:db8::1:2:3
    assert pkt.src == MAC_TEXT
    assert pkt.type == 0x86DD
    ip6 = pkt[IPv6]
    assert ip6.src == "2001:db8:1::10"
    assert ip6.dst == "2001:db8::1:2:3"  # unicast
    assert ip6.hlim == 255
    na = pkt[ICMPv6ND_NA]
    assert na.tgt == "2001:db8:1::10"
    flags = (na.R, na.S, na.O)
    assert flags == (int(router), 0, 1)
    opt = pkt[ICMPv6NDOptDstLLAddr]
    assert (opt.type, opt.len, opt.lladdr) == (2, 1, MAC_TEXT)
    sent = na.cksum
    del na.cksum
    assert Ether(bytes(pkt))[ICMPv6ND_NA].cksum == sent
    assert len(frame) == 14 + 40 + 24 + 8


def test_solicited_node_mac() -> None:
    assert solicited_node_mac(v6("2001:db8::abcd:ef12")) == "33:33:ff:cd:ef:12"
    assert solicited_node_mac(v6("::")) == "33:33:ff:00:00:00"


@pytest.mark.parametrize("router", [False, True])
@pytest.mark.parametrize(
    ("vip", "target"),
    [
        ("203.0.113.10", "198.51.100.1"),
        ("203.0.113.255", "0.0.0.1"),
        ("2001:db8:1::10", "2001:db8::1"),
        ("2001:db8:1::10", "fe80::1"),
        ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", "2001:db8:ffff:ffff:ffff:ffff:ffff:fffe"),
        ("2001:db8::", "2001:db8::"),
    ],
)
def test_patched_frames_equal_scapy_built(vip: str, target: str, router: bool) -> None:
    a, t = ipaddress.ip_address(vip), ipaddress.ip_address(target)
    frames = NotifyFrames(MAC, a.version, router=router)
    if isinstance(a, ipaddress.IPv4Address):
        assert isinstance(t, ipaddress.IPv4Address)
        assert frames.frame(a, t) == notify_arp_reply(MAC, a, t)
    else:
        assert isinstance(t, ipaddress.IPv6Address)
        assert frames.frame(a, t) == notify_na(MAC, a, t, router=router)


@settings(max_examples=150, deadline=None)
@given(
    mac=st.binary(min_size=6, max_size=6),
    vip=st.integers(0, 2**128 - 1),
    target=st.integers(0, 2**128 - 1),
    router=st.booleans(),
)
def test_patched_na_equals_scapy_built_property(
    mac: bytes, vip: int, target: int, router: bool
) -> None:
    a, t = ipaddress.IPv6Address(vip), ipaddress.IPv6Address(target)
    assert NotifyFrames(mac, 6, router=router).frame(a, t) == notify_na(mac, a, t, router=router)


@settings(max_examples=100, deadline=None)
@given(
    mac=st.binary(min_size=6, max_size=6),
    vip=st.integers(0, 2**32 - 1),
    target=st.integers(0, 2**32 - 1),
)
def test_patched_arp_equals_scapy_built_property(mac: bytes, vip: int, target: int) -> None:
    a, t = ipaddress.IPv4Address(vip), ipaddress.IPv4Address(target)
    assert NotifyFrames(mac, 4).frame(a, t) == notify_arp_reply(mac, a, t)


def test_frame_family_must_match() -> None:
    with pytest.raises(ValueError, match="IPv4"):
        NotifyFrames(MAC, 4).frame(VIP4.ip, ROUTER6)
    with pytest.raises(ValueError, match="IPv6"):
        NotifyFrames(MAC, 6).frame(VIP4.ip, ROUTER4)
    with pytest.raises(ValueError):
        NotifyFrames(MAC, 5)
    with pytest.raises(ValueError, match="6 bytes"):
        NotifyFrames(MAC[:5], 4)


# -- targets --------------------------------------------------------------------------------


def test_netblock_expansion_rules() -> None:
    def hosts(text: str) -> list[str]:
        net = ipaddress.ip_network(text)
        return [str(a) for a in expand_targets((net,), net.version)]

    assert hosts("198.51.100.7/32") == ["198.51.100.7"]
    assert hosts("198.51.100.6/31") == ["198.51.100.6", "198.51.100.7"]  # RFC 3021
    assert hosts("198.51.100.4/30") == ["198.51.100.5", "198.51.100.6"]  # no net/bcast
    h24 = hosts("198.51.100.0/24")
    assert len(h24) == 254 and h24[0] == "198.51.100.1" and h24[-1] == "198.51.100.254"
    h20 = expand_targets(nets("198.51.96.0/20"), 4)
    assert len(h20) == 4094 and str(h20[-1]) == "198.51.111.254"
    assert hosts("2001:db8::1/128") == ["2001:db8::1"]
    assert hosts("2001:db8::/127") == ["2001:db8::", "2001:db8::1"]
    # Subnet-Router anycast (all-zero host part) left out, the top address kept.
    assert hosts("2001:db8::/126") == ["2001:db8::1", "2001:db8::2", "2001:db8::3"]


def test_targets_same_family_ordered_once_without_vip() -> None:
    targets = nets("198.51.100.1/32", "2001:db8::1/128", "203.0.113.8/30", "198.51.100.0/30")
    assert [str(a) for a in notify_targets(VIP4.ip, targets)] == [
        "198.51.100.1",  # listed first, told first
        "203.0.113.9",
        # 203.0.113.10 is the VIP itself
        "198.51.100.2",  # 198.51.100.1 again: told once
    ]
    assert [str(a) for a in notify_targets(VIP6.ip, targets)] == ["2001:db8::1"]
    assert notify_targets(VIP4.ip, nets("2001:db8::/64")) == ()
    assert notify_targets(VIP4.ip, nets("203.0.113.10/32")) == ()


# -- the throttle, on a virtual clock ---------------------------------------------------------


class NotifyHarness:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        targets: tuple[IPNetwork, ...],
        rate: float,
        **options: object,
    ) -> None:
        self.loop = loop
        self.sent: list[tuple[str, bytes]] = []
        self.times: list[float] = []
        self.senders: dict[str, RecordingSender] = {}
        self.changed: list[tuple[str, IPInterface]] = []
        self.notifier = Notifier(
            loop,
            targets,
            rate=rate,
            sender_for=self._sender,
            on_interface_changed=lambda i, a: self.changed.append((i, a)),
            **options,  # type: ignore[arg-type]
        )

    def _sender(self, interface: str) -> RecordingSender:
        sender = self.senders.get(interface)
        if sender is None:
            sender = self.senders[interface] = TimedSender(interface, self.sent, self)
        return sender

    def targets_of(self, vip: IPAddress) -> list[str]:
        """Target IPs of the frames sent about `vip`, in order."""
        out = []
        for _, frame in self.sent:
            pkt = Ether(frame)
            if pkt.haslayer(ARP) and pkt[ARP].psrc == str(vip):
                out.append(pkt[ARP].pdst)
            elif pkt.haslayer(ICMPv6ND_NA) and pkt[ICMPv6ND_NA].tgt == str(vip):
                out.append(pkt[IPv6].dst)
        return out


class TimedSender(RecordingSender):
    def __init__(self, interface: str, log: list[tuple[str, bytes]], h: NotifyHarness) -> None:
        super().__init__(interface, log)
        self.h = h

    def send(self, frame: bytes) -> bool:
        ok = super().send(frame)
        if ok:
            self.h.times.append(self.h.loop.time())
        return ok


@in_loop
async def test_throttle_burst_then_rate() -> None:
    h = NotifyHarness(asyncio.get_running_loop(), nets("198.51.100.0/27"), rate=10)  # 30 hosts
    n = h.notifier
    n.notify("eth0", VIP4, MAC, 0)
    assert n.notify_sent == 10  # a full bucket: `rate` frames at once
    assert n.queued == 20 and n.queued_for(VIP4) == 20
    for t in (0.55, 1.05, 1.55):
        await advance(t - asyncio.get_running_loop().time())
        expected = 10 + int(t * 10)  # one more per 1/rate seconds
        assert expected - 1 <= n.notify_sent <= expected, (t, n.notify_sent)
    await advance(1.0)
    assert n.notify_sent == 30 and n.queued == 0
    assert n.notify_dropped == 0 and n.send_errors == 0
    assert h.times[-1] == pytest.approx(2.0, abs=0.02)  # 20 frames at 10/s after the burst
    # Every host once, in order; the frames are what was promised.
    assert h.targets_of(VIP4.ip) == [f"198.51.100.{i}" for i in range(1, 31)]
    arp = Ether(h.sent[0][1])[ARP]
    assert (arp.op, arp.hwsrc, arp.psrc) == (2, MAC_TEXT, "203.0.113.10")
    # The bucket refilled while idle, to `rate` and no further.
    await advance(5.0)
    n.notify("eth0", VIP4, MAC, 0)
    assert n.notify_sent == 40
    n.close()


@in_loop
async def test_throttle_shared_by_addresses_round_robin() -> None:
    h = NotifyHarness(asyncio.get_running_loop(), nets("198.51.100.0/29"), rate=4)  # 6 hosts
    vip_b = ipaddress.IPv4Interface("203.0.113.11/32")
    h.notifier.notify("eth0", VIP4, MAC, 0)
    h.notifier.notify("eth0", vip_b, MAC, 0)
    assert h.notifier.notify_sent == 4  # the budget is shared: B waits
    await advance(3.0)
    assert h.notifier.notify_sent == 12
    sources = [Ether(f)[ARP].psrc for _, f in h.sent]
    # A's first 4 at once, then one frame per address in turn.
    assert (
        sources
        == ["203.0.113.10"] * 4 + ["203.0.113.10", "203.0.113.11"] * 2 + ["203.0.113.11"] * 4
    )
    assert h.targets_of(vip_b.ip) == [f"198.51.100.{i}" for i in range(1, 7)]
    h.notifier.close()


@in_loop
async def test_cancel_drops_queued_frames() -> None:
    h = NotifyHarness(asyncio.get_running_loop(), nets("198.51.100.0/27"), rate=10)
    vip_b = ipaddress.IPv4Interface("203.0.113.11/32")
    h.notifier.notify("eth0", VIP4, MAC, 0)
    h.notifier.notify("eth0", vip_b, MAC, 0)
    assert h.notifier.queued == 50
    h.notifier.cancel(VIP4)  # released
    assert h.notifier.queued == 30 and h.notifier.queued_for(VIP4) == 0
    await advance(5.0)
    assert len(h.targets_of(VIP4.ip)) == 10  # only what had left before the release
    assert len(h.targets_of(vip_b.ip)) == 30
    h.notifier.cancel(vip_b)  # nothing queued: a no-op
    assert h.notifier.notify_dropped == 0  # a release is not a drop
    h.notifier.close()


@in_loop
async def test_reclaim_replaces_queued_frames() -> None:
    h = NotifyHarness(asyncio.get_running_loop(), nets("198.51.100.0/27"), rate=10)
    h.notifier.notify("eth0", VIP4, MAC, 0)
    h.notifier.notify("eth0", VIP4, MAC, 0)  # claimed again before the first finished
    assert h.notifier.notify_sent == 10 and h.notifier.queued == 30  # not 20 + 30
    await advance(4.0)
    assert h.notifier.notify_sent == 40
    h.notifier.close()


@in_loop
async def test_queue_bound_drops_and_counts() -> None:
    h = NotifyHarness(asyncio.get_running_loop(), nets("198.51.100.0/27"), rate=10, max_queued=25)
    n = h.notifier
    vip_b = ipaddress.IPv4Interface("203.0.113.11/32")
    with capture_logs() as logs:
        n.notify("eth0", VIP4, MAC, 0)  # 30 frames, room for 25: the last 5 targets dropped
        assert (n.notify_dropped, n.notify_sent, n.queued) == (5, 10, 15)
        n.notify("eth0", vip_b, MAC, 0)  # room for 10 of 30
        assert (n.notify_dropped, n.queued) == (25, 25)
        await advance(5.0)
    assert n.notify_sent == 35 and n.queued == 0
    # One warning per episode, not per claim, and a summary once the queue ran empty.
    events = [(e["event"], e.get("dropped")) for e in logs if e["event"].startswith("notify_")]
    assert events == [("notify_queue_full", 5), ("notify_queue_drained", 25)]
    # The head of each list (where the routers are) survives, the tail is dropped.
    assert h.targets_of(VIP4.ip) == [f"198.51.100.{i}" for i in range(1, 26)]
    assert h.targets_of(vip_b.ip) == [f"198.51.100.{i}" for i in range(1, 11)]
    assert MAX_QUEUED == 65_536
    n.close()


@in_loop
async def test_default_bound_is_65536_frames() -> None:
    # 17 claims of a /20 (4094 frames each) at 1 frame/s: 16 fit almost entirely.
    h = NotifyHarness(asyncio.get_running_loop(), nets("198.51.96.0/20"), rate=1)
    n = h.notifier
    for i in range(17):
        n.notify("eth0", ipaddress.IPv4Interface(f"203.0.113.{i}/32"), MAC, 0)
    assert n.notify_sent == 1
    assert n.queued == MAX_QUEUED
    assert n.notify_dropped == 17 * 4094 - 1 - MAX_QUEUED
    n.close()
    assert n.queued == 0


@in_loop
async def test_replaced_device_drops_job_and_asks_for_reannounce() -> None:
    h = NotifyHarness(asyncio.get_running_loop(), nets("198.51.100.0/27"), rate=10)
    h.notifier.notify("eth0", VIP4, MAC, 0)
    h.senders["eth0"].generation = 1  # the MAC the frames carry is stale now
    await advance(0.5)
    assert h.notifier.notify_sent == 10 and h.notifier.queued == 0
    assert h.changed == [("eth0", VIP4)]
    h.notifier.close()


@in_loop
async def test_failures_never_raise() -> None:
    loop = asyncio.get_running_loop()
    h = NotifyHarness(loop, nets("198.51.100.0/29"), rate=100)
    h.notifier.notify("eth0", VIP4, MAC, 0)
    h.senders["eth0"].fail = True
    h.notifier.notify("eth0", VIP4, MAC, 0)
    assert h.notifier.notify_sent == 6 and h.notifier.send_errors == 6

    class Exploding(RecordingSender):
        def send(self, frame: bytes) -> bool:
            raise RuntimeError("boom")

    def broken_sender_for(interface: str) -> RecordingSender:
        if interface == "bad0":
            raise OSError(19, "No such device")
        return Exploding(interface, [])

    n = Notifier(loop, nets("198.51.100.0/29"), rate=2, sender_for=broken_sender_for)
    n.notify("bad0", VIP4, MAC, 0)  # no sender: the claim's frames are dropped
    assert n.queued == 0 and n.notify_dropped == 6 and n.send_errors == 1
    n.notify("eth0", VIP4, MAC, 0)  # the sink raises: counted, the queue goes on
    assert n.send_errors == 3 and n.queued == 4
    await advance(2.1)
    assert n.send_errors == 7 and n.queued == 0 and n.notify_sent == 0
    n.notify("eth0", VIP4, b"\x00", 0)  # a bad MAC: logged and counted
    assert n.send_errors == 8 and n.queued == 0
    n.close()
    h.notifier.close()


def test_rate_must_be_positive() -> None:
    loop = asyncio.new_event_loop()
    try:
        for rate in (0, -1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="notify rate"):
                Notifier(loop, (), rate=rate, sender_for=lambda i: RecordingSender(i, []))
            with pytest.raises(ValueError, match="notify rate"):
                RawAnnouncer(loop, lambda _: MAC, notify_rate=rate)
        # Below 1 frame/s the bucket still holds one frame.
        n = Notifier(loop, (), rate=0.2, sender_for=lambda i: RecordingSender(i, []))
        assert n.capacity == 1.0
    finally:
        loop.close()


def test_real_clock_rate() -> None:
    """50 frames/s for 100 frames on a real loop: 50 at once, the rest over about 1 s."""

    async def body() -> tuple[int, float, list[float]]:
        loop = asyncio.get_running_loop()
        h = NotifyHarness(loop, nets("198.51.100.0/25"), rate=50)  # 126 hosts
        h.notifier.max_queued = 100
        start = loop.time()
        h.notifier.notify("eth0", VIP4, MAC, 0)
        at_once = h.notifier.notify_sent
        while h.notifier.queued:
            await asyncio.sleep(0.01)
        h.notifier.close()
        return at_once, loop.time() - start, [t - start for t in h.times]

    wall = time.monotonic()
    at_once, elapsed, times = asyncio.run(body())
    assert at_once == 50
    assert len(times) == 100
    assert 0.95 <= elapsed <= 2.0, elapsed
    # Never ahead of the budget: frame k (0-based) leaves no earlier than (k - 49) / 50 s.
    for k, t in enumerate(times):
        assert t >= (k - 49) / 50 - 0.002, (k, t)
    assert time.monotonic() - wall < 3.0


# -- through RawAnnouncer ---------------------------------------------------------------------


def _notify_frames(h: Harness) -> list[bytes]:
    """Frames the announcer sent that are directed (ARP reply to another IP, NA to unicast)."""
    out = []
    for _, frame in h.sent:
        pkt = Ether(frame)
        if (pkt.haslayer(ARP) and pkt[ARP].pdst != pkt[ARP].psrc) or (
            pkt.haslayer(IPv6) and pkt[IPv6].dst != "ff02::1"
        ):
            out.append(frame)
    return out


@in_loop
async def test_announcer_notifies_on_claim_only() -> None:
    h = Harness(
        asyncio.get_running_loop(),
        (0.0, 0.05, 0.1),
        notify=nets("198.51.100.1/32", "203.0.113.8/30", "2001:db8::1/128"),
    )
    ann = h.announcer
    ann.announce("eth0", VIP4)
    # The broadcast pair first, then the list: 198.51.100.1 and 203.0.113.9 (the /30's
    # other host is the VIP itself; the IPv6 target is for IPv6 VIPs).
    frames = [Ether(f)[ARP] for _, f in h.sent]
    assert [(a.op, a.pdst) for a in frames] == [
        (1, "203.0.113.10"),
        (2, "203.0.113.10"),
        (2, "198.51.100.1"),
        (2, "203.0.113.9"),
    ]
    assert ann.notify_sent == 2 and ann.frames_sent[VIP4] == 2
    await advance(0.2)  # repeats at 0.05 and 0.1: no notify
    assert ann.frames_sent[VIP4] == 6 and ann.notify_sent == 2
    ann.announce_once("eth0", VIP4)  # refresh / defence: no notify
    assert ann.frames_sent[VIP4] == 8 and ann.notify_sent == 2
    ann.announce("eth0", VIP4)  # a new claim notifies again
    assert ann.notify_sent == 4
    ann.announce("eth0", VIP6)
    (na_frame,) = _notify_frames(h)[4:]
    pkt = Ether(na_frame)
    assert pkt[IPv6].dst == "2001:db8::1" and pkt[ICMPv6ND_NA].R == 0
    assert ann.notify_sent == 5
    ann.close()


@in_loop
async def test_announcer_notify_router_flag_and_async_lookup() -> None:
    gate = asyncio.Event()

    async def lookup(interface: str) -> bytes:
        await gate.wait()
        return MAC

    h = Harness(
        asyncio.get_running_loop(),
        (0.0,),
        lookup,
        notify=nets("2001:db8::1/128"),
        na_router=True,
    )
    h.announcer.announce("eth0", VIP6)
    assert h.sent == []  # notify waits for the MAC like the burst does
    gate.set()
    await advance(0.01)
    broadcast, directed = (Ether(f) for _, f in h.sent)
    assert broadcast[IPv6].dst == "ff02::1" and broadcast[ICMPv6ND_NA].R == 1
    assert directed[IPv6].dst == "2001:db8::1" and directed[ICMPv6ND_NA].R == 1
    assert directed[ICMPv6NDOptDstLLAddr].lladdr == MAC_TEXT
    h.announcer.close()


@in_loop
async def test_announcer_release_and_close_drop_queued_notify() -> None:
    h = Harness(
        asyncio.get_running_loop(),
        (0.0,),
        notify=nets("198.51.100.0/27"),
        notify_rate=10,
    )
    ann = h.announcer
    vip_b = ipaddress.IPv4Interface("203.0.113.11/32")
    ann.announce("eth0", VIP4)
    ann.announce("eth0", vip_b)
    assert ann.notify_sent == 10 and ann.notifier.queued == 50
    ann.cancel(VIP4)
    assert ann.notifier.queued == 30
    await advance(0.5)
    sent = ann.notify_sent
    assert 14 <= sent <= 15  # 10/s after the burst
    ann.close()
    assert ann.notifier.queued == 0
    await advance(2.0)
    assert ann.notify_sent == sent and ann.notify_dropped == 0


@in_loop
async def test_announcer_reannounces_when_notify_finds_new_mac() -> None:
    macs = [MAC, MAC2]
    h = Harness(
        asyncio.get_running_loop(),
        (0.0,),
        lambda _: macs[0],
        notify=nets("198.51.100.0/29"),
        notify_rate=2,
    )
    ann = h.announcer
    ann.announce("eth0", VIP4)
    assert not ann.pending  # the schedule is over; 4 notify frames still queued
    assert ann.notifier.queued == 4
    macs.pop(0)
    h.senders["eth0"].generation += 1
    await advance(5.0)
    # The drain noticed the new device before sending with the old MAC and re-announced:
    # a fresh broadcast pair and the whole list again, all with the new MAC.
    after = [Ether(f) for _, f in h.sent[4:]]
    assert {p.src for p in after} == {"02:00:5e:00:00:bb"}
    assert [p[ARP].pdst for p in after] == ["203.0.113.10"] * 2 + [
        f"198.51.100.{i}" for i in range(1, 7)
    ]
    assert ann.notify_sent == 2 + 6
    ann.close()
