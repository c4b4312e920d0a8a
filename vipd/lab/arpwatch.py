"""Watch ARP and IPv6 neighbour advertisements arriving on an interface.

Run inside a namespace (needs root for AF_PACKET)::

    python -m vipd.lab.arpwatch --interface eth0 [--duration S]

prints one JSON line per received frame::

    {"t": 1234.56, "kind": "arp-request", "ip": "203.0.113.11", "mac": "aa:..",
     "target_ip": "203.0.113.11", "gratuitous": true, "eth_src": "aa:.."}
    {"t": 1234.57, "kind": "na", "ip": "2001:db8:1::10", "mac": "aa:..", "override": true,
     "solicited": false, "gratuitous": true, "eth_src": "aa:.."}

`ip`/`mac` are what the frame asks receivers to believe: the ARP sender's address pair, or the
NA's target address and target link-layer address. The first line is
`{"t": ..., "kind": "ready"}` once the sockets are bound, so a caller can wait for it before
causing the event it wants to see. `t` is `time.monotonic()` (system-wide CLOCK_MONOTONIC).

The parser (`parse_frame`) is pure and importable; no scapy here on purpose (the lab must not
depend on the code it tests).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
PACKET_OUTGOING = 4
ICMPV6 = 58
ND_NEIGHBOR_ADVERT = 136
ND_OPT_TARGET_LLADDR = 2


def _mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def parse_frame(frame: bytes) -> dict[str, Any] | None:
    """Decode an Ethernet frame carrying ARP or an ICMPv6 NA; None for anything else."""
    if len(frame) < 14:
        return None
    eth_src = _mac(frame[6:12])
    (ethertype,) = struct.unpack("!H", frame[12:14])
    payload = frame[14:]
    if ethertype == ETH_P_8021Q and len(payload) >= 4:
        (ethertype,) = struct.unpack("!H", payload[2:4])
        payload = payload[4:]
    if ethertype == ETH_P_ARP:
        return _parse_arp(payload, eth_src)
    if ethertype == ETH_P_IPV6:
        return _parse_na(payload, eth_src)
    return None


def _parse_arp(p: bytes, eth_src: str) -> dict[str, Any] | None:
    if len(p) < 28:
        return None
    htype, ptype, hlen, plen, oper = struct.unpack("!HHBBH", p[:8])
    if htype != 1 or ptype != 0x0800 or hlen != 6 or plen != 4 or oper not in (1, 2):
        return None
    sha, spa, tpa = p[8:14], p[14:18], p[24:28]
    return {
        "kind": "arp-request" if oper == 1 else "arp-reply",
        "ip": str(ipaddress.IPv4Address(spa)),
        "mac": _mac(sha),
        "target_ip": str(ipaddress.IPv4Address(tpa)),
        # RFC 5227: a gratuitous ARP names the same address as sender and target.
        "gratuitous": spa == tpa,
        "eth_src": eth_src,
    }


def _parse_na(p: bytes, eth_src: str) -> dict[str, Any] | None:
    # Fixed IPv6 header only: an NA carries no extension headers in practice (and the kernel
    # would drop one with a hop limit other than 255 anyway).
    if len(p) < 40 + 24 or p[6] != ICMPV6:
        return None
    icmp = p[40:]
    if icmp[0] != ND_NEIGHBOR_ADVERT or icmp[1] != 0:
        return None
    (flags,) = struct.unpack("!I", icmp[4:8])
    target = ipaddress.IPv6Address(icmp[8:24])
    mac: str | None = None
    opts = icmp[24:]
    while len(opts) >= 8:
        opt_type, opt_len = opts[0], opts[1] * 8
        if opt_len == 0 or opt_len > len(opts):
            break
        if opt_type == ND_OPT_TARGET_LLADDR and opt_len >= 8:
            mac = _mac(opts[2:8])
        opts = opts[opt_len:]
    solicited = bool(flags & 0x40000000)
    return {
        "kind": "na",
        "ip": str(target),
        "mac": mac or eth_src,
        "router": bool(flags & 0x80000000),
        "solicited": solicited,
        "override": bool(flags & 0x20000000),
        "gratuitous": not solicited,
        "eth_src": eth_src,
    }


def open_sockets(interface: str) -> list[socket.socket]:
    """AF_PACKET sockets for ARP and IPv6 on one interface (two protocol-bound sockets keep
    the IPv4 probe traffic out of userspace)."""
    socks = []
    for proto in (ETH_P_ARP, ETH_P_IPV6):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
        s.bind((interface, proto))
        s.setblocking(False)
        socks.append(s)
    return socks


def watch(interface: str, duration: float | None = None, out: Any = sys.stdout) -> None:
    socks = open_sockets(interface)
    try:
        out.write(
            json.dumps({"t": time.monotonic(), "kind": "ready", "interface": interface}) + "\n"
        )
        out.flush()
        stop = None if duration is None else time.monotonic() + duration
        while stop is None or time.monotonic() < stop:
            wait = 1.0 if stop is None else max(0.0, stop - time.monotonic())
            ready, _, _ = select.select(socks, [], [], wait)
            for s in ready:
                while True:
                    try:
                        frame, addr = s.recvfrom(65535)
                    except BlockingIOError:
                        break
                    if addr[2] == PACKET_OUTGOING:
                        continue  # we want what this host received, not what it sent
                    event = parse_frame(frame)
                    if event is not None:
                        out.write(json.dumps({"t": time.monotonic(), **event}) + "\n")
            out.flush()
    finally:
        for s in socks:
            s.close()


def load_events(path: str | Path) -> list[dict[str, Any]]:
    """Parse an arpwatch output file (skips the ready line and a torn last line)."""
    events: list[dict[str, Any]] = []
    for line in Path(path).read_text().splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and ev.get("kind") in ("arp-request", "arp-reply", "na"):
            events.append(ev)
    return events


def announcements(
    events: Iterable[Mapping[str, Any]], ip: str, since: float | None = None, mac: str | None = None
) -> list[Mapping[str, Any]]:
    """Gratuitous ARPs / unsolicited NAs announcing `ip` (optionally from `mac`) after `since`."""
    want = str(ipaddress.ip_address(ip))
    return [
        e
        for e in events
        if e.get("gratuitous")
        and e.get("ip") == want
        and (since is None or e["t"] >= since)
        and (mac is None or e.get("mac") == mac.lower())
    ]


def is_ready(path: str | Path) -> bool:
    try:
        return '"kind": "ready"' in Path(path).read_text()
    except FileNotFoundError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vipd.lab.arpwatch",
        description="print received ARP / IPv6 NA frames as JSON lines",
    )
    p.add_argument("--interface", default="eth0")
    p.add_argument("--duration", type=float, default=None, help="seconds (default: until killed)")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop through `finally`
    try:
        watch(args.interface, args.duration)
    except PermissionError:
        print("arpwatch: AF_PACKET sockets need root (CAP_NET_RAW)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
