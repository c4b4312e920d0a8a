"""The lab's own instruments, checked without vipd: if these lie, every failover test lies.

The pure parts (frame parser, outage arithmetic, checksum) run anywhere; the rest builds a
lab, moves an address by hand and sends the gratuitous ARP / unsolicited NA itself.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import socket
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from vipd.lab.arpwatch import announcements, load_events, parse_frame
from vipd.lab.cluster import Background, wait_for
from vipd.lab.probe import checksum, echo_request, last_success, load_records, lost, outage
from vipd.lab.topology import (
    CLIENT_IP4,
    LOSS_TABLE,
    MULTICAST_GROUP,
    Lab,
    ip_json,
    list_namespaces,
    netns_exec,
    nft_binary,
    run,
)

MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")
BROADCAST = b"\xff" * 6


def arp_frame(oper: int, sha: bytes, spa: str, tpa: str, dst: bytes = BROADCAST) -> bytes:
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, oper) + sha + socket.inet_aton(spa)
    body += b"\0" * 6 + socket.inet_aton(tpa)
    return dst + sha + struct.pack("!H", 0x0806) + body


def na_frame(mac: bytes, src: str, target: str, flags: int, with_option: bool = True) -> bytes:
    """An unsolicited neighbour advertisement to all-nodes, with a valid ICMPv6 checksum."""
    dst = "ff02::1"
    option = struct.pack("!BB", 2, 1) + mac if with_option else b""
    icmp = struct.pack("!BBHI", 136, 0, 0, flags) + ipaddress.IPv6Address(target).packed + option
    pseudo = (
        ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + struct.pack("!I3xB", len(icmp), 58)
    )
    icmp = icmp[:2] + struct.pack("!H", checksum(pseudo + icmp)) + icmp[4:]
    ip6 = struct.pack("!IHBB", 6 << 28, len(icmp), 58, 255)
    ip6 += ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
    return bytes.fromhex("333300000001") + mac + struct.pack("!H", 0x86DD) + ip6 + icmp


# --- pure ---------------------------------------------------------------------------------


def test_parse_gratuitous_arp_request_and_reply() -> None:
    req = parse_frame(arp_frame(1, MAC_A, "203.0.113.11", "203.0.113.11"))
    assert req is not None
    assert (req["kind"], req["ip"], req["mac"], req["gratuitous"]) == (
        "arp-request",
        "203.0.113.11",
        "02:00:00:00:00:01",
        True,
    )
    rep = parse_frame(arp_frame(2, MAC_B, "203.0.113.12", "198.51.100.100", dst=MAC_A))
    assert rep is not None
    assert (rep["kind"], rep["ip"], rep["target_ip"], rep["gratuitous"]) == (
        "arp-reply",
        "203.0.113.12",
        "198.51.100.100",
        False,
    )
    vlan = arp_frame(1, MAC_A, "203.0.113.11", "203.0.113.11")
    vlan = vlan[:12] + struct.pack("!HH", 0x8100, 5) + vlan[12:]
    assert parse_frame(vlan) == req


def test_parse_unsolicited_na() -> None:
    na = parse_frame(na_frame(MAC_B, "fe80::2", "2001:db8:1::17", 0x20000000))
    assert na is not None
    assert (na["kind"], na["ip"], na["mac"], na["override"], na["gratuitous"]) == (
        "na",
        "2001:db8:1::17",
        "02:00:00:00:00:02",
        True,
        True,
    )
    solicited = parse_frame(na_frame(MAC_B, "fe80::2", "2001:db8:1::17", 0x60000000, False))
    assert solicited is not None and not solicited["gratuitous"]
    assert solicited["mac"] == "02:00:00:00:00:02"  # no option: the Ethernet source


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\0" * 13,
        arp_frame(1, MAC_A, "203.0.113.11", "203.0.113.11")[:30],  # truncated ARP
        arp_frame(3, MAC_A, "203.0.113.11", "203.0.113.11"),  # RARP opcode
        BROADCAST + MAC_A + b"\x08\x00" + b"\x45" + b"\0" * 40,  # IPv4
        na_frame(MAC_B, "fe80::2", "2001:db8::1", 0)[:70],  # truncated NA
    ],
    ids=["empty", "short", "truncated-arp", "rarp-opcode", "ipv4", "truncated-na"],
)
def test_parse_ignores_everything_else(frame: bytes) -> None:
    assert parse_frame(frame) is None


def test_echo_request_checksum_verifies() -> None:
    packet = echo_request(0x1234, 7, v6=False)
    assert checksum(packet) == 0  # a correct checksum makes the whole message sum to zero
    assert struct.unpack("!BBHHH", packet[:8])[3:] == (0x1234, 7)


def _records(
    target: str, times: Sequence[float], failed: Sequence[float] = ()
) -> list[dict[str, object]]:
    recs: list[dict[str, object]] = [{"t": t, "target": target, "ok": True} for t in times]
    recs += [{"t": t, "target": target, "ok": False} for t in failed]
    return recs


def test_outage_is_longest_gap_between_successes() -> None:
    ok = [i * 0.01 for i in range(100)] + [1.5 + i * 0.01 for i in range(50)]
    failed = [1.0 + i * 0.01 for i in range(50)]
    recs = _records("203.0.113.11", ok, failed) + _records("203.0.113.12", [0.5])
    assert outage(recs, "203.0.113.11") == pytest.approx(1.5 - 0.99)
    assert lost(recs, "203.0.113.11") == 50
    assert lost(recs, "203.0.113.11", start=1.2) == 30
    # Inside a window without the gap: just the probe interval.
    assert outage(recs, "203.0.113.11", 0.2, 0.8) == pytest.approx(0.01, abs=1e-9)
    # A target that never answers again has an outage to the end of the window.
    assert outage(recs, "203.0.113.12", 0.0, 2.0) == pytest.approx(1.5)
    assert outage(recs, "203.0.113.13", 0.0, 2.0) == pytest.approx(2.0)
    assert last_success(recs, "203.0.113.11") == pytest.approx(1.99)


# --- real kernel --------------------------------------------------------------------------


@pytest.fixture
def bare_lab(run_prefix: str) -> Iterator[Lab]:
    with Lab(nodes=2, prefix=f"{run_prefix}t1") as lab:
        yield lab
    assert not [ns for ns in list_namespaces() if ns.startswith(lab.prefix + "-")]


def _helper(lab: Lab, tmp: Path, name: str, argv: list[str]) -> Background:
    path = tmp / f"{name}.jsonl"
    with open(path, "wb") as out:
        proc = lab.popen("client", [sys.executable, *argv], stdout=out)
    return Background(name, proc, path)


@pytest.mark.netns
def test_topology_respects_the_network_rules(bare_lab: Lab) -> None:
    lab = bare_lab
    allowed = [
        ipaddress.ip_network(n)
        for n in (
            "198.51.100.0/24",
            "203.0.113.0/24",
            "2001:db8::/32",
            "fe80::/64",
            "ff00::/8",
            "224.0.0.0/4",
        )
    ]
    for ns in lab.namespaces:
        assert ns.startswith(lab.prefix + "-")
        for link in ip_json(ns, ["link", "show"]):
            assert link["ifname"] in ("lo", "eth0") or link["ifname"].startswith(lab.prefix)
        for family in ("-4", "-6"):
            for route in ip_json(ns, [family, "route", "show", "table", "all"]):
                dst = route["dst"]
                assert dst != "default", (ns, route)
                if route.get("type") in (
                    "local",
                    "broadcast",
                    "multicast",
                    "anycast",
                ) or dst.startswith(("127.", "::1")):
                    continue
                net = ipaddress.ip_network(dst, strict=False)
                inside = [
                    a for a in allowed if net.network_address in a and net.broadcast_address in a
                ]
                assert inside, (
                    ns,
                    route,
                )
    # Nothing of ours in the root namespace.
    root = json.loads(run(["ip", "-j", "link", "show"]).stdout)
    assert not [link["ifname"] for link in root if link["ifname"].startswith(lab.prefix)]
    details = ip_json(lab.switch_ns, ["-d", "link", "show", "dev", lab.bridge])
    assert details[0]["linkinfo"]["info_data"]["mcast_snooping"] == 0


@pytest.mark.netns
def test_instruments_see_a_hand_made_failover(bare_lab: Lab, tmp_path: Path) -> None:
    """Move 203.0.113.11 and 2001:db8:1::17 from n1 to n2 by hand, announce them, and check
    that arpwatch, the client's neighbour table and the prober all see it."""
    lab = bare_lab
    v4, v6 = "203.0.113.11", "2001:db8:1::17"
    lab.exec("n1", ["ip", "addr", "add", f"{v4}/32", "dev", "eth0"])
    lab.exec("n1", ["ip", "addr", "add", f"{v6}/128", "dev", "eth0", "nodad"])
    arp = _helper(lab, tmp_path, "arp", ["-m", "vipd.lab.arpwatch"])
    probe = _helper(
        lab,
        tmp_path,
        "probe",
        ["-m", "vipd.lab.probe", "--targets", f"{v4},{v6}", "--interval", "0.01"],
    )
    try:
        wait_for(lambda: '"ready"' in arp.path.read_text(), 10, "arpwatch ready")
        wait_for(
            lambda: {r["target"] for r in load_records(probe.path) if r["ok"]} == {v4, v6},
            10,
            "first replies",
        )
        assert lab.client_neigh(v4) == lab.mac("n1")

        t_move = time.monotonic()
        lab.exec("n1", ["ip", "addr", "del", f"{v4}/32", "dev", "eth0"])
        lab.exec("n1", ["ip", "addr", "del", f"{v6}/128", "dev", "eth0"])
        time.sleep(0.2)  # a deliberate 200 ms hole the prober must measure
        lab.exec("n2", ["ip", "addr", "add", f"{v4}/32", "dev", "eth0"])
        lab.exec("n2", ["ip", "addr", "add", f"{v6}/128", "dev", "eth0", "nodad"])
        mac = bytes.fromhex(lab.mac("n2").replace(":", ""))
        with lab.socket("n2", socket.AF_PACKET, socket.SOCK_RAW) as raw:
            raw.bind(("eth0", 0))
            raw.send(arp_frame(1, mac, v4, v4))
            raw.send(na_frame(mac, lab.node_ip6("n2"), v6, 0x20000000))
        t_announced = time.monotonic()

        wait_for(
            lambda: lab.client_neigh(v4) == lab.mac("n2") and lab.client_neigh(v6) == lab.mac("n2"),
            5,
            "client neighbour entries",
        )
        wait_for(
            lambda: all(
                (last_success(load_records(probe.path), v) or 0) > t_announced for v in (v4, v6)
            ),
            5,
            "replies from n2",
        )
        probe.stop()
        arp.stop()
        events = load_events(arp.path)
        assert announcements(events, v4, since=t_move, mac=lab.mac("n2"))
        assert announcements(events, v6, since=t_move, mac=lab.mac("n2"))
        records = load_records(probe.path)
        end = max(r["t"] for r in records)
        for v in (v4, v6):
            gap = outage(records, v, t_move - 0.1, end)
            assert 0.2 <= gap < t_announced - t_move + 0.1, (v, gap)
            assert lost(records, v, t_move, end) >= 15
    finally:
        probe.stop()
        arp.stop()


