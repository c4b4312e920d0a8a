"""ICMP echo prober: what a client probing every few milliseconds sees during a failover.

Run inside the client namespace (needs root for raw sockets)::

    python -m vipd.lab.probe --targets 203.0.113.11,2001:db8:1::10 --interval 0.01 --duration 30

Every `interval` one echo request goes to every target. Each target has its own ICMP id
(and a running sequence number), so replies are matched to the exact request even when
several targets answer from the same machine. One JSON line per request goes to stdout::

    {"t": 1234.5678, "target": "203.0.113.11", "seq": 7, "ok": true, "rtt": 0.00021}
    {"t": 1234.5878, "target": "203.0.113.11", "seq": 9, "ok": false, "error": "timeout"}

`t` is the request's send time on the system-wide CLOCK_MONOTONIC (`time.monotonic()`), so
other processes on the machine can compare it with their own timestamps.

`outage()` turns those records into the number a user cares about: the longest stretch
without a successful probe inside a time window.
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0
ICMP6_ECHO_REQUEST = 128
ICMP6_ECHO_REPLY = 129
SO_SNDBUFFORCE = 32  # linux/asm-generic/socket.h; not exported by the socket module
PAYLOAD = b"vipd-lab-probe\0\0"  # 16 bytes: identifies our traffic in a capture


def checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def echo_request(ident: int, seq: int, v6: bool) -> bytes:
    if v6:
        # The kernel fills in the ICMPv6 checksum on raw IPPROTO_ICMPV6 sockets (it covers a
        # pseudo-header we do not see).
        return struct.pack("!BBHHH", ICMP6_ECHO_REQUEST, 0, 0, ident, seq) + PAYLOAD
    header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    csum = checksum(header + PAYLOAD)
    return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, csum, ident, seq) + PAYLOAD


def parse_echo_reply(packet: bytes, v6: bool) -> tuple[int, int] | None:
    """(ident, seq) of an echo reply, or None for any other packet.

    IPv4 raw sockets deliver the IP header too; IPv6 raw sockets deliver only the ICMPv6 part.
    """
    if not v6:
        if len(packet) < 20:
            return None
        packet = packet[(packet[0] & 0x0F) * 4 :]
    if len(packet) < 8:
        return None
    kind, code, _csum, ident, seq = struct.unpack("!BBHHH", packet[:8])
    if kind != (ICMP6_ECHO_REPLY if v6 else ICMP_ECHO_REPLY) or code != 0:
        return None
    return ident, seq


@dataclass
class _Target:
    address: str
    v6: bool
    ident: int
    seq: int = 0


class Prober:
    """Sends echo requests to every target each interval and reports each one's fate."""

    def __init__(
        self,
        targets: Sequence[str],
        interval: float = 0.01,
        timeout: float = 1.0,
        out: TextIO = sys.stdout,
    ) -> None:
        if not targets:
            raise ValueError("no targets")
        base = os.getpid() & 0xFFFF
        self.targets: list[_Target] = []
        for i, t in enumerate(targets):
            addr = ipaddress.ip_address(t)
            # One id per target: a reply is matched by (id, seq) and its source address.
            self.targets.append(_Target(str(addr), addr.version == 6, (base + i) & 0xFFFF))
        self.interval = interval
        self.timeout = timeout
        self.out = out
        self.by_ident = {(t.v6, t.ident): t for t in self.targets}
        self.pending: dict[tuple[bool, int, int], float] = {}  # (v6, id, seq) -> send time
        self.stopping = False  # set by SIGTERM: stop sending, settle what is in flight
        self.sock4 = self.sock6 = None
        if any(not t.v6 for t in self.targets):
            self.sock4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        if any(t.v6 for t in self.targets):
            self.sock6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        for s in (self.sock4, self.sock6):
            if s is not None:
                s.setblocking(False)
                # A burst of replies must not be dropped while we are busy writing lines.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                # Requests to a target whose neighbour entry is unresolved wait in the kernel's
                # neighbour queue and are charged to this socket; with the default send buffer
                # an address without an owner would make sends to every other target fail
                # with ENOBUFS. Root may exceed wmem_max (SO_SNDBUFFORCE).
                try:
                    s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 16 << 20)
                except OSError:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 20)

    def close(self) -> None:
        for s in (self.sock4, self.sock6):
            if s is not None:
                s.close()

    def _emit(self, record: dict[str, Any]) -> None:
        self.out.write(json.dumps(record, separators=(",", ":")) + "\n")

    def _send_all(self, now: float) -> None:
        for t in self.targets:
            t.seq = (t.seq + 1) & 0xFFFF
            sock = self.sock6 if t.v6 else self.sock4
            assert sock is not None
            sent = time.monotonic()
            try:
                sock.sendto(echo_request(t.ident, t.seq, t.v6), (t.address, 0))
            except OSError as e:
                # e.g. EHOSTUNREACH after failed neighbour resolution: a lost probe, not a crash.
                self._emit(
                    {
                        "t": sent,
                        "target": t.address,
                        "seq": t.seq,
                        "ok": False,
                        "error": e.strerror or str(e),
                    }
                )
                continue
            self.pending[(t.v6, t.ident, t.seq)] = sent

    def _receive(self, sock: socket.socket, v6: bool) -> None:
        while True:
            try:
                packet, addr = sock.recvfrom(2048)
            except BlockingIOError:
                return
            now = time.monotonic()
            parsed = parse_echo_reply(packet, v6)
            if parsed is None:
                continue
            target = self.by_ident.get((v6, parsed[0]))
            if target is None or ipaddress.ip_address(addr[0]) != ipaddress.ip_address(
                target.address
            ):
                continue
            sent = self.pending.pop((v6, parsed[0], parsed[1]), None)
            if sent is None:
                continue  # a duplicate, or a reply after we declared the request lost
            self._emit(
                {
                    "t": sent,
                    "target": target.address,
                    "seq": parsed[1],
                    "ok": True,
                    "rtt": round(now - sent, 6),
                }
            )

    def _expire(self, now: float) -> None:
        expired = [k for k, sent in self.pending.items() if now - sent > self.timeout]
        for key in expired:
            sent = self.pending.pop(key)
            target = self.by_ident[(key[0], key[1])]
            self._emit(
                {
                    "t": sent,
                    "target": target.address,
                    "seq": key[2],
                    "ok": False,
                    "error": "timeout",
                }
            )

    def run(self, duration: float | None = None) -> None:
        """Probe until `duration` elapses or `stopping` is set, then settle every request still
        in flight (reply or timeout), so every probe sent is reported exactly once."""
        start = time.monotonic()
        stop = None if duration is None else start + duration
        next_send = start
        socks = [s for s in (self.sock4, self.sock6) if s is not None]
        while True:
            now = time.monotonic()
            sending = not self.stopping and (stop is None or now < stop)
            if not sending and not self.pending:
                break
            if sending and now >= next_send:
                self._send_all(now)
                # Stay on the grid; if we fell behind, skip ticks instead of bursting.
                next_send += self.interval
                if next_send <= now:
                    next_send = now + self.interval
            self._expire(now)
            self.out.flush()
            # After the last round, keep reading (and expiring) until every request is settled.
            deadline = next_send if sending else now + 0.05
            ready, _, _ = select.select(socks, [], [], max(0.0, deadline - time.monotonic()))
            for s in ready:
                self._receive(s, s is self.sock6)
        self.out.flush()


