"""The notify list (Wackamole's `Notify`): tell chosen routers and hosts directly.

The broadcast announcements (`vipd.arp.frames`) reach every neighbour, but not every
neighbour acts on them. The notify list (`announce.notify`: hosts or netblocks) gets, on
every claim, one frame per target addressed to that target and saying "the VIP is at this
MAC":

* IPv4: an ARP reply (op=2) from (our MAC, VIP) to the target's IP (`pdst` = target), in a
  broadcast Ethernet frame with target hardware address ff:ff:ff:ff:ff:ff: we do not know
  the target's MAC, and the two broadcast fields agree, so switches doing ARP inspection
  with destination-MAC validation pass it.

  How Linux handles it (`arp_process()`): a reply updates an existing neighbour entry for
  its sender IP (the VIP); it creates none unless `arp_accept`. Linux does not check that
  the target IP is its own, so, the frame being broadcast, every Linux neighbour with an
  entry for the VIP applies it, not only the target (seen on the test VM's 6.18). Sender and
  target IP differ, so it is not gratuitous in the `arp_is_garp()` sense and it overrides a
  different cached MAC only outside `locktime` (1 s by default) after the entry's last
  update; being broadcast, it leaves the entry STALE (the next use re-confirms it with a
  unicast probe to the new MAC). The gratuitous request of the broadcast announcement is
  the one that overrides inside `locktime`; the two complement each other.

  Why a directed frame helps: routers and hosts hardened against ARP spoofing commonly
  ignore gratuitous ARP (sender IP == target IP) but still accept a reply addressed to
  their own IP, which is indistinguishable from the answer to a request they made. Such a
  router would otherwise keep sending the VIP's traffic to the dead node's MAC until its
  entry expires (minutes on many routers).

* IPv6: a neighbour advertisement (S=0, O=1, R = `announce.na_router`, TLLA = our MAC) from
  the VIP to the target's unicast address, hop limit 255 (RFC 4861 7.1.2), in an Ethernet
  frame to the target's solicited-node multicast MAC 33:33:ff:xx:xx:xx (RFC 2464, the
  last 3 bytes of the target): every IPv6 node listens on the solicited-node group of each
  of its addresses, so its NIC accepts the frame without our knowing its MAC; the IPv6
  layer then sees its own unicast address (Linux drops it only with the non-default
  `drop_unicast_in_l2_multicast=1`). `ndisc_recv_na()` updates an existing entry for the
  VIP at once (override flag; no `locktime` for IPv6) and leaves it STALE. A node whose
  address merely shares the last 24 bits receives it at Ethernet level and discards it at
  the IP layer.

Targets only count for a VIP of their own family. A netblock means every host address in
it: for IPv4 /30 and shorter the network and broadcast addresses are left out (/31 and /32
are all hosts); for IPv6 the Subnet-Router anycast address (all-zero host part) is left
out for /126 and shorter (Python's `hosts()`), so name routers explicitly. The VIP itself
is never a target, and a host in two listed blocks is told once.

Frames are sent by `Notifier`, throttled by a token bucket shared by all addresses: a /20
is 4094 frames per claimed address, and a cold start claiming hundreds of addresses must
not flood the link or the targets' control planes. Frames are generated when they are sent,
from one scapy-built template per (MAC, IP version) with the VIP and target fields patched
in with struct: building 4,094 frames with scapy takes about 0.9 s (ARP) and 1.2 s (NA) on
the test VM, patching them 3 ms and 10 ms (`tests/unit/test_notify.py` checks that the
patched frames equal scapy-built ones).
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import struct
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from vipd.arp.frames import BROADCAST_MAC, ETH_ZLEN, _scapy, mac_text
from vipd.config import IPInterface

if TYPE_CHECKING:
    from vipd.arp.announcer import FrameSink

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Most notify frames waiting for tokens at once (all addresses together); beyond it new
#: frames are dropped and counted in `Notifier.notify_dropped`. 16 addresses x a /20.
MAX_QUEUED = 65_536
#: The drain timer wakes at most this often (s); tokens accumulate meanwhile, so the rate
#: holds and a high rate costs a few frames per wake-up rather than a wake-up per frame.
MIN_DRAIN_INTERVAL = 0.01

log = structlog.get_logger()


# -- targets ------------------------------------------------------------------------------


def expand_targets(targets: Iterable[IPNetwork], version: int) -> tuple[IPAddress, ...]:
    """Host addresses of the `version` (4 or 6) entries of `targets`, in order, each once."""
    seen: dict[IPAddress, None] = {}
    for net in targets:
        if net.version != version:
            continue
        # /31, /32 (RFC 3021) and /127, /128: every address is a host address.
        hosts = net if net.prefixlen >= net.max_prefixlen - 1 else net.hosts()
        for host in hosts:
            seen[host] = None
    return tuple(seen)


def notify_targets(vip: IPAddress, targets: Iterable[IPNetwork]) -> tuple[IPAddress, ...]:
    """Every address told about `vip`, in the order they are told."""
    return tuple(t for t in expand_targets(targets, vip.version) if t != vip)


# -- frames -------------------------------------------------------------------------------


def solicited_node_mac(target: ipaddress.IPv6Address) -> str:
    """33:33:ff + the last 3 bytes of `target` (RFC 4291 2.7.1 + RFC 2464 7)."""
    return "33:33:ff:" + ":".join(f"{b:02x}" for b in target.packed[13:])


def notify_arp_reply(
    mac: bytes, vip: ipaddress.IPv4Address, target: ipaddress.IPv4Address
) -> bytes:
    """ARP reply (VIP is at `mac`) addressed to `target`, built with scapy."""
    s = _scapy()
    hw = mac_text(mac)
    pkt = s.Ether(dst=BROADCAST_MAC, src=hw) / s.ARP(
        op=2, hwsrc=hw, psrc=str(vip), hwdst=BROADCAST_MAC, pdst=str(target)
    )
    return bytes(pkt).ljust(ETH_ZLEN, b"\x00")


def notify_na(
    mac: bytes,
    vip: ipaddress.IPv6Address,
    target: ipaddress.IPv6Address,
    *,
    router: bool = False,
) -> bytes:
    """Unsolicited NA (VIP is at `mac`) addressed to `target`, built with scapy."""
    s = _scapy()
    hw = mac_text(mac)
    pkt = (
        s.Ether(dst=solicited_node_mac(target), src=hw)
        / s.IPv6(src=str(vip), dst=str(target), hlim=255)
        / s.ICMPv6ND_NA(tgt=str(vip), R=int(router), S=0, O=1)
        / s.ICMPv6NDOptDstLLAddr(lladdr=hw)
    )
    return bytes(pkt)


# Byte offsets in the frames above (Ethernet header 14 bytes).
_ARP_SPA = slice(28, 32)  # sender protocol address
_ARP_TPA = slice(38, 42)  # target protocol address
_ETH_DST_LOW3 = slice(3, 6)
_IP6_SRC = slice(22, 38)
_IP6_DST = slice(38, 54)
_ICMP6 = 54  # start of the ICMPv6 message
_ICMP6_CKSUM = slice(56, 58)
_NA_TGT = slice(62, 78)
_NA_LEN = 32  # NA (24) + target link-layer address option (8)
_ICMPV6 = 58


def _icmpv6_checksum(src: bytes, dst: bytes, message: bytes) -> int:
    """RFC 4443 2.3 over the RFC 8200 8.1 pseudo-header; `message` has a zero checksum."""
    data = src + dst + struct.pack("!I3xB", len(message), _ICMPV6) + message
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class NotifyFrames:
    """Notify frames from one MAC for one IP version: one scapy-built template, then the
    VIP and target fields patched in (equal to `notify_arp_reply` / `notify_na`)."""

    def __init__(self, mac: bytes, version: int, *, router: bool = False) -> None:
        self.version = version
        if version == 4:
            zero4 = ipaddress.IPv4Address(0)
            self._template = notify_arp_reply(mac, zero4, zero4)
        elif version == 6:
            zero6 = ipaddress.IPv6Address(0)
            self._template = notify_na(mac, zero6, zero6, router=router)
            if len(self._template) != _ICMP6 + _NA_LEN:  # pragma: no cover - scapy changed
                raise AssertionError(f"unexpected NA template length {len(self._template)}")
        else:
            raise ValueError(f"IP version must be 4 or 6, not {version!r}")

    def frame(self, vip: IPAddress, target: IPAddress) -> bytes:
        if vip.version != self.version or target.version != self.version:
            raise ValueError(f"{vip} / {target} is not IPv{self.version}")
        buf = bytearray(self._template)
        if self.version == 4:
            buf[_ARP_SPA] = vip.packed
            buf[_ARP_TPA] = target.packed
            return bytes(buf)
        src, dst = vip.packed, target.packed
        buf[_ETH_DST_LOW3] = dst[13:]
        buf[_IP6_SRC] = src
        buf[_IP6_DST] = dst
        buf[_NA_TGT] = src
        buf[_ICMP6_CKSUM] = b"\x00\x00"
        cksum = _icmpv6_checksum(src, dst, bytes(buf[_ICMP6:]))
        buf[_ICMP6_CKSUM] = cksum.to_bytes(2, "big")
        return bytes(buf)


# -- throttled sending ----------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    """The notify frames of one claim still to send."""

    interface: str
    address: IPInterface
    epoch: int  # sender generation `frames`' MAC belongs to
    frames: NotifyFrames
    targets: tuple[IPAddress, ...]  # may include the VIP, which is skipped
    left: int  # frames still to send (after truncation to the queue bound)
    pos: int = 0

    def next_frame(self) -> bytes:
        vip = self.address.ip
        while True:
            target = self.targets[self.pos]
            self.pos += 1
            if target != vip:
                self.left -= 1
                return self.frames.frame(vip, target)


class Notifier:
    """Sends notify frames on claims, at most `rate` frames per second over all addresses.

    A token bucket holds up to `max(rate, 1)` tokens and starts full: the first `rate`
    frames go out inside `notify()`, the rest wait in a queue (bounded by `max_queued`
    frames; beyond it the tail of a claim's targets is dropped and counted) drained by a
    `loop.call_later` timer as tokens refill. The queue is served round-robin by address,
    one frame each, so with a long list every address reaches the first-listed targets (put
    the routers first) before any address reaches the end of a netblock.

    Frames go through the same per-interface `FrameSink` as the announcements
    (`sender_for(interface)`), and before a batch the sender's generation is checked
    against the one the claim's MAC was read in: if the device was replaced or its MAC
    changed, the claim's queued frames are dropped and `on_interface_changed(interface,
    address)` is called (the announcer re-announces, which looks the MAC up again and
    queues fresh notify frames). Nothing raises into the loop.

    Counters: `notify_sent` (frames that left), `notify_dropped` (frames that did not fit
    the queue, or had no sender), `send_errors` (frames the sender failed to send, and
    failures of the sender itself); `queued` (frames waiting now). Frames dropped by
    `cancel()` (a release) or superseded by a new claim of the same address are not
    counted: they were not wanted any more.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        targets: Iterable[IPNetwork],
        *,
        rate: float,
        sender_for: Callable[[str], FrameSink],
        na_router: bool = False,
        max_queued: int = MAX_QUEUED,
        on_interface_changed: Callable[[str, IPInterface], None] | None = None,
    ) -> None:
        if not (isinstance(rate, int | float) and math.isfinite(rate) and rate > 0):
            raise ValueError(f"notify rate must be a positive number of frames/s, not {rate!r}")
        if max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, not {max_queued!r}")
        self._loop = loop
        self.targets: tuple[IPNetwork, ...] = tuple(targets)
        self.rate = float(rate)
        self.capacity = max(self.rate, 1.0)
        self.na_router = na_router
        self.max_queued = max_queued
        self._sender_for = sender_for
        self._on_interface_changed = on_interface_changed
        self.notify_sent = 0
        self.notify_dropped = 0
        self.send_errors = 0
        self.queued = 0
        self._tokens = self.capacity
        self._stamp = loop.time()
        self._expanded: dict[int, tuple[IPAddress, ...]] = {}  # per IP version, on first use
        self._templates: dict[tuple[bytes, int], NotifyFrames] = {}
        self._jobs: deque[_Job] = deque()
        self._by_address: dict[IPInterface, _Job] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._draining = False
        self._dropped_streak = 0  # frames dropped since the queue last ran empty
        self._closed = False

    def notify(self, interface: str, address: IPInterface, mac: bytes, epoch: int) -> None:
        """Queue one frame per target for `address` (replacing frames still queued for it)
        and send as many as the budget allows now. `epoch`: the sender generation `mac`
        was read in."""
        if self._closed or not self.targets:
            return
        try:
            self._drop(address)
            version = address.version
            targets = self._expanded.get(version)
            if targets is None:
                targets = self._expanded[version] = expand_targets(self.targets, version)
            count = len(targets) - (1 if address.ip in targets else 0)
            if count == 0:
                return
            room = max(0, self.max_queued - self.queued)
            if count > room:
                self.notify_dropped += count - room
                if self._dropped_streak == 0:  # one line per episode, not per claim
                    log.warning(
                        "notify_queue_full",
                        address=str(address),
                        dropped=count - room,
                        queued=self.queued,
                        max_queued=self.max_queued,
                    )
                self._dropped_streak += count - room
                count = room
                if count == 0:
                    return
            key = (mac, version)
            frames = self._templates.get(key)
            if frames is None:
                frames = self._templates[key] = NotifyFrames(mac, version, router=self.na_router)
            job = _Job(interface, address, epoch, frames, targets, count)
            self._jobs.append(job)
            self._by_address[address] = job
            self.queued += count
        except Exception as exc:  # never into the loop (e.g. a bad MAC)
            self._failed("notify_failed", exc, address)
            return
        self._drain()

    def cancel(self, address: IPInterface) -> None:
        """Drop the frames still queued for `address` (it is being released)."""
        self._drop(address)
        if not self._jobs:
            self._cancel_timer()

    def close(self) -> None:
        """Drop everything queued and stop the timer; idempotent."""
        self._closed = True
        self._cancel_timer()
        self._jobs.clear()
        self._by_address.clear()
        self.queued = 0

    def queued_for(self, address: IPInterface) -> int:
        job = self._by_address.get(address)
        return job.left if job is not None else 0

    # -- internals ------------------------------------------------------------------------

    def _drop(self, address: IPInterface) -> None:
        job = self._by_address.pop(address, None)
        if job is not None:
            self._jobs.remove(job)
            self.queued -= job.left

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _refill(self) -> None:
        now = self._loop.time()
        elapsed = max(0.0, now - self._stamp)
        self._stamp = now
        self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)

    def _on_timer(self) -> None:
        self._timer = None
        self._drain()

    def _drain(self) -> None:
        if self._draining or self._closed:
            return  # re-entered from a callback below; the outer call finishes the job
        self._draining = True
        stale: list[_Job] = []
        try:
            self._refill()
            senders: dict[str, tuple[FrameSink, int] | None] = {}
            while self._jobs and self._tokens >= 1:
                job = self._jobs[0]
                if job.interface not in senders:
                    senders[job.interface] = self._sender_and_generation(job)
                known = senders[job.interface]
                if known is None or known[1] != job.epoch:
                    if known is None:
                        self.notify_dropped += job.left
                    else:
                        stale.append(job)
                    self._drop(job.address)
                    continue
                frame = job.next_frame()
                self.queued -= 1
                self._tokens -= 1
                self._jobs.popleft()
                if job.left > 0:
                    self._jobs.append(job)  # round-robin: next address's turn
                else:
                    del self._by_address[job.address]
                try:
                    ok = known[0].send(frame)
                except Exception as exc:  # FrameSender never raises; another sink might
                    self._failed("notify_send_failed", exc, job.address)
                    continue
                if ok:
                    self.notify_sent += 1
                else:
                    self.send_errors += 1
        finally:
            self._draining = False
        for job in stale:
            log.info("notify_interface_changed", interface=job.interface, address=str(job.address))
            if self._on_interface_changed is not None:
                try:
                    self._on_interface_changed(job.interface, job.address)
                except Exception as exc:
                    self._failed("notify_reannounce_failed", exc, job.address)
        self._schedule()

    def _sender_and_generation(self, job: _Job) -> tuple[FrameSink, int] | None:
        try:
            sender = self._sender_for(job.interface)
            return sender, sender.current_generation()
        except Exception as exc:  # the job is dropped: nothing to send it with
            self._failed("notify_sender_failed", exc, job.address)
            return None

    def _schedule(self) -> None:
        if not self._jobs or self._closed:
            self._cancel_timer()
            if self._dropped_streak:
                log.warning("notify_queue_drained", dropped=self._dropped_streak)
                self._dropped_streak = 0
            return
        if self._timer is not None:
            return
        delay = max((1.0 - self._tokens) / self.rate, MIN_DRAIN_INTERVAL)
        self._timer = self._loop.call_later(delay, self._on_timer)

    def _failed(self, event: str, exc: Exception, address: IPInterface | None) -> None:
        self.send_errors += 1
        log.warning(
            event,
            address=None if address is None else str(address),
            error=str(exc),
            error_type=type(exc).__name__,
        )
