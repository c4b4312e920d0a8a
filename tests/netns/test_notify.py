"""The notify list against a real kernel: a router that ignores gratuitous ARP / NA still
learns the VIP's new MAC from the directed frame.

Two namespaces per test, "node" and "rtr", joined by a veth pair and named with a per-run
prefix ("vln" + 6 hex), deleted in the fixture's finalizer even when a test fails. The
router has a neighbour entry for the VIP that points at a dead node's MAC, and an nftables
filter that drops the broadcast announcements (ARP whose target IP is the VIP; NA to
ff02::1), as a router hardened against gratuitous ARP would ignore them; the filter's
counter shows they did arrive. The node runs `RawAnnouncer` with `notify` = the router,
in a child `ip netns exec node python -c ...` stopped by its PID. Only documentation
addresses: 198.51.100.0/24 (nodes), 203.0.113.0/24 (VIP), 2001:db8::/32.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.netns.conftest import NETNS_SKIP_REASON, netns_available
from tests.netns.veth import ip, ip_json, start_in, veth_pair

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not netns_available(), reason=NETNS_SKIP_REASON),
    pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (the router's filter)"),
    pytest.mark.timeout(30),
]

IF_NODE = "vn0"
IF_RTR = "vr0"
NODE4, RTR4 = "198.51.100.1/24", "198.51.100.2/24"
NODE6, RTR6 = "2001:db8::1/64", "2001:db8::2/64"
VIP4 = "203.0.113.10/32"
VIP6 = "2001:db8:0:1::10/128"
OLD_MAC = "02:00:00:00:00:99"  # the dead node the router still believes in
LOCKTIME = 1.0  # net.ipv4.neigh.default.locktime (100 = 1 s): see vipd/arp/notify.py

# A router that ignores gratuitous ARP (target IP == the VIP) and all-nodes NAs.
NFT_RULES = """
table arp vipdtest {
  chain in {
    type filter hook input priority 0; policy accept;
    arp daddr ip 203.0.113.10 counter drop
  }
}
table ip6 vipdtest {
  chain in {
    type filter hook input priority 0; policy accept;
    ip6 daddr ff02::1 icmpv6 type nd-neighbor-advert counter drop
  }
}
"""


@dataclass(frozen=True)
class Link:
    node: str
    rtr: str
    node_mac: str


@pytest.fixture
def link() -> Iterator[Link]:
    with veth_pair(
        "vln",
        IF_NODE,
        IF_RTR,
        names=("node", "rtr"),
        # The VIPs are claimed on the node (what the daemon's AddressManager does first).
        addrs_a=(NODE4, NODE6, VIP4, VIP6),
        addrs_b=(RTR4, RTR6),
    ) as pair:
        nft = subprocess.run(
            ["ip", "netns", "exec", pair.b, "nft", "-f", "-"],
            input=NFT_RULES,
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert nft.returncode == 0, nft.stderr
        yield Link(pair.a, pair.b, pair.mac_a)


def dropped_announcements(ns: str, family: str) -> int:
    """Packets the router's filter dropped (broadcast announcements that did arrive)."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-j", "list", "table", family, "vipdtest"],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    for item in json.loads(out)["nftables"]:
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                return int(expr["counter"]["packets"])
    raise AssertionError(f"no counter in {out}")


def neighbour_mac(ns: str, address: str) -> str | None:
    entries = ip_json(ns, "neigh", "show", address, "dev", IF_RTR)
    return entries[0].get("lladdr") if entries else None


