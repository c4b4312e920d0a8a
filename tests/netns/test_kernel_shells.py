"""The two kernel-facing shells against a real kernel: netlink addresses and raw announcements.

Two namespaces per test, joined by a veth pair, named with a per-run unique prefix and
deleted in the fixture's finalizer even when a test fails (tests/netns/veth.py). The code
under test runs inside namespace A as a child `ip netns exec A python -c ...` (namespaces
are per thread, so switching this pytest process would leak into everything else it does);
the snippets print one JSON line of results. Only documentation addresses are used:
198.51.100.0/24 for node addresses, 203.0.113.0/24 for VIPs, 2001:db8::/32 for IPv6.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fakes import FakeAddressManager
from tests.netns.veth import REPO, VethPair, ip, ip_json, snippet_argv, start_in, veth_pair
from vipd.kernel.addresses import AddressError, InterfaceMissing

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        os.geteuid() != 0,
        reason="needs root: creates network namespaces, veth pairs and raw sockets",
    ),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2 (`ip`)"),
]

IF_A = "va"  # in namespace A, peer of IF_B
IF_B = "vb"  # in namespace B
IF_R = "vr0"  # in A: deleted and recreated by a test
IF_LONG = "vtlonginterface"  # in A: 15 bytes, so `<name>:vip` does not fit a label
NODE_A4, NODE_B4 = "198.51.100.1/24", "198.51.100.2/24"
NODE_A6, NODE_B6 = "2001:db8::1/64", "2001:db8::2/64"
VIP4 = "203.0.113.10/32"
VIP6 = "2001:db8:0:1::10/128"
BOGUS_MAC = "02:00:00:00:00:99"


@pytest.fixture
def pair() -> Iterator[VethPair]:
    addrs_a, addrs_b = (NODE_A4, NODE_A6), (NODE_B4, NODE_B6)
    with veth_pair(f"vt-{os.getpid()}-", IF_A, IF_B, addrs_a=addrs_a, addrs_b=addrs_b) as p:
        ip("-n", p.a, "link", "add", IF_R, "type", "veth", "peer", "name", "vr1")
        ip("-n", p.a, "link", "add", IF_LONG, "type", "veth", "peer", "name", "vtl1")
        for link in (IF_R, "vr1", IF_LONG, "vtl1"):
            ip("-n", p.a, "link", "set", link, "up")
        yield p


def run_in(ns: str, code: str, args: dict[str, Any], timeout: float = 60) -> Any:
    """Run a Python snippet inside `ns`; its last stdout line is JSON."""
    proc = subprocess.run(
        snippet_argv(ns, code, args), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    assert proc.returncode == 0, f"snippet failed in {ns}:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# The same sequence runs against the kernel (in A) and against FakeAddressManager: the fake
# must agree with the kernel on every idempotency rule the daemon relies on.
SEQUENCE: list[tuple[str, str, str | None]] = [
    ("add", IF_A, VIP4),
    ("add", IF_A, VIP4),
    ("add", IF_A, VIP6),
    ("add", IF_A, VIP6),
    ("add", IF_A, "2001:db8:0:1::10/64"),  # IPv6: one address whatever the prefix
    ("add", IF_A, "203.0.113.11/24"),
    ("list", IF_A, None),
    ("remove", IF_A, "203.0.113.11/32"),  # wrong prefix: not that address
    ("remove", IF_A, "203.0.113.11/24"),
    ("remove", IF_A, VIP4),
    ("remove", IF_A, VIP4),
    ("remove", IF_A, VIP6),
    ("remove", IF_A, VIP6),
    ("add", "nosuch0", VIP4),
    ("remove", "nosuch0", VIP4),
    ("list", "nosuch0", None),
    ("mac_address", "nosuch0", None),
    ("add", "x" * 20, VIP4),  # a name too long to exist
]

SEQUENCE_SNIPPET = """
import asyncio, ipaddress, json, sys
from vipd.kernel.addresses import AddressError, NetlinkAddressManager

async def main():
    mgr = NetlinkAddressManager()
    out = []
    for op, iface, addr in json.loads(sys.argv[1])["sequence"]:
        args = (iface,) if addr is None else (iface, ipaddress.ip_interface(addr))
        try:
            res = await getattr(mgr, "list_addresses" if op == "list" else op)(*args)
            if isinstance(res, set):
                res = sorted(str(a) for a in res)
            elif isinstance(res, bytes):
                res = res.hex()
            out.append(["ok", res])
        except AddressError as exc:
            out.append([type(exc).__name__, str(exc)])
    mgr.close()
    print(json.dumps(out))

