"""The conflict listener against a real kernel: AF_PACKET sockets, the BPF filter, VLANs.

Two namespaces joined by a veth pair (per-run prefix "vlt" + 6 hex digits, deleted in the
fixture's teardown even on failure). A `ConflictListener` runs in namespace A as a child
`ip netns exec A python -c ...` (namespaces are per thread; this pytest process stays where
it is) and prints every sighting as a JSON line. A scapy process in namespace B injects
frames on demand. Only documentation addresses: 198.51.100.0/24 for the nodes,
203.0.113.0/24 for the watched addresses, 2001:db8::/32 for IPv6.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.netns.conftest import NETNS_SKIP_REASON, netns_available
from tests.netns.veth import VethPair, ip, start_in, veth_pair

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not netns_available(), reason=NETNS_SKIP_REASON),
    pytest.mark.timeout(60),
]

IF_A, IF_B = "va", "vb"
NODE_A4, NODE_B4 = "198.51.100.1/24", "198.51.100.2/24"
NODE_A6, NODE_B6 = "2001:db8::1/64", "2001:db8::2/64"
WATCHED4 = ["203.0.113.10", "203.0.113.11", "203.0.113.12"]
WATCHED6 = ["2001:db8:1::10", "2001:db8:1::11", "2001:db8:1::12"]
SENTINELS = ("203.0.113.12", "2001:db8:1::12")  # sent last: everything before has been read
OTHER_TLLA = "02:00:5e:00:00:77"  # a claimant named by the NA option, not the frame source


# No DAD (tentative addresses) and nothing else the kernel would send by itself.
NO_DAD = ("net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0")


@pytest.fixture
def pair() -> Iterator[VethPair]:
    addrs_a, addrs_b = (NODE_A4, NODE_A6), (NODE_B4, NODE_B6)
    with veth_pair("vlt", IF_A, IF_B, addrs_a=addrs_a, addrs_b=addrs_b, sysctls=NO_DAD) as p:
        yield p


LISTENER = """
import asyncio, ipaddress, json, signal, sys
import structlog
from vipd.arp.listener import ConflictListener

structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
args = json.loads(sys.argv[1])

def emit(obj):
    print(json.dumps(obj), flush=True)

def seen(s):
    emit({"sighting": [s.interface, str(s.address), s.mac.hex(":"), s.kind]})

async def main():
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    listener = ConflictListener(loop, seen)
    own = bytes.fromhex(args["own_mac"].replace(":", ""))
    listener.watch("vltnosuch0", [ipaddress.ip_address("203.0.113.10")], own)  # must not raise
    listener.watch(args["interface"], [ipaddress.ip_address(a) for a in args["watch"]], own)
    emit({"ready": sorted(map(list, listener.listening))})
    await stop.wait()
    emit({"counters": [listener.frames_seen, listener.conflicts, listener.errors]})
    listener.close()
    listener.close()

asyncio.run(main())
"""

INJECTOR = """
import json, logging, sys
logging.getLogger("scapy").setLevel(logging.ERROR)
from scapy.config import conf
conf.verb = 0
from scapy.layers.inet import UDP
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6NDOptDstLLAddr, IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.sendrecv import sendp

args = json.loads(sys.argv[1])
me, a_mac, iface = args["mac_b"], args["mac_a"], args["iface"]
BC, ZERO = "ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00"

def garp(ip, op=1, mac=me, sender=None):
    return Ether(src=mac, dst=BC) / ARP(
        op=op, hwsrc=mac, psrc=sender or ip, hwdst=ZERO if op == 1 else BC, pdst=ip
    )

def na(target, tlla=me, hlim=255, src=me):
    pkt = Ether(src=src, dst="33:33:00:00:00:01") / IPv6(
        src=target, dst="ff02::1", hlim=hlim
    ) / ICMPv6ND_NA(tgt=target, R=0, S=0, O=1)
    return pkt / ICMPv6NDOptDstLLAddr(lladdr=tlla) if tlla else pkt

BATCHES = {
    "first": [
        garp("203.0.113.10"),  # gratuitous request for a watched address: conflict
        garp("203.0.113.11", op=2),  # gratuitous reply for a watched address: conflict
        garp("203.0.113.99"),  # not watched
        garp("203.0.113.10", sender="0.0.0.0"),  # RFC 5227 probe: claims nothing
        garp("203.0.113.10", mac=a_mac),  # A's own MAC
        Ether(src=me, dst=BC) / Dot1Q(vlan=20) / ARP(  # another VLAN: no conflict here
            op=1, hwsrc=me, psrc="203.0.113.10", hwdst=ZERO, pdst="203.0.113.10"
        ),
        na("2001:db8:1::10", tlla=args["other_tlla"]),  # conflict, claimant from the option
        na("2001:db8:1::11", tlla=None),  # conflict, claimant = Ethernet source
        na("2001:db8:1::10", tlla=a_mac),  # A's own MAC
        na("2001:db8:1::99"),  # not watched
        na("2001:db8:1::10", hlim=64),  # crossed a router: dropped by the BPF filter
        Ether(src=me, dst="33:33:ff:00:00:10")  # solicitation: dropped by the filter
        / IPv6(src="2001:db8::2", dst="ff02::1:ff00:10", hlim=255)
        / ICMPv6ND_NS(tgt="2001:db8:1::10"),
    ]
    # Plain IPv6 multicast nobody answers: the filter must keep all of it from us.
    + [Ether(src=me, dst="33:33:00:00:00:01") / IPv6(src="2001:db8::2", dst="ff02::1")
       / UDP(sport=9, dport=9) for _ in range(30)],
    "after_flap": [garp("203.0.113.10"), na("2001:db8:1::10")],
    "sentinels": [garp("203.0.113.12"), na("2001:db8:1::12")],
}