# --- analysis -----------------------------------------------------------------------------


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Parse a prober's output file, ignoring a torn last line from a still-running prober."""
    records: list[dict[str, Any]] = []
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "target" in rec:
            records.append(rec)
    return records


def _window(
    records: Iterable[Mapping[str, Any]], target: str, start: float | None, end: float | None
) -> list[Mapping[str, Any]]:
    want = str(ipaddress.ip_address(target))
    return [
        r
        for r in records
        if r.get("target") == want
        and (start is None or r["t"] >= start)
        and (end is None or r["t"] <= end)
    ]


def outage(
    records: Iterable[Mapping[str, Any]],
    target: str,
    start: float | None = None,
    end: float | None = None,
) -> float:
    """Longest time (s) without a successful probe to `target` inside [start, end].

    Measured between the send times of consecutive successful probes; when the window is
    given, its edges count too (a target that never answers again has an outage up to `end`).
    With no loss the result is about one probe interval, which is the resolution.
    """
    ok_times = sorted(r["t"] for r in _window(records, target, start, end) if r.get("ok"))
    if not ok_times:
        if start is not None and end is not None:
            return end - start
        return float("inf")
    points = ([start] if start is not None else []) + ok_times + ([end] if end is not None else [])
    return max(b - a for a, b in itertools.pairwise(points)) if len(points) > 1 else 0.0


def lost(
    records: Iterable[Mapping[str, Any]],
    target: str,
    start: float | None = None,
    end: float | None = None,
) -> int:
    """How many probes to `target` sent inside [start, end] got no reply."""
    return sum(1 for r in _window(records, target, start, end) if not r.get("ok"))


def last_success(records: Iterable[Mapping[str, Any]], target: str) -> float | None:
    times = [r["t"] for r in _window(records, target, None, None) if r.get("ok")]
    return max(times) if times else None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vipd.lab.probe", description=__doc__.split("\n")[0])
    p.add_argument("--targets", required=True, help="comma-separated IPv4/IPv6 addresses")
    p.add_argument("--interval", type=float, default=0.01, help="seconds between rounds")
    p.add_argument("--duration", type=float, default=None, help="seconds (default: until killed)")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds before a probe is lost")
    args = p.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    try:
        prober = Prober(targets, interval=args.interval, timeout=args.timeout)
    except PermissionError:
        print("probe: raw ICMP sockets need root (CAP_NET_RAW)", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"probe: {e}", file=sys.stderr)
        return 2

    def stop(signum: int, frame: object) -> None:
        prober.stopping = True

    # SIGTERM is how the lab stops us. A lost probe is only known after `timeout`, so finish
    # the requests in flight first: otherwise a loss just before the stop would go unreported.
    signal.signal(signal.SIGTERM, stop)
    try:
        prober.run(args.duration)
    except KeyboardInterrupt:
        pass
    finally:
        prober.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