asyncio.run(main())
"""


async def _run_fake(sequence: list[tuple[str, str, str | None]], mac: bytes) -> list[Any]:
    fake = FakeAddressManager({IF_A: mac})
    # The fake starts empty; give it the node addresses the kernel side has.
    fake.addresses[IF_A] |= {ipaddress.ip_interface(NODE_A4), ipaddress.ip_interface(NODE_A6)}
    out: list[Any] = []
    for op, iface, addr in sequence:
        try:
            if op == "list":
                out.append(["ok", sorted(str(a) for a in await fake.list_addresses(iface))])
            elif op == "mac_address":
                out.append(["ok", (await fake.mac_address(iface)).hex()])
            else:
                assert addr is not None
                method = fake.add if op == "add" else fake.remove
                out.append(["ok", await method(iface, ipaddress.ip_interface(addr))])
        except AddressError as exc:
            out.append([type(exc).__name__, str(exc)])
    return out


def test_add_remove_idempotent_and_fake_agrees(pair: VethPair) -> None:
    real = run_in(pair.a, SEQUENCE_SNIPPET, {"sequence": SEQUENCE})
    assert [r[1] for r in real[:6]] == [True, False, True, False, False, True]
    assert real[6][1] == sorted(
        [NODE_A4, "203.0.113.10/32", "203.0.113.11/24", NODE_A6, "2001:db8:0:1::10/128"]
    )  # no fe80::
    assert [r[1] for r in real[7:13]] == [False, True, True, False, True, False]
    for outcome in real[13:18]:
        assert outcome[0] == "InterfaceMissing", outcome
    assert "'nosuch0'" in real[13][1]
    assert "add 203.0.113.10/32" in real[13][1]

    fake = asyncio.run(_run_fake(SEQUENCE, bytes.fromhex(pair.mac_a.replace(":", ""))))
    # Same outcome class and value everywhere (list order and messages included).
    assert fake == real


ADDRESS_SNIPPET = """
import asyncio, ipaddress, json, subprocess, sys
from vipd.kernel.addresses import AddressError, InterfaceMissing, NetlinkAddressManager

a = json.loads(sys.argv[1])

def ip_j(*args):
    return json.loads(subprocess.run(["ip", "-j", *args], check=True,
                                     capture_output=True, text=True).stdout)

def addr_info(dev, address):
    for link in ip_j("addr", "show", "dev", dev):
        for info in link["addr_info"]:
            if info["local"] == address:
                return info
    return None

async def main():
    mgr = NetlinkAddressManager()
    out = {}
    vip4, vip6 = ipaddress.ip_interface(a["vip4"]), ipaddress.ip_interface(a["vip6"])

    out["add4"] = await mgr.add(a["if_a"], vip4)
    out["label4"] = addr_info(a["if_a"], str(vip4.ip)).get("label")
    out["add6"] = await mgr.add(a["if_a"], vip6)
    out["info6"] = addr_info(a["if_a"], str(vip6.ip))
    out["add_long"] = await mgr.add(a["if_long"], vip4)
    out["label_long"] = addr_info(a["if_long"], str(vip4.ip)).get("label")
    out["mac"] = (await mgr.mac_address(a["if_a"])).hex(":")

    # Interface deleted and recreated under the same name: the cached index is stale.
    out["add_r1"] = await mgr.add(a["if_r"], ipaddress.ip_interface("203.0.113.20/32"))
    subprocess.run(["ip", "link", "del", a["if_r"]], check=True)
    subprocess.run(["ip", "link", "add", a["if_r"], "type", "veth", "peer", "name", "vr1"],
                   check=True)
    out["add_r2"] = await mgr.add(a["if_r"], ipaddress.ip_interface("203.0.113.21/32"))
    out["list_r"] = sorted(str(x) for x in await mgr.list_addresses(a["if_r"]))
    out["remove_r"] = await mgr.remove(a["if_r"], ipaddress.ip_interface("203.0.113.21/32"))

    # Any other kernel refusal is an AddressError naming op, address, interface, errno.
    subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{a['if_r']}.disable_ipv6=1"], check=True)
    try:
        await mgr.add(a["if_r"], vip6)
        out["refused"] = None
    except InterfaceMissing as exc:
        out["refused"] = ["InterfaceMissing", str(exc)]
    except AddressError as exc:
        out["refused"] = [type(exc).__name__, str(exc), exc.errno, exc.op, exc.interface]

    mgr.close()
    try:
        await mgr.add(a["if_a"], vip4)
        out["after_close"] = None
    except AddressError as exc:
        out["after_close"] = str(exc)
    print(json.dumps(out))