for line in sys.stdin:
    frames = [f for name in line.split() for f in BATCHES[name]]
    sendp(frames, iface=iface, verbose=0)
    print("sent", len(frames), flush=True)
"""

#: Frames of the batch "first" that reach the listener's sockets (its `frames_seen`): all
#: 6 ARP frames (the VLAN one arrives untagged, as PACKET_OTHERHOST), and the 4 NAs with hop
#: limit 255. Not the NA with hop limit 64, the NS or the 30 UDP datagrams (BPF filter).
FIRST_FRAMES_SEEN = 6 + 4


class Lines:
    """A child's stdout, one JSON object per line, read by a thread (never blocks a test)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.got: list[Any] = []
        self._q: queue.Queue[Any] = queue.Queue()
        assert proc.stdout is not None
        self._thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            try:
                self._q.put(json.loads(line))
            except ValueError:
                self._q.put({"noise": line.rstrip()})
        self._q.put(None)  # EOF

    def wait(self, done: Callable[[list[Any]], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done(self.got):
            left = deadline - time.monotonic()
            try:
                item = self._q.get(timeout=max(left, 0.0))
            except queue.Empty:
                raise AssertionError(f"timed out waiting for {what}; got {self.got}") from None
            if item is None:
                raise AssertionError(f"child exited waiting for {what}; got {self.got}")
            self.got.append(item)

    def rest(self, timeout: float) -> None:
        """Everything up to EOF."""
        self._thread.join(timeout)
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self.got.append(item)


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> None:
    """Signal the child by its pid; SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def sightings(lines: list[Any]) -> list[tuple[str, str, str, str]]:
    return sorted(tuple(x["sighting"]) for x in lines if "sighting" in x)


def test_listener_reports_exactly_the_foreign_claims(pair: VethPair) -> None:
    started = time.monotonic()
    listener = start_in(
        pair.a,
        LISTENER,
        {"interface": IF_A, "watch": WATCHED4 + WATCHED6, "own_mac": pair.mac_a},
    )
    injector = start_in(
        pair.b,
        INJECTOR,
        {"iface": IF_B, "mac_a": pair.mac_a, "mac_b": pair.mac_b, "other_tlla": OTHER_TLLA},
        stdin=True,
    )
    try:
        out, sent = Lines(listener), Lines(injector)
        out.wait(lambda got: any("ready" in x for x in got), 10, "the listener")
        ready = next(x["ready"] for x in out.got if "ready" in x)
        assert ready == [[IF_A, "arp"], [IF_A, "ipv6"]]  # and nothing for the missing one

        def send(batches: str) -> None:
            assert injector.stdin is not None
            injector.stdin.write(batches + "\n")
            injector.stdin.flush()
            n = len(sent.got)
            sent.wait(lambda got: len(got) > n, 15, f"the injector to send {batches}")

        def sentinels_seen(got: list[Any]) -> bool:
            return sum(1 for s in sightings(got) if s[1] in SENTINELS) == 2 * rounds

        rounds = 1
        send("first sentinels")
        out.wait(sentinels_seen, 5, "the sentinel sightings")
        a, b = pair.mac_a, pair.mac_b
        assert a not in {s[2] for s in sightings(out.got)}
        first = [
            (IF_A, "2001:db8:1::10", OTHER_TLLA, "na"),
            (IF_A, "2001:db8:1::11", b, "na"),
            (IF_A, "203.0.113.10", b, "arp-request"),
            (IF_A, "203.0.113.11", b, "arp-reply"),
        ]
        sentinels = [
            (IF_A, "2001:db8:1::12", b, "na"),
            (IF_A, "203.0.113.12", b, "arp-request"),
        ]
        assert sightings(out.got) == sorted(first + sentinels)

        # Link down and up under the listener: its sockets survive (ENETDOWN is reported
        # once and counted) and hear the next claims without a new watch().
        ip("-n", pair.a, "link", "set", IF_A, "down")
        ip("-n", pair.a, "link", "set", IF_A, "up")
        rounds = 2
        send("after_flap sentinels")
        out.wait(sentinels_seen, 5, "the sentinel sightings after the link flap")
        after_flap = [(IF_A, "203.0.113.10", b, "arp-request"), (IF_A, "2001:db8:1::10", b, "na")]
        assert sightings(out.got) == sorted(first + after_flap + 2 * sentinels)

        stop(listener)
        out.rest(5)
        assert listener.returncode == 0, listener.stderr.read() if listener.stderr else ""
        counters = next(x["counters"] for x in out.got if "counters" in x)
        frames_seen, conflicts, errors = counters
        # Exact: anything the BPF filter let through too much would show here.
        assert frames_seen == FIRST_FRAMES_SEEN + 2 + 2 * 2, counters
        assert conflicts == len(first) + len(after_flap) + 2 * len(sentinels)
        # One open failure (the missing interface) and one ENETDOWN per socket.
        assert errors == 1 + 2, counters
        assert sightings(out.got) == sorted(first + after_flap + 2 * sentinels)  # no late ones
    finally:
        if injector.stdin is not None:
            injector.stdin.close()
        stop(injector)
        stop(listener)
    assert time.monotonic() - started < 10
