"""Announcement frames, built with scapy as raw Ethernet bytes.

IPv4 gets two gratuitous ARPs because receivers disagree on which form they honour:

* a broadcast request (op=1, sender = target = VIP, target MAC 00:..:00). Linux treats it
  as gratuitous (`arp_is_garp()`) and overrides an existing neighbour entry at once, even
  inside the 1 s `locktime` after the entry's last update;
* a broadcast reply (op=2, sender = target = VIP, target MAC ff:..:ff) for stacks and
  switches that only learn from replies. Linux counts a reply as gratuitous only when its
  target MAC equals the sender MAC, so it applies this one only outside `locktime`; the
  broadcast target MAC keeps it valid for switches doing ARP inspection with dst-mac
  validation (target MAC must match the Ethernet destination).

IPv6 gets one unsolicited neighbour advertisement to all-nodes with the override flag.
Linux applies it to an existing entry only (it creates none unless `accept_untracked_na`).
Its router flag (`router=True`, config `announce.na_router`) must tell the truth: a receiver
that has the address in its default-router list and sees R=0 removes it from that list
(RFC 4861 7.2.5), so a node that routes for the VIP must set it and one that does not must not.

scapy is imported once, with its import-time warnings (routes, interfaces) silenced: by the
daemon at start (`preload`, so the first failover claim does not wait for it), and `vipctl`,
which never imports this package, never sees it.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from typing import Any, NamedTuple

from vipd.config import IPInterface

BROADCAST_MAC = "ff:ff:ff:ff:ff:ff"
ZERO_MAC = "00:00:00:00:00:00"
ALL_NODES_MAC = "33:33:00:00:00:01"  # RFC 2464 mapping of ff02::1
ALL_NODES = "ff02::1"
ETH_ZLEN = 60  # minimum Ethernet frame without FCS; ARP frames are padded to it


class _Scapy(NamedTuple):
    Ether: Any
    ARP: Any
    IPv6: Any
    ICMPv6ND_NA: Any
    ICMPv6NDOptDstLLAddr: Any


@functools.cache
def _scapy() -> _Scapy:
    # Must precede the import: scapy logs route/interface warnings while importing.
    logging.getLogger("scapy").setLevel(logging.ERROR)
    from scapy.config import conf

    conf.verb = 0
    from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6
    from scapy.layers.l2 import ARP, Ether

    return _Scapy(Ether, ARP, IPv6, ICMPv6ND_NA, ICMPv6NDOptDstLLAddr)


def preload() -> None:
    """Import scapy now: the daemon calls this at start, so the first claim of a failover
    does not stall the event loop for the import (~120 ms)."""
    _scapy()


def mac_text(mac: bytes) -> str:
    """b'\\x02\\x00...' -> '02:00:...'; rejects anything but 6 bytes."""
    if len(mac) != 6:
        raise ValueError(f"hardware address must be 6 bytes, got {len(mac)}: {mac.hex()}")
    return ":".join(f"{b:02x}" for b in mac)


def _pad(frame: bytes) -> bytes:
    return frame.ljust(ETH_ZLEN, b"\x00")


def garp_request(mac: bytes, ip: ipaddress.IPv4Address) -> bytes:
    s = _scapy()
    hw = mac_text(mac)
    pkt = s.Ether(dst=BROADCAST_MAC, src=hw) / s.ARP(
        op=1, hwsrc=hw, psrc=str(ip), hwdst=ZERO_MAC, pdst=str(ip)
    )
    return _pad(bytes(pkt))


def garp_reply(mac: bytes, ip: ipaddress.IPv4Address) -> bytes:
    s = _scapy()
    hw = mac_text(mac)
    pkt = s.Ether(dst=BROADCAST_MAC, src=hw) / s.ARP(
        op=2, hwsrc=hw, psrc=str(ip), hwdst=BROADCAST_MAC, pdst=str(ip)
    )
    return _pad(bytes(pkt))


def unsolicited_na(mac: bytes, ip: ipaddress.IPv6Address, *, router: bool = False) -> bytes:
    """Unsolicited NA for `ip` to all-nodes: S=0, O=1, R=`router`, TLLA = `mac`."""
    s = _scapy()
    hw = mac_text(mac)
    # hlim 255 is mandatory: receivers drop ND messages that crossed a router (RFC 4861 7.1.2).
    pkt = (
        s.Ether(dst=ALL_NODES_MAC, src=hw)
        / s.IPv6(src=str(ip), dst=ALL_NODES, hlim=255)
        / s.ICMPv6ND_NA(tgt=str(ip), R=int(router), S=0, O=1)
        / s.ICMPv6NDOptDstLLAddr(lladdr=hw)
    )
    return bytes(pkt)


def announcement_frames(
    mac: bytes, address: IPInterface, *, router: bool = False
) -> tuple[bytes, ...]:
    """Every frame one announcement of `address` sends (the prefix length is irrelevant).

    `router` is the NA router flag; it does not apply to IPv4.
    """
    if isinstance(address, ipaddress.IPv4Interface):
        return (garp_request(mac, address.ip), garp_reply(mac, address.ip))
    return (unsolicited_na(mac, address.ip, router=router),)