asyncio.run(main())
"""


def test_labels_nodad_mac_recreate_and_errors(pair: VethPair) -> None:
    out = run_in(
        pair.a,
        ADDRESS_SNIPPET,
        {"if_a": IF_A, "if_r": IF_R, "if_long": IF_LONG, "vip4": VIP4, "vip6": VIP6},
    )
    assert out["add4"] is True
    assert out["label4"] == f"{IF_A}:vip"
    assert out["add6"] is True
    info6 = out["info6"]
    assert info6["prefixlen"] == 128
    assert info6.get("nodad") is True
    assert "tentative" not in info6  # usable at once
    assert out["add_long"] is True
    assert out["label_long"] == IF_LONG  # label omitted: the kernel uses the device name
    assert out["mac"] == pair.mac_a
    assert out["add_r1"] is True
    assert out["add_r2"] is True  # re-resolved after ENODEV on the stale index
    assert out["list_r"] == ["203.0.113.21/32"]  # the new device has only the new address
    assert out["remove_r"] is True
    kind, message, code, op, iface = out["refused"]
    assert kind == "AddressError"
    assert op == "add" and iface == IF_R and code == 13  # EACCES: IPv6 disabled on the link
    assert f"add {VIP6} on {IF_R}" in message and "EACCES" in message
    assert "closed" in out["after_close"]


SENDER_SNIPPET = """
import json, subprocess, sys
from vipd.arp.sender import FrameSender

a = json.loads(sys.argv[1])
frame = bytes.fromhex("ffffffffffff" "020000000001" "88b5") + b"vipd-test".ljust(46, b"\\0")
out = {}
s = FrameSender(a["if_r"])
out["first"] = [s.send(frame), s.current_generation()]
subprocess.run(["ip", "link", "del", a["if_r"]], check=True)
out["gone"] = [s.send(frame), s.errors]
subprocess.run(["ip", "link", "add", a["if_r"], "type", "veth", "peer", "name", "vr1"], check=True)
subprocess.run(["ip", "link", "set", a["if_r"], "up"], check=True)
out["recreated"] = [s.send(frame), s.current_generation()]
subprocess.run(["ip", "link", "set", a["if_r"], "address", "02:00:5e:00:53:01"], check=True)
out["new_mac"] = [s.send(frame), s.current_generation()]
missing = FrameSender("nosuch0")
out["missing"] = [missing.send(frame), missing.errors]
subprocess.run(["ip", "link", "set", a["if_r"], "down"], check=True)
out["down"] = [s.send(frame), s.errors]
s.close()
missing.close()
print(json.dumps(out))
"""


def test_sender_survives_recreated_and_missing_interfaces(pair: VethPair) -> None:
    out = run_in(pair.a, SENDER_SNIPPET, {"if_r": IF_R})
    assert out["first"] == [True, 0]
    assert out["gone"] == [False, 1]  # ENXIO/ENODEV: logged and counted, not raised
    assert out["recreated"] == [True, 1]  # reopened on the new device; generation moved
    assert out["new_mac"] == [True, 2]  # same device, new MAC: cached frames are stale
    assert out["missing"] == [False, 1]
    assert out["down"] == [False, 2]  # ENETDOWN


ANNOUNCE_SNIPPET = """
import asyncio, ipaddress, json, sys
from vipd.kernel.addresses import NetlinkAddressManager
from vipd.arp.announcer import RawAnnouncer

a = json.loads(sys.argv[1])

async def main():
    mgr = NetlinkAddressManager()
    vip = ipaddress.ip_interface(a["vip"])
    await mgr.add(a["if_a"], vip)
    # The daemon's wiring: the MAC comes from the address manager (an awaitable).
    ann = RawAnnouncer(asyncio.get_running_loop(), mgr.mac_address)
    ann.announce(a["if_a"], vip)
    print("announced", flush=True)
    # Until the bursts at offsets 0 and 0.05 s went out (the MAC lookup may be slow on a
    # loaded machine), at most `linger` seconds: a fixed sleep would count a late repeat
    # as missing. The 1, 2, 5 s repeats are still pending then.
    for _ in range(int(a["linger"] / 0.01)):
        if ann.frames_sent.get(vip, 0) >= a["expect"]:
            break
        await asyncio.sleep(0.01)
    out = {
        "frames_sent": ann.frames_sent.get(vip, 0),
        "send_errors": ann.send_errors,
        "lookup_errors": ann.lookup_errors,
        "pending": [str(x) for x in ann.pending],
    }
    ann.close()
    out["pending_after_close"] = [str(x) for x in ann.pending]
    mgr.close()
    print(json.dumps(out), flush=True)