ANNOUNCER_SNIPPET = """
import asyncio, ipaddress, json, sys
from vipd.kernel.addresses import NetlinkAddressManager
from vipd.arp.announcer import RawAnnouncer

a = json.loads(sys.argv[1])

async def main():
    loop = asyncio.get_running_loop()
    mgr = NetlinkAddressManager()
    ann = RawAnnouncer(
        loop,
        mgr.mac_address,  # the daemon's wiring: an awaitable lookup
        schedule=(0.0,),
        notify=[ipaddress.ip_network(t) for t in a["notify"]],
        notify_rate=100.0,
    )
    vip = ipaddress.ip_interface(a["vip"])
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # "go"
    ann.announce(a["if"], vip)
    for _ in range(500):
        if ann.lookup_errors or (
            ann.frames_sent.get(vip, 0) >= 1
            and ann.notify_sent + ann.send_errors >= a["expect_notify"]
        ):
            break
        await asyncio.sleep(0.01)
    counters = ("notify_sent", "notify_dropped", "send_errors", "lookup_errors")
    out = {"frames_sent": ann.frames_sent.get(vip, 0)} | {c: getattr(ann, c) for c in counters}
    print(json.dumps(out), flush=True)
    await asyncio.Event().wait()  # until the test stops us by PID

asyncio.run(main())
"""


def announce_with_notify(link: Link, vip: str, notify: list[str]) -> dict[str, Any]:
    """The router maps the VIP to OLD_MAC; the node claims it with `notify` as its notify
    list. Returns the announcer's counters (once the notify frames left) and the MAC the
    router's entry shows then (polled for up to 2 s)."""
    dst = str(ipaddress.ip_interface(vip).ip)
    ip("-n", link.rtr, "neigh", "replace", dst, "lladdr", OLD_MAC, "dev", IF_RTR, "nud", "stale")
    replaced = time.monotonic()
    args = {"if": IF_NODE, "vip": vip, "notify": notify, "expect_notify": len(notify)}
    proc = start_in(link.node, ANNOUNCER_SNIPPET, args, stdin=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else line
        # A directed reply is not gratuitous: Linux applies it only outside `locktime`
        # after the entry's last update, which was our `neigh replace`. A real router's
        # entry for a failed node is that old; make ours so too.
        time.sleep(max(0.0, replaced + LOCKTIME + 0.2 - time.monotonic()))
        assert neighbour_mac(link.rtr, dst) == OLD_MAC  # nothing moved it yet
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else "announcer exited"
        out: dict[str, Any] = json.loads(line)
        deadline = time.monotonic() + 2.0
        seen = neighbour_mac(link.rtr, dst)
        while seen != link.node_mac and time.monotonic() < deadline:
            time.sleep(0.02)
            seen = neighbour_mac(link.rtr, dst)
        out["router_sees"] = seen
        return out
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)  # only the child we started, by its PID
        proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_router_ignoring_gratuitous_arp_learns_from_directed_reply(link: Link) -> None:
    started = time.monotonic()
    out = announce_with_notify(link, VIP4, ["198.51.100.2/32"])
    assert out["router_sees"] == link.node_mac
    assert out["frames_sent"] == 2  # the broadcast request + reply ...
    assert dropped_announcements(link.rtr, "arp") == 2  # ... reached the router, ignored
    assert out["notify_sent"] == 1  # the directed reply is what moved the entry
    assert (out["notify_dropped"], out["send_errors"], out["lookup_errors"]) == (0, 0, 0)
    assert time.monotonic() - started < 15


def test_router_ignoring_all_nodes_na_learns_from_directed_na(link: Link) -> None:
    started = time.monotonic()
    out = announce_with_notify(link, VIP6, ["2001:db8::2/128"])
    assert out["router_sees"] == link.node_mac
    assert out["frames_sent"] == 1  # the all-nodes NA ...
    assert dropped_announcements(link.rtr, "ip6") == 1  # ... reached the router, ignored
    assert out["notify_sent"] == 1
    assert (out["notify_dropped"], out["send_errors"], out["lookup_errors"]) == (0, 0, 0)
    assert time.monotonic() - started < 15


@pytest.mark.parametrize(("vip", "family"), [(VIP4, "arp"), (VIP6, "ip6")])
def test_control_without_notify_the_router_keeps_the_old_mac(
    link: Link, vip: str, family: str
) -> None:
    """The filter really makes the router deaf to the broadcast announcements: what moves
    its entry in the tests above is the notify frame."""
    out = announce_with_notify(link, vip, [])
    assert out["frames_sent"] >= 1 and out["notify_sent"] == 0
    assert dropped_announcements(link.rtr, family) == out["frames_sent"]
    assert out["router_sees"] == OLD_MAC
