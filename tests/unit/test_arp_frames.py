"""Announcement frames parsed back with scapy, and the announcer's schedule with fake senders."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether

from tests.fakes import FakeAnnouncer
from vipd.arp.announcer import RawAnnouncer
from vipd.arp.frames import (
    announcement_frames,
    garp_reply,
    garp_request,
    mac_text,
    unsolicited_na,
)

MAC = bytes.fromhex("02005e0000aa")
MAC_TEXT = "02:00:5e:00:00:aa"
V4 = ipaddress.IPv4Interface("203.0.113.10/32")
V6 = ipaddress.IPv6Interface("2001:db8:1::10/128")
ARP_ETHERTYPE = 0x0806
IPV6_ETHERTYPE = 0x86DD


def _arp(frame: bytes) -> tuple[Ether, ARP]:
    pkt = Ether(frame)
    assert pkt.haslayer(ARP)
    return pkt, pkt[ARP]


def test_garp_request_fields() -> None:
    frame = garp_request(MAC, V4.ip)
    eth, arp = _arp(frame)
    assert len(frame) == 60  # padded to the Ethernet minimum
    assert eth.dst == "ff:ff:ff:ff:ff:ff"
    assert eth.src == MAC_TEXT
    assert eth.type == ARP_ETHERTYPE
    assert (arp.hwtype, arp.ptype, arp.hwlen, arp.plen) == (1, 0x0800, 6, 4)
    assert arp.op == 1
    assert arp.hwsrc == MAC_TEXT
    assert arp.psrc == "203.0.113.10"
    assert arp.hwdst == "00:00:00:00:00:00"
    assert arp.pdst == "203.0.113.10"


def test_garp_reply_fields() -> None:
    frame = garp_reply(MAC, V4.ip)
    eth, arp = _arp(frame)
    assert len(frame) == 60
    assert eth.dst == "ff:ff:ff:ff:ff:ff"
    assert eth.src == MAC_TEXT
    assert eth.type == ARP_ETHERTYPE
    assert (arp.hwtype, arp.ptype, arp.hwlen, arp.plen) == (1, 0x0800, 6, 4)
    assert arp.op == 2
    assert arp.hwsrc == MAC_TEXT
    assert arp.psrc == "203.0.113.10"
    assert arp.hwdst == "ff:ff:ff:ff:ff:ff"
    assert arp.pdst == "203.0.113.10"


def test_unsolicited_na_fields() -> None:
    frame = unsolicited_na(MAC, V6.ip)
    pkt = Ether(frame)
    assert pkt.dst == "33:33:00:00:00:01"
    assert pkt.src == MAC_TEXT
    assert pkt.type == IPV6_ETHERTYPE
    ip6 = pkt[IPv6]
    assert ip6.src == "2001:db8:1::10"
    assert ip6.dst == "ff02::1"
    assert ip6.hlim == 255
    assert ip6.nh == 58  # ICMPv6
    na = pkt[ICMPv6ND_NA]
    assert na.type == 136
    assert na.code == 0
    assert na.tgt == "2001:db8:1::10"
    assert (na.R, na.S, na.O) == (0, 0, 1)
    opt = pkt[ICMPv6NDOptDstLLAddr]
    assert opt.type == 2  # target link-layer address
    assert opt.len == 1  # in units of 8 octets
    assert opt.lladdr == MAC_TEXT
    # The checksum scapy wrote must verify: recompute on a copy with the field cleared.
    sent_cksum = na.cksum
    del na.cksum
    assert Ether(bytes(pkt))[ICMPv6ND_NA].cksum == sent_cksum
    assert len(frame) == 14 + 40 + 24 + 8


def test_unsolicited_na_router_flag() -> None:
    frame = unsolicited_na(MAC, V6.ip, router=True)
    pkt = Ether(frame)
    assert pkt.dst == "33:33:00:00:00:01"
    assert pkt[IPv6].hlim == 255
    na = pkt[ICMPv6ND_NA]
    assert (na.R, na.S, na.O) == (1, 0, 1)
    assert na.tgt == "2001:db8:1::10"
    assert pkt[ICMPv6NDOptDstLLAddr].lladdr == MAC_TEXT
    sent_cksum = na.cksum
    del na.cksum
    assert Ether(bytes(pkt))[ICMPv6ND_NA].cksum == sent_cksum
    # Only the flag (and so the checksum) differs from the default frame.
    plain = unsolicited_na(MAC, V6.ip)
    assert Ether(plain)[ICMPv6ND_NA].R == 0
    differ = {i for i, (a, b) in enumerate(zip(frame, plain, strict=True)) if a != b}
    assert 58 in differ and differ <= {56, 57, 58}  # flags byte and the checksum
    assert frame[58] == plain[58] | 0x80  # R is the top bit of the flags


def test_announcement_frames_router_flag() -> None:
    (v6,) = announcement_frames(MAC, V6, router=True)
    assert Ether(v6)[ICMPv6ND_NA].R == 1
    (v6_plain,) = announcement_frames(MAC, V6)
    assert Ether(v6_plain)[ICMPv6ND_NA].R == 0
    # IPv4 has no such flag: the same frames either way.
    assert announcement_frames(MAC, V4, router=True) == announcement_frames(MAC, V4)


def test_announcement_frames_per_family() -> None:
    v4 = announcement_frames(MAC, V4)
    assert [Ether(f)[ARP].op for f in v4] == [1, 2]
    # The prefix does not change what goes on the wire.
    assert announcement_frames(MAC, ipaddress.IPv4Interface("203.0.113.10/24")) == v4
    v6 = announcement_frames(MAC, V6)
    assert len(v6) == 1
    assert Ether(v6[0]).haslayer(ICMPv6ND_NA)


def test_mac_must_be_six_bytes() -> None:
    assert mac_text(MAC) == MAC_TEXT
    with pytest.raises(ValueError, match="6 bytes"):
        announcement_frames(MAC[:5], V4)


# -- RawAnnouncer with in-memory senders ---------------------------------------------------


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock only moves when the test says so: schedules are checked
    exactly, with no real sleeping and nothing for a loaded machine to make flaky."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def time(self) -> float:
        return self.now


async def advance(seconds: float) -> None:
    """Move the virtual clock and let every callback that became due run."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualClockLoop)
    # 1 ms steps, so a timer that schedules another fires it in order, as real time would.
    target = loop.now + seconds
    while True:
        loop.now = min(target, loop.now + 0.001)
        for _ in range(3):  # due timers run, then whatever they scheduled at once
            await asyncio.sleep(0)
        if loop.now >= target:
            return