asyncio.run(main())
"""


def _announce_and_watch(pair: VethPair, vip: str) -> tuple[float, dict[str, Any]]:
    """Announce `vip` from A; seconds until B's entry shows A's MAC, and A's counters."""
    expect = 4 if ipaddress.ip_interface(vip).version == 4 else 2  # two bursts
    dst = str(ipaddress.ip_interface(vip).ip)
    ip("-n", pair.b, "neigh", "replace", dst, "lladdr", BOGUS_MAC, "dev", IF_B, "nud", "stale")
    assert ip_json(pair.b, "neigh", "show", dst, "dev", IF_B)[0]["lladdr"] == BOGUS_MAC
    args = {"if_a": IF_A, "vip": vip, "linger": 0.9, "expect": expect}
    proc = start_in(pair.a, ANNOUNCE_SNIPPET, args)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "announced", proc.stderr.read() if proc.stderr else line
        start = time.monotonic()
        seen = None
        while time.monotonic() - start < 1.0:
            entries = ip_json(pair.b, "neigh", "show", dst, "dev", IF_B)
            seen = entries[0].get("lladdr") if entries else None
            if seen == pair.mac_a:
                break
            time.sleep(0.01)
        elapsed = time.monotonic() - start
        assert seen == pair.mac_a, f"B still maps {dst} to {seen} after {elapsed:.2f}s"
        stdout, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, stderr
        return elapsed, json.loads(stdout.strip().splitlines()[-1])
    finally:
        if proc.poll() is None:
            proc.kill()  # only the child we started, by its handle
            proc.wait()


def test_gratuitous_arp_updates_peer_neighbour_cache(pair: VethPair) -> None:
    elapsed, out = _announce_and_watch(pair, VIP4)
    assert elapsed < 1.0
    # Offsets 0 and 0.05 s fired (before the 1 s repeat): request + reply each time.
    assert out["frames_sent"] == 4
    assert out["send_errors"] == 0 and out["lookup_errors"] == 0
    assert out["pending"] == [VIP4]  # 1, 2, 5 s repeats still scheduled ...
    assert out["pending_after_close"] == []  # ... until close() cancelled them


def test_unsolicited_na_updates_peer_neighbour_cache(pair: VethPair) -> None:
    elapsed, out = _announce_and_watch(pair, VIP6)
    assert elapsed < 1.0
    assert out["frames_sent"] == 2  # one NA at 0 and one at 0.05 s
    assert out["send_errors"] == 0 and out["lookup_errors"] == 0


def test_interface_missing_is_an_address_error() -> None:
    # Callers may catch AddressError for "claim failed" and still single out a missing link.
    exc = InterfaceMissing("eth9", op="add", address=ipaddress.ip_interface(VIP4))
    assert isinstance(exc, AddressError)
    assert str(exc) == f"interface 'eth9' does not exist (add {VIP4})"


MAC_CHANGE_SNIPPET = """
import asyncio, ipaddress, json, subprocess, sys
from vipd.kernel.addresses import NetlinkAddressManager
from vipd.arp.announcer import RawAnnouncer

a = json.loads(sys.argv[1])

async def main():
    mgr = NetlinkAddressManager()
    vip = ipaddress.ip_interface(a["vip"])
    await mgr.add(a["if_a"], vip)
    ann = RawAnnouncer(asyncio.get_running_loop(), mgr.mac_address, schedule=(0.0, 0.2))
    ann.announce(a["if_a"], vip)
    await asyncio.sleep(0.05)
    # A live device gets a new MAC (think bond fail_over_mac=active) between the burst
    # and its repeat: the repeat must carry the new MAC, not the cached frames.
    subprocess.run(["ip", "link", "set", a["if_a"], "address", a["new_mac"]], check=True)
    await asyncio.sleep(0.8)  # the restarted schedule's repeat lands at about 0.45 s
    out = {"frames_sent": ann.frames_sent.get(vip, 0), "lookup_errors": ann.lookup_errors}
    ann.close()
    mgr.close()
    print(json.dumps(out))

asyncio.run(main())
"""


def test_announcer_follows_mac_change(pair: VethPair) -> None:
    new_mac = "02:00:5e:00:53:02"
    dst = str(ipaddress.ip_interface(VIP4).ip)
    ip("-n", pair.b, "neigh", "replace", dst, "lladdr", BOGUS_MAC, "dev", IF_B, "nud", "stale")
    out = run_in(pair.a, MAC_CHANGE_SNIPPET, {"if_a": IF_A, "vip": VIP4, "new_mac": new_mac})
    # Old MAC at 0; at 0.2 s the change is noticed, the MAC looked up again and the
    # schedule restarted with the new one (0 and 0.2 s again): 3 sends of 2 frames.
    assert out == {"frames_sent": 6, "lookup_errors": 0}
    assert ip_json(pair.b, "neigh", "show", dst, "dev", IF_B)[0]["lladdr"] == new_mac