@pytest.mark.netns
def test_fault_helpers(bare_lab: Lab) -> None:
    lab = bare_lab

    def carrier(node: str) -> bool:
        return (
            "NO-CARRIER" not in ip_json(lab.ns(node), ["link", "show", "dev", "eth0"])[0]["flags"]
        )

    lab.cut_link("n1")
    assert lab.port_state("n1") == "down"
    wait_for(lambda: not carrier("n1"), 5, "n1 to lose carrier")  # the machine is gone
    lab.restore_link("n1")
    wait_for(lambda: carrier("n1") and lab.port_state("n1") == "forwarding", 5, "n1 back")
    lab.block_port("n2")
    assert lab.port_state("n2") == "disabled"
    assert carrier("n2")  # a partition the node cannot see
    lab.unblock_port("n2")
    assert lab.port_state("n2") == "forwarding"


LOSS_PORT = 7799  # not vipd's port: nothing else in the lab listens here
LOSS_SENDS = 1000


def _multicast_receiver(lab: Lab, node: str) -> socket.socket:
    sock = lab.socket(node, socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)  # never our own loss
    sock.bind(("", LOSS_PORT))
    own = lab.node_ip(node) if node != "client" else CLIENT_IP4
    mreq = socket.inet_aton(MULTICAST_GROUP) + socket.inet_aton(own)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    sock.setblocking(False)
    return sock