def in_loop(body: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test body on a fresh virtual-clock loop (no pytest-asyncio dependency)."""

    def test() -> None:
        with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
            runner.run(body())

    test.__doc__ = body.__doc__
    return test


class RecordingSender:
    def __init__(self, interface: str, log: list[tuple[str, bytes]]) -> None:
        self.interface = interface
        self.log = log
        self.generation = 0
        self.fail = False
        self.closed = False

    def current_generation(self) -> int:
        return self.generation

    def send(self, frame: bytes) -> bool:
        if self.fail:
            return False
        self.log.append((self.interface, frame))
        return True

    def close(self) -> None:
        self.closed = True


def gated_lookup() -> tuple[Callable[[str], Awaitable[bytes]], list[str], asyncio.Event]:
    """A MAC lookup that records each call and answers only once `gate` is set."""
    calls: list[str] = []
    gate = asyncio.Event()

    async def lookup(interface: str) -> bytes:
        calls.append(interface)
        await gate.wait()
        return MAC

    return lookup, calls, gate


class Harness:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        schedule: tuple[float, ...],
        lookup: Callable[[str], bytes | Awaitable[bytes]] | None = None,
        **options: Any,
    ) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.senders: dict[str, RecordingSender] = {}
        self.lookups: list[str] = []

        def default_lookup(interface: str) -> bytes:
            self.lookups.append(interface)
            return MAC

        self.announcer = RawAnnouncer(
            loop, lookup or default_lookup, schedule, sender_factory=self._factory, **options
        )

    def _factory(self, interface: str) -> RecordingSender:
        sender = self.senders[interface] = RecordingSender(interface, self.sent)
        return sender


@in_loop
async def test_burst_now_and_repeats_on_schedule() -> None:
    h = Harness(asyncio.get_running_loop(), (0.0, 0.02, 0.04))
    h.announcer.announce("eth0", V4)
    # Offset 0 is sent inside announce(): both ARP forms.
    assert [Ether(f)[ARP].op for _, f in h.sent] == [1, 2]
    assert h.announcer.frames_sent[V4] == 2
    assert V4 in h.announcer.pending
    await advance(0.1)
    assert h.announcer.frames_sent[V4] == 6
    assert V4 not in h.announcer.pending  # schedule finished
    assert h.lookups == ["eth0"]  # MAC looked up once
    h.announcer.announce("eth0", V4)
    assert h.lookups == ["eth0"]  # ... and cached
    h.announcer.close()
    assert h.senders["eth0"].closed


@in_loop
async def test_cancel_stops_repeats() -> None:
    h = Harness(asyncio.get_running_loop(), (0.0, 0.02, 0.04))
    h.announcer.announce("eth0", V6)
    h.announcer.cancel(V6)
    await advance(0.08)
    assert h.announcer.frames_sent[V6] == 1
    assert not h.announcer.pending
    h.announcer.close()


@in_loop
async def test_reannounce_restarts_schedule() -> None:
    h = Harness(asyncio.get_running_loop(), (0.0, 0.05))
    h.announcer.announce("eth0", V4)
    await advance(0.03)
    h.announcer.announce("eth0", V4)  # restart: the first repeat must not also fire
    await advance(0.1)
    # Two sends at offset 0 and one repeat (of the second schedule), two frames each.
    assert h.announcer.frames_sent[V4] == 3 * 2
    h.announcer.close()


@in_loop
async def test_async_lookup_shared_and_cancellable() -> None:
    lookup, calls, gate = gated_lookup()
    h = Harness(asyncio.get_running_loop(), (0.0,), lookup)
    h.announcer.announce("eth0", V4)
    h.announcer.announce("eth0", V6)
    h.announcer.announce("eth0", ipaddress.IPv4Interface("203.0.113.11/32"))
    h.announcer.cancel(ipaddress.IPv4Interface("203.0.113.11/32"))
    assert h.sent == []
    gate.set()
    await advance(0.01)
    assert calls == ["eth0"]  # one lookup for three addresses
    assert h.announcer.frames_sent == {V4: 2, V6: 1}
    h.announcer.close()


@in_loop
async def test_failures_are_counted_not_raised() -> None:
    def lookup(interface: str) -> bytes:
        raise OSError(19, "No such device")

    h = Harness(asyncio.get_running_loop(), (0.0, 0.01), lookup)
    h.announcer.announce("eth9", V4)  # must not raise
    assert h.announcer.lookup_errors == 1
    assert not h.announcer.pending

    h2 = Harness(asyncio.get_running_loop(), (0.0,))
    h2.announcer.announce("eth0", V4)
    h2.senders["eth0"].fail = True
    h2.announcer.announce("eth0", V4)
    assert h2.announcer.send_errors == 2
    assert h2.announcer.frames_sent[V4] == 2
    h.announcer.close()
    h2.announcer.close()


@in_loop
async def test_recreated_interface_gets_fresh_mac() -> None:
    macs = [MAC, bytes.fromhex("02005e0000bb")]

    def lookup(interface: str) -> bytes:
        return macs[0]

    h = Harness(asyncio.get_running_loop(), (0.0, 0.02), lookup)
    h.announcer.announce("eth0", V4)
    macs.pop(0)
    h.senders["eth0"].generation += 1  # the name now denotes a new device
    await advance(0.06)
    sources = [Ether(f).src for _, f in h.sent]
    # Burst 1 at 0 with the old MAC; its repeat notices the new device, looks the MAC up
    # again and restarts the schedule with it; nothing old is sent after the change.
    assert sources[:2] == [MAC_TEXT] * 2
    assert set(sources[2:]) == {"02:00:5e:00:00:bb"}
    assert len(sources) == 6
    h.announcer.close()


@in_loop
async def test_schedule_validation_and_after_close() -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(ValueError):
        RawAnnouncer(loop, lambda _: MAC, ())
    with pytest.raises(ValueError):
        RawAnnouncer(loop, lambda _: MAC, (-1.0,))
    h = Harness(loop, (0.0,))
    h.announcer.close()
    h.announcer.announce("eth0", V4)  # ignored, logged
    assert h.sent == []


@in_loop
async def test_na_router_flag_in_announced_frames() -> None:
    loop = asyncio.get_running_loop()
    for router in (False, True):
        h = Harness(loop, (0.0,), na_router=router)
        h.announcer.announce("eth0", V6)
        (frame,) = [f for _, f in h.sent]
        na = Ether(frame)[ICMPv6ND_NA]
        flags = (na.R, na.S, na.O)
        assert flags == (int(router), 0, 1)
        h.announcer.close()


# -- announce_once ----------------------------------------------------------------------------


@in_loop
async def test_announce_once_sends_one_burst_and_schedules_nothing() -> None:
    h = Harness(asyncio.get_running_loop(), (0.0, 0.02, 0.04))
    h.announcer.announce_once("eth0", V4)
    assert [Ether(f)[ARP].op for _, f in h.sent] == [1, 2]  # the offset-0 frames, at once
    assert h.announcer.frames_sent[V4] == 2
    assert not h.announcer.pending
    await advance(0.1)
    assert h.announcer.frames_sent[V4] == 2  # no repeats
    h.announcer.announce_once("eth0", V4)
    assert h.announcer.frames_sent[V4] == 4
    assert h.lookups == ["eth0"]  # the cached MAC is shared with the schedule path
    h.announcer.close()


@in_loop
async def test_announce_once_leaves_running_schedule_alone() -> None:
    h = Harness(asyncio.get_running_loop(), (0.0, 0.05, 0.1))
    h.announcer.announce("eth0", V4)
    await advance(0.03)
    h.announcer.announce_once("eth0", V4)
    assert h.announcer.frames_sent[V4] == 2 * 2
    assert V4 in h.announcer.pending  # not cancelled
    await advance(0.019)  # t = 0.049: a restarted schedule would have its repeat at 0.08
    assert h.announcer.frames_sent[V4] == 2 * 2
    await advance(0.002)  # t = 0.051: the original repeat at 0.05 fired on time
    assert h.announcer.frames_sent[V4] == 3 * 2
    await advance(0.1)
    assert h.announcer.frames_sent[V4] == 4 * 2  # 0, once, 0.05, 0.1: nothing more
    assert not h.announcer.pending
    h.announcer.close()


@in_loop
async def test_announce_once_waits_for_shared_lookup_and_cancel_stops_it() -> None:
    lookup, calls, gate = gated_lookup()
    h = Harness(asyncio.get_running_loop(), (0.0, 0.05), lookup)
    h.announcer.announce("eth0", V4)
    h.announcer.announce_once("eth0", V6)
    h.announcer.announce_once("eth0", ipaddress.IPv6Interface("2001:db8:1::11/128"))
    h.announcer.cancel(ipaddress.IPv6Interface("2001:db8:1::11/128"))  # released meanwhile
    assert h.sent == []
    gate.set()
    await advance(0.01)
    assert calls == ["eth0"]  # one lookup for the schedule and the one-shots
    assert h.announcer.frames_sent == {V4: 2, V6: 1}
    assert h.announcer.pending == frozenset({V4})  # the one-shot is not a schedule
    await advance(0.1)
    assert h.announcer.frames_sent == {V4: 4, V6: 1}
    h.announcer.close()


@in_loop
async def test_announce_once_follows_recreated_interface_without_restarting() -> None:
    macs = [MAC, bytes.fromhex("02005e0000bb")]
    h = Harness(asyncio.get_running_loop(), (0.0, 0.05), lambda _: macs[0])
    h.announcer.announce("eth0", V4)
    macs.pop(0)
    h.senders["eth0"].generation += 1
    h.announcer.announce_once("eth0", V4)
    sources = [Ether(f).src for _, f in h.sent]
    # The one-shot noticed the new device, looked the MAC up again and sent only that.
    assert sources == [MAC_TEXT] * 2 + ["02:00:5e:00:00:bb"] * 2
    assert V4 in h.announcer.pending  # the claim's schedule was not touched ...
    await advance(0.1)
    # ... and its repeat, sent with the fresh MAC, restarted it (0 and 0.05 again).
    assert [Ether(f).src for _, f in h.sent[4:]] == ["02:00:5e:00:00:bb"] * 4
    h.announcer.close()


@in_loop
async def test_announce_once_failures_counted_and_after_close() -> None:
    def lookup(interface: str) -> bytes:
        raise OSError(19, "No such device")

    h = Harness(asyncio.get_running_loop(), (0.0,), lookup)
    h.announcer.announce_once("eth9", V4)  # must not raise
    assert h.announcer.lookup_errors == 1
    assert h.sent == []
    h.announcer.close()
    h2 = Harness(asyncio.get_running_loop(), (0.0,))
    h2.announcer.close()
    h2.announcer.announce_once("eth0", V4)  # ignored, logged
    assert h2.sent == []


def test_fake_announcer_records() -> None:
    fake = FakeAnnouncer()
    fake.announce("eth0", V4)
    fake.announce("eth0", V4)
    fake.cancel(V4)
    fake.announce("eth1", V6)
    fake.announce_once("eth1", V6)
    fake.announce_once("eth0", V4)
    assert fake.announced(V4) == 2
    assert fake.announced_once(V4) == 1 and fake.announced_once(V6) == 1
    assert ("once", "eth0", V4) in fake.calls
    assert fake.active == {V6: "eth1"}  # a one-shot starts no schedule
    fake.close()
    assert fake.closed and not fake.active
    assert fake.calls[-1] == ("close", None, None)