DAD_ADDR = "2001:db8:0:1::77"

DADFAILED_SNIPPET = """
import asyncio, ipaddress, json, subprocess, sys
from structlog.testing import capture_logs
from vipd.kernel.addresses import NetlinkAddressManager

a = json.loads(sys.argv[1])

def infos(dev, address):
    out = subprocess.run(["ip", "-j", "addr", "show", "dev", dev], check=True,
                         capture_output=True, text=True).stdout
    return [i for link in json.loads(out) for i in link["addr_info"] if i["local"] == address]

async def main():
    mgr = NetlinkAddressManager()
    vip = ipaddress.ip_interface(a["vip"])
    out = {"before": infos(a["if_a"], str(vip.ip))}
    out["list"] = sorted(str(x) for x in await mgr.list_addresses(a["if_a"]))
    with capture_logs() as logs:
        out["add"] = await mgr.add(a["if_a"], vip)
    out["logs"] = [
        {k: v for k, v in entry.items() if k in ("event", "interface", "address")}
        for entry in logs
    ]
    out["after"] = infos(a["if_a"], str(vip.ip))
    out["add_again"] = await mgr.add(a["if_a"], vip)
    out["list_after"] = sorted(str(x) for x in await mgr.list_addresses(a["if_a"]))
    mgr.close()
    print(json.dumps(out))

asyncio.run(main())
"""


def test_dadfailed_ipv6_is_missing_and_add_recovers_it(pair: VethPair) -> None:
    # B holds the address (nodad: usable at once); A then configures it the plain way, with
    # DAD on, so A's kernel sees B answer and marks its copy dadfailed.
    subprocess.run(
        ["ip", "netns", "exec", pair.a, "sysctl", "-qw", f"net.ipv6.conf.{IF_A}.accept_dad=1"],
        check=True,
        timeout=20,
    )
    ip("-n", pair.b, "addr", "add", f"{DAD_ADDR}/64", "dev", IF_B, "nodad")
    ip("-n", pair.a, "addr", "add", f"{DAD_ADDR}/64", "dev", IF_A)
    deadline = time.monotonic() + 8
    while "dadfailed" not in ip("-n", pair.a, "-6", "addr", "show", "dev", IF_A):
        assert time.monotonic() < deadline, ip("-n", pair.a, "-6", "addr", "show", "dev", IF_A)
        time.sleep(0.05)

    vip = f"{DAD_ADDR}/128"  # the pool's prefix, not the /64 the dead copy has
    out = run_in(pair.a, DADFAILED_SNIPPET, {"if_a": IF_A, "vip": vip})
    [before] = out["before"]
    assert before.get("dadfailed") is True and before["prefixlen"] == 64
    # Useless to the kernel, so missing for the daemon; the node's own addresses stay.
    assert out["list"] == sorted([NODE_A4, NODE_A6])
    assert out["add"] is True
    [after] = out["after"]  # one copy only: the dead one was removed
    assert after["prefixlen"] == 128
    assert after.get("nodad") is True
    assert "dadfailed" not in after and "tentative" not in after
    assert {"event": "dadfailed_recovered", "interface": IF_A, "address": vip} in out["logs"]
    assert out["add_again"] is False  # usable now: EEXIST is "already so" again
    assert out["list_after"] == sorted([NODE_A4, NODE_A6, vip])

    # The fake follows the same rules.
    async def fake_run() -> list[Any]:
        fake = FakeAddressManager({IF_A: bytes(6)})
        fake.addresses[IF_A] |= {ipaddress.ip_interface(NODE_A4), ipaddress.ip_interface(NODE_A6)}
        fake.mark_dadfailed(IF_A, ipaddress.ip_interface(f"{DAD_ADDR}/64"))
        listed = sorted(str(x) for x in await fake.list_addresses(IF_A))
        added = await fake.add(IF_A, ipaddress.ip_interface(vip))
        again = await fake.add(IF_A, ipaddress.ip_interface(vip))
        after = sorted(str(x) for x in await fake.list_addresses(IF_A))
        return [listed, added, again, after, sorted(str(x) for x in fake.addresses[IF_A])]

    assert asyncio.run(fake_run()) == [
        out["list"],
        True,
        False,
        out["list_after"],
        out["list_after"],
    ]