def _multicast_delivery(lab: Lab, sender: str, receivers: Sequence[str]) -> dict[str, int]:
    """Send LOSS_SENDS tagged datagrams from `sender` to the lab's multicast group (TTL 1);
    return how many each receiver got."""
    tag = secrets.token_bytes(8)  # ignore anything that is not from this round
    rx = {n: _multicast_receiver(lab, n) for n in receivers}
    tx = lab.socket(sender, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        tx.setsockopt(
            socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(lab.node_ip(sender))
        )
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        got = dict.fromkeys(receivers, 0)

        def drain() -> None:
            for node, sock in rx.items():
                while True:
                    try:
                        data = sock.recv(64)
                    except BlockingIOError:
                        break
                    got[node] += data.startswith(tag)

        for i in range(LOSS_SENDS):
            tx.sendto(tag + i.to_bytes(4, "big"), (MULTICAST_GROUP, LOSS_PORT))
            if i % 50 == 49:
                time.sleep(0.005)  # paced: a veth backlog must not be what loses frames
                drain()
        time.sleep(0.2)
        drain()
        return got
    finally:
        tx.close()
        for sock in rx.values():
            sock.close()


@pytest.mark.netns
def test_random_loss_is_real_per_port_and_cleared(bare_lab: Lab) -> None:
    """set_loss drops about N % of the frames to or from the chosen ports, one draw per frame
    (not one per port), and clear_loss restores lossless delivery."""
    lab = bare_lab
    everyone = ["n2", "client"]
    clean = _multicast_delivery(lab, "n1", everyone)
    assert clean == dict.fromkeys(everyone, LOSS_SENDS), f"loss before any set_loss: {clean}"

    # Binomial(1000, 0.25): sd 13.7 datagrams. +-5 sd is 68; one draw per port instead of one
    # per frame would lose 44 %, far outside, and so would no loss at all.
    def lossy(received: int) -> bool:
        return abs(received - 750) <= 68

    lab.set_loss(25)  # every port
    all_ports = _multicast_delivery(lab, "n1", everyone)
    print(f"\n25 % on every port, n1 -> {all_ports} of {LOSS_SENDS}")
    assert all(lossy(n) for n in all_ports.values()), all_ports
    # >=: the counters also see whatever IPv6/IGMP chatter the hosts sent meanwhile.
    assert lab.loss_drops() >= 2 * LOSS_SENDS - sum(all_ports.values())

    lab.set_loss(25, nodes=["n2"])  # only n2's port: both of its directions, nobody else's
    to_n2 = _multicast_delivery(lab, "n1", everyone)
    from_n2 = _multicast_delivery(lab, "n2", ["n1", "client"])
    print(f"25 % on n2's port: n1 -> {to_n2}, n2 -> {from_n2}")
    assert lossy(to_n2["n2"]) and to_n2["client"] == LOSS_SENDS, to_n2
    assert all(lossy(n) for n in from_n2.values()), from_n2

    lab.clear_loss()
    assert lab.loss_drops() == 0
    after = _multicast_delivery(lab, "n1", everyone)
    assert after == dict.fromkeys(everyone, LOSS_SENDS), f"loss after clear_loss: {after}"
    ruleset = netns_exec(lab.switch_ns, [nft_binary(), "list", "ruleset"]).stdout
    assert LOSS_TABLE not in ruleset, ruleset
