"""The unicast transport on the real kernel: same protocol and signatures, one datagram per
peer to its roster address, for networks that filter multicast."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from tests.netns.conftest import running
from vipd.lab.cluster import LabCluster
from vipd.lab.topology import CLIENT_IP4, MULTICAST_GROUP, MULTICAST_PORT, Lab

pytestmark = pytest.mark.netns


@pytest.fixture
def unicast_cluster(lab: Lab, request: pytest.FixtureRequest) -> Iterator[LabCluster]:
    with running(LabCluster(lab, transport="unicast"), request) as c:
        yield c


def test_unicast_cluster_converges_fails_over_and_sends_no_multicast(
    unicast_cluster: LabCluster,
) -> None:
    c = unicast_cluster
    # A listener on the heartbeat group in the client namespace hears nothing.
    sock = c.lab.socket("client", socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((MULTICAST_GROUP, MULTICAST_PORT))
        mreq = struct.pack("=4s4s", socket.inet_aton(MULTICAST_GROUP), socket.inet_aton(CLIENT_IP4))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        sock.settimeout(1.0)
        with pytest.raises(TimeoutError):
            sock.recvfrom(2048)
    for node in c.nodes:
        status = c.status(node)
        assert sorted(status["view"]["members"]) == sorted(c.nodes)
        assert status["counters"]["rx_accepted"] > 0

    before = c.wait_converged()
    held = c.holdings()
    victim = max(sorted(held), key=lambda n: len(held[n]))
    survivors = [n for n in c.nodes if n != victim]
    c.lab.cut_link(victim)
    after = c.wait_converged(survivors, timeout=10.0)
    for vip, owner in before.items():
        if owner != victim:
            assert after[vip] == owner, "only the lost node's addresses move"
