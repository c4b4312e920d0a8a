"""The membership core on a hand-stepped clock: views, failure detection, leave, stalls."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from random import Random

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.clusterkit import WALL0, Node, make_cluster
from vipd.config import Config, PoolGroup
from vipd.host.keys import public_key_bytes
from vipd.membership.core import MembershipCore
from vipd.membership.events import (
    BecameReady,
    ConfigMismatch,
    DuplicateGone,
    DuplicateNode,
    Event,
    IncarnationWentBack,
    LoopStalled,
    MemberLost,
    MemberRestarted,
    OverridesAdopted,
    OverridesRefused,
    PoolDiffers,
    ViewChanged,
)
from vipd.membership.states import MemberState
from vipd.membership.wire import Flag
from vipd.placement.overrides import MAX_VERSION, MAX_VERSION_STEP, Overrides

STEP = 0.005


class Net:
    """Cores on one virtual clock and a lossless zero-delay segment we can cut nodes off."""

    def __init__(self, nodes: dict[str, Node], start: Iterable[str] | None = None) -> None:
        self.nodes = nodes
        self.now = 0.0
        self.cores: dict[str, MembershipCore] = {}
        self.events: dict[str, list[Event]] = {}
        self.cut: set[str] = set()
        self.frozen: set[str] = set()  # stalled loops: nothing runs, datagrams queue up
        self.inbox: dict[str, list[bytes]] = {}
        for name in start if start is not None else nodes:
            self.start(name)

    def start(self, name: str, incarnation: int = 1) -> MembershipCore:
        core = self.nodes[name].core(now=self.now, incarnation=incarnation)
        self.cores[name] = core
        self.events.setdefault(name, [])
        self.inbox[name] = []
        return core

    def stop(self, name: str) -> None:
        del self.cores[name]

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now += STEP
            for name, core in list(self.cores.items()):
                if name in self.frozen:
                    continue
                # Timers before queued datagrams: the worst order for a loop that stalled.
                if self.now >= core.get_timer():
                    core.handle_timer(now=self.now)
                for data in self.inbox[name]:
                    core.receive(data, name, now=self.now, wall=WALL0 + self.now)
                self.inbox[name].clear()
                for data in core.datagrams_to_send(now=self.now, wall=WALL0 + self.now):
                    self._broadcast(name, data)
                while (e := core.next_event()) is not None:
                    self.events[name].append(e)

    def _broadcast(self, sender: str, data: bytes) -> None:
        if sender in self.cut:
            return
        for other in self.cores:
            if other != sender and other not in self.cut:
                self.inbox[other].append(data)

    def of(self, name: str, kind: type) -> list:  # type: ignore[type-arg]
        return [e for e in self.events[name] if isinstance(e, kind)]


def test_cluster_forms_one_view_quickly() -> None:
    net = Net(make_cluster(3))
    net.run(0.3)
    views = {net.cores[n].view.members for n in net.cores}
    assert views == {("n1", "n2", "n3")}
    digests = {net.cores[n].view.digest for n in net.cores}
    assert len(digests) == 1
    # Every roster member was heard, so nobody waited out the whole startup_wait.
    for n in net.cores:
        (ready,) = net.of(n, BecameReady)
        assert ready.waited < net.cores[n].timing.startup_wait


def test_lone_node_waits_startup_wait_before_taking_part() -> None:
    nodes = make_cluster(3)
    net = Net(nodes, start=["n1"])
    core = net.cores["n1"]
    net.run(core.timing.startup_wait - 0.05)
    assert not core.ready and core.flags == Flag.JOINING | Flag.EPHEMERAL
    net.run(0.1)
    assert core.ready and core.flags == Flag.READY | Flag.EPHEMERAL and core.view.members == ("n1",)


def test_joining_members_are_placed_before_they_are_ready() -> None:
    """A joiner counts in the view at once (its holders keep its groups until it claims),
    so a cold-started cluster splits the pool once instead of each node grabbing it all."""
    nodes = make_cluster(3)
    net = Net(nodes, start=["n1", "n2"])
    net.run(1.0)
    assert list(net.cores["n1"].view.members) == ["n1", "n2"]
    net.start("n3")
    net.run(2 * STEP)
    assert not net.cores["n3"].ready
    assert net.cores["n1"].view.members == ("n1", "n2", "n3")
    assert net.cores["n1"].peers["n3"].state == MemberState.JOINING


def test_silent_member_is_lost_after_dead_after_not_before() -> None:
    net = Net(make_cluster(3))
    net.run(0.5)
    dead_after = net.cores["n1"].timing.dead_after
    net.cut.add("n3")
    cut_at = net.now
    net.run(dead_after - 0.12)
    assert net.of("n1", MemberLost) == []
    net.run(0.25)
    for survivor in ("n1", "n2"):
        (lost,) = net.of(survivor, MemberLost)
        assert lost == MemberLost("n3", "timeout")
        assert net.cores[survivor].view.members == ("n1", "n2")
        assert net.cores[survivor].peers["n3"].state == MemberState.DEAD
    # Detection happened within dead_after plus one heartbeat of the last datagram.
    assert net.now - cut_at <= dead_after + 0.15


def test_leave_is_seen_at_once() -> None:
    net = Net(make_cluster(3))
    net.run(0.5)
    net.cores["n2"].leave()
    net.run(2 * STEP)
    for other in ("n1", "n3"):
        assert net.of(other, MemberLost) == [MemberLost("n2", "left")]
        assert "n2" not in net.cores[other].view.members
    assert "n2" not in net.cores["n2"].view.members


def test_stalled_loop_does_not_accuse_its_peers() -> None:
    net = Net(make_cluster(3))
    net.run(0.5)
    dead_after = net.cores["n1"].timing.dead_after
    net.frozen.add("n1")  # SIGSTOP-like: n1's loop does not run, peers keep sending
    net.run(2 * dead_after)
    net.frozen.discard("n1")
    net.run(0.3)
    assert net.of("n1", LoopStalled), "the stall was not noticed"
    assert net.of("n1", MemberLost) == []
    assert net.cores["n1"].view.members == ("n1", "n2", "n3")
    # The peers, which did not stall, rightly lost n1 while it was silent, then took it back.
    assert net.of("n2", MemberLost) == [MemberLost("n1", "timeout")]
    assert net.cores["n2"].view.members == ("n1", "n2", "n3")


def test_restart_with_higher_incarnation_rejoins() -> None:
    net = Net(make_cluster(3))
    net.run(0.5)
    net.stop("n3")
    net.start("n3", incarnation=2)
    net.run(0.5)
    assert net.of("n1", MemberRestarted) == [MemberRestarted("n3", 1, 2)]
    assert net.cores["n1"].view.members == ("n1", "n2", "n3")
    assert net.cores["n1"].peers["n3"].incarnation == 2


def test_a_node_without_state_dir_whose_clock_went_back_rejoins_once_it_was_lost() -> None:
    """Issue 11 item 13: without `state_dir` the incarnation is the start time in ms, so a
    restart after the clock stepped back comes with a lower one, and every peer refused it
    as a replay for as long as that run lasted. Such a node says so in its heartbeats
    (EPHEMERAL, signed): a peer that has lost it accepts the lower incarnation as a restart;
    one that still monitors it does not, so a replay cannot roll back a live member."""
    net = Net(make_cluster(3))
    net.run(0.5)
    net.stop("n3")
    net.start("n3", incarnation=1_000)
    net.run(0.5)
    assert net.cores["n1"].peers["n3"].incarnation == 1_000
    net.stop("n3")
    net.run(1.0)  # lost by both peers (dead_after 0.75 s)
    assert net.cores["n1"].peers["n3"].state is MemberState.DEAD
    net.start("n3", incarnation=400)  # the clock stepped back before this start
    net.run(1.0)
    for name in ("n1", "n2"):
        assert net.cores[name].peers["n3"].incarnation == 400, name
        assert net.cores[name].view.members == ("n1", "n2", "n3"), name
        assert net.of(name, IncarnationWentBack) == [IncarnationWentBack("n3", 1_000, 400)]
    # A member still monitored cannot be rolled back: an older run's datagram is a replay.
    before = net.cores["n1"].rejected["replay"]
    older = net.nodes["n3"].core(now=net.now, incarnation=300)
    for data in older.datagrams_to_send(now=net.now, wall=WALL0 + net.now):
        net.cores["n1"].receive(data, "n3", now=net.now, wall=WALL0 + net.now)
    assert net.cores["n1"].rejected["replay"] == before + 1
    assert net.cores["n1"].peers["n3"].incarnation == 400


def test_a_node_with_state_dir_is_never_rolled_back() -> None:
    """With `state_dir` the incarnation only rises, so no datagram with a lower one can be
    genuine: a lost member's older run stays a replay."""
    nodes = make_cluster(3)
    n3 = nodes["n3"]
    nodes["n3"] = Node(replace(n3.config, state_dir=Path("/var/lib/vipd")), n3.key)
    net = Net(nodes)
    net.run(0.5)
    net.stop("n3")
    net.start("n3", incarnation=1_000)
    net.run(0.5)
    net.stop("n3")
    net.run(1.0)
    net.start("n3", incarnation=400)
    net.run(1.0)
    assert net.cores["n1"].peers["n3"].incarnation == 1_000
    assert net.cores["n1"].peers["n3"].state is MemberState.DEAD
    assert net.cores["n1"].rejected["replay"] > 0


def test_a_second_instance_of_a_node_is_reported_and_neither_is_placed() -> None:
    """Issue 11 item 6: a cloned machine (same name, same key) used to be only counted
    (`own_name`); both placed themselves under that name and held its share for good. Now
    each instance recognises the other (signed with its key, another nonce), reports it,
    and advertises DUPLICATE: no member places it, so neither holds anything. When one
    goes, the other takes part again under an incarnation above both."""
    nodes = make_cluster(3)
    nodes["n2-clone"] = nodes["n2"]  # another machine with n2's config and key
    net = Net(nodes, start=["n1", "n2", "n3"])
    net.run(0.5)
    net.start("n2-clone", incarnation=5)
    net.run(0.3)
    for name in ("n2", "n2-clone"):
        core = net.cores[name]
        assert core.duplicate and core.flags & Flag.DUPLICATE, name
        assert "n2" not in core.view.members, name
        assert len(net.of(name, DuplicateNode)) == 1, name
        assert core.rejected["duplicate_node"] > 0 and core.rejected["rate_limited"] == 0
    for name in ("n1", "n3"):
        assert net.cores[name].view.members == ("n1", "n3"), name
    net.run(2.0)  # still both running: still nobody places n2
    assert net.cores["n1"].view.members == ("n1", "n3")

    net.stop("n2-clone")
    net.run(1.0)
    assert not net.cores["n2"].duplicate
    gone = net.of("n2", DuplicateGone)
    assert gone == [DuplicateGone(1, 6)]
    assert list(net.cores["n1"].view.members) == ["n1", "n2", "n3"]
    assert net.cores["n1"].peers["n2"].incarnation == 6


def test_a_datagram_in_our_name_with_another_key_is_a_charged_spoof_not_a_clone() -> None:
    nodes = make_cluster(2)
    core = nodes["n1"].core()
    forged = Node(nodes["n1"].config, Ed25519PrivateKey.generate()).core(incarnation=9)
    for data in forged.datagrams_to_send(now=0.0, wall=WALL0):
        core.receive(data, "198.51.100.66", now=0.0, wall=WALL0)
    assert core.rejected["own_name"] == 1 and core.rejected["duplicate_node"] == 0
    assert not core.duplicate


def test_a_restarted_receiver_refuses_captures_of_what_it_took_before() -> None:
    """Issue 11 item 7: peer records started at (0, 0), so a receiver that had just
    restarted accepted a capture up to freshness_window old, and an on-link attacker kept a
    crashed peer "alive" in its view. A run now starts from what the last one took from each
    peer (`seen`, kept in state_dir by the node): a capture is refused, a fresh heartbeat of
    the same run is taken."""
    nodes = make_cluster(2)
    n1, n2 = nodes["n1"], nodes["n2"]
    sender = n2.core(incarnation=40)
    receiver = n1.core()
    captured = sender.datagrams_to_send(now=0.0, wall=WALL0)[0]
    receiver.receive(captured, "n2", now=0.0, wall=WALL0)
    later = sender.datagrams_to_send(now=1.0, wall=WALL0 + 1.0)[0]  # the capture is older
    receiver.receive(later, "n2", now=1.0, wall=WALL0 + 1.0)
    seen = receiver.seen()
    assert seen == {"n2": (40, int((WALL0 + 1.0) * 1000))}

    def restarted(known: dict[str, tuple[int, int]] | None) -> MembershipCore:
        return MembershipCore(
            n1.config, n1.key, n1.public_key, incarnation=2, now=5.0, rng=Random(0), seen=known
        )

    blind = restarted(None)
    blind.receive(captured, "n2", now=5.0, wall=WALL0 + 5.0)
    assert blind.counters["rx_accepted"] == 1  # what it did before: the capture counts
    after = restarted(seen)
    for data in (captured, later):
        after.receive(data, "n2", now=5.0, wall=WALL0 + 5.0)
    assert after.rejected["replay"] == 2 and after.peers["n2"].state is MemberState.UNKNOWN
    fresh = sender.datagrams_to_send(now=6.0, wall=WALL0 + 6.0)[0]
    after.receive(fresh, "n2", now=6.0, wall=WALL0 + 6.0)
    assert after.counters["rx_accepted"] == 1 and after.seen()["n2"][0] == 40


def test_heartbeats_carry_what_a_node_holds() -> None:
    net = Net(make_cluster(3))
    net.run(0.5)
    net.cores["n2"].set_held(frozenset({1, 4}), now=net.now)
    net.run(2 * STEP)  # a change is announced at once, not at the next interval
    assert net.cores["n1"].holders(1) == frozenset({"n2"})
    assert net.cores["n1"].holders(0) == frozenset()


def test_heartbeats_carry_what_a_node_let_go_of_for_two_dead_after() -> None:
    """A group released is listed as RELEASED for 2 x dead_after, so its owner learns that
    clients may still point at the releaser even if no heartbeat ever showed it held."""
    net = Net(make_cluster(3))
    net.run(0.5)
    n2 = net.cores["n2"]
    n2.set_held(frozenset({1, 4}), now=net.now)
    n2.set_held(frozenset({4}), now=net.now)  # 1 claimed and let go before any heartbeat
    net.run(2 * STEP)
    assert net.cores["n1"].holders(1) == frozenset()
    assert net.cores["n1"].released_map() == {1: frozenset({"n2"})}
    net.run(2 * n2.timing.dead_after + n2.timing.heartbeat_interval)
    assert net.cores["n1"].released_map() == {}
    n2.set_held(frozenset(), now=net.now)
    n2.set_held(frozenset({4}), now=net.now)  # taken back: no longer released
    net.run(2 * STEP)
    assert net.cores["n1"].released_map() == {}


def test_config_mismatch_is_reported_and_held_sets_ignored() -> None:
    nodes = make_cluster(2, groups=6)
    # n2 weighs n1 differently (a roster typo); reuse n2's key so it verifies.
    config = nodes["n2"].config
    roster = tuple(replace(m, weight=3) if m.name == "n1" else m for m in config.roster)
    nodes["n2"] = Node(replace(config, roster=roster), nodes["n2"].key)
    net = Net(nodes)
    net.run(0.5)
    net.cores["n2"].set_held(frozenset({1}), now=net.now)
    net.run(0.2)
    mismatches = net.of("n1", ConfigMismatch)
    assert len(mismatches) == 1 and mismatches[0].name == "n2"
    assert net.cores["n1"].peers["n2"].config_ok is False
    assert net.cores["n1"].holders(1) == frozenset()


def _with_pool(node: Node, names: list[str]) -> Node:
    pool = tuple(
        PoolGroup(n, "eth0", (ipaddress.ip_interface(f"203.0.113.{10 + i}/32"),))
        for i, n in enumerate(names)
    )
    return Node(replace(node.config, pool=tuple(sorted(pool, key=lambda g: g.name))), node.key)


def test_a_peer_on_another_pool_is_no_config_mismatch_and_readable_once_we_reload_too() -> None:
    """A rolling pool reload: n2 reloaded first (www0 added). n1 reports the difference, stays
    active, and cannot read n2's indices; after n1 reloads as well, and while n2 is still on
    the old pool (the other way round), holdings are renumbered by name."""
    nodes = make_cluster(2, groups=0)
    old_names, new_names = ["www1", "www2", "www3"], ["www0", "www1", "www2", "www3"]
    nodes = {"n1": _with_pool(nodes["n1"], new_names), "n2": _with_pool(nodes["n2"], old_names)}
    net = Net(nodes)
    net.run(0.5)
    n1, n2 = net.cores["n1"], net.cores["n2"]
    assert not n1.config_passive and not n2.config_passive
    assert [e.name for e in net.of("n1", PoolDiffers)] == ["n2"]
    n2.set_held(frozenset({2}), now=net.now)  # www3 in the old pool
    net.run(0.2)
    assert n1.holders_map() == {} and "n2" not in n1.observable_peers()
    # n1 goes back to the old pool: n2 is readable as is.
    n1.reload_pool(replace(nodes["n1"].config, pool=nodes["n2"].config.pool))
    assert n1.holders_map() == {2: frozenset({"n2"})}
    # ...and forward again: www3 is index 3 in the new pool, read through the old one.
    n1.set_held(frozenset({0}), now=net.now)  # www1 in the old pool
    n1.reload_pool(nodes["n1"].config)
    assert n1.held == frozenset({1})  # www1 renumbered
    assert n1.holders_map() == {3: frozenset({"n2"})}
    assert "n2" in n1.observable_peers()


def test_a_newer_operator_table_is_adopted_by_every_member_and_drains_leave_the_view() -> None:
    net = Net(make_cluster(3))
    net.run(0.5)
    table = Overrides().with_drain("n2", True, by="n3")
    assert net.cores["n3"].set_overrides(table)
    assert not net.cores["n3"].set_overrides(table)  # not newer: ignored
    net.run(0.2)
    for core in net.cores.values():
        assert core.overrides == table
        assert core.view.members == ("n1", "n3")
    assert net.cores["n2"].flags & Flag.DRAINING
    adopted = net.of("n1", OverridesAdopted)
    assert [(e.version, e.issuer, e.source) for e in adopted] == [(1, "n3", "n3")]
    # The view digest covers the table: agreement means the same moves and drains.
    moved = net.cores["n1"].overrides.with_move("www1", "n2", by="n1")
    before = net.cores["n1"].view.digest
    net.cores["n1"].set_overrides(moved)
    assert net.cores["n1"].view.digest != before
    net.run(0.2)
    assert all(core.view_agreed() for core in net.cores.values())
    # An older table (a node back from the dead with its persisted one) changes nothing.
    assert not net.cores["n2"].set_overrides(table)


def test_every_member_drained_still_places_them_all() -> None:
    net = Net(make_cluster(2))
    net.run(0.5)
    table = Overrides().with_drain("n1", True, by="n1").with_drain("n2", True, by="n1")
    net.cores["n1"].set_overrides(table)
    net.run(0.2)
    assert net.cores["n2"].view.members == ("n1", "n2")


def test_view_changes_are_reported_once_per_change() -> None:
    net = Net(make_cluster(3))
    net.run(0.5)
    before = len(net.of("n1", ViewChanged))
    net.run(1.0)
    assert len(net.of("n1", ViewChanged)) == before


def test_a_peer_that_left_and_went_quiet_holds_nothing() -> None:
    """Issue 11 item 12: a leaving node's last heartbeat ("held nothing") was sent once and
    a LEFT peer's held set never expired: with that one datagram lost, the others saw a ghost
    holder until the node came back. Now the goodbye is a burst, and a LEFT peer silent for
    dead_after advertises nothing."""
    net = Net(make_cluster(2))
    net.run(0.5)
    net.cores["n2"].set_held(frozenset({0, 1}), now=net.now)
    net.run(2 * STEP)
    assert net.cores["n1"].holders(0) == {"n2"}
    net.cores["n2"].leave()
    net.run(2 * STEP)
    # n2 releases everything; every datagram it sends from here on is lost.
    leaving = net.cores["n2"]
    leaving.set_held(frozenset(), now=net.now)
    sent = leaving.datagrams_to_send(now=net.now, wall=WALL0 + net.now)
    assert len(sent) >= 3, "the last word of a leaving node is a single datagram"
    net.stop("n2")
    dead_after = net.cores["n1"].timing.dead_after
    net.run(dead_after + 0.1)
    assert net.cores["n1"].holders(0) == frozenset(), "a ghost holder outlived its goodbye"
    assert net.cores["n1"].peers["n2"].state == MemberState.LEFT


# --- issue 11 item 2: what a compromised member can do to the operator table ---------------
# Each test pins one line of docs/security.md ("A compromised member and the operator table").


def _publish(net: Net, name: str, table: Overrides) -> None:
    """What a compromised member can do: put any table in its own signed heartbeats."""
    core = net.cores[name]
    core.overrides = table
    core.set_held(core.held | {5}, now=net.now)  # any change makes it send at once
    net.run(0.1)


def test_a_table_in_another_members_name_is_refused() -> None:
    net = Net(make_cluster(3))
    net.run(0.5)
    forged = Overrides().with_drain("n1", True, by="n1").with_drain("n2", True, by="n1")
    _publish(net, "n3", forged.signed(net.nodes["n3"].key, "web"))
    for name in ("n1", "n2"):
        assert net.cores[name].overrides == Overrides(), f"{name} adopted a forged table"
        assert net.cores[name].counters["overrides_refused"] >= 1
    (refused,) = net.of("n1", OverridesRefused)
    assert (refused.issuer, refused.source) == ("n1", "n3")
    assert refused.reason == "signature is not n1's"
    # A signature of zeros, or a table issued by a name outside the roster: refused too.
    _publish(net, "n3", replace(Overrides(5, "n1"), signature=bytes(64)))
    _publish(net, "n3", Overrides(6, "n9").signed(net.nodes["n3"].key, "web"))
    reasons = [e.reason for e in net.of("n2", OverridesRefused)]
    assert reasons[1:] == ["signature is not n1's", "issuer 'n9' is not in the roster"]
    assert net.cores["n2"].overrides == Overrides()


def test_a_relayed_table_keeps_its_issuer_and_cannot_be_altered_on_the_way() -> None:
    net = Net(make_cluster(3), start=["n1", "n2"])
    net.run(0.5)
    table = Overrides().with_drain("n1", True, by="n1")
    assert net.cores["n1"].set_overrides(table)
    net.run(0.2)
    net.stop("n1")
    # n3 never hears n1: it learns the table from n2, still n1's, still verifiable.
    net.start("n3")
    net.run(0.5)
    assert net.cores["n3"].overrides == table
    assert [(e.issuer, e.source) for e in net.of("n3", OverridesAdopted)] == [("n1", "n2")]
    # A relay that edits the table but keeps n1's signature is refused.
    relayed = net.cores["n2"].overrides
    altered = replace(relayed, version=relayed.version + 1, drained=("n1", "n3"))
    _publish(net, "n2", altered)
    assert net.cores["n3"].overrides == table
    assert net.of("n3", OverridesRefused)[-1].reason == "signature is not n1's"


def test_a_member_cannot_jump_the_version_out_of_reach_and_an_edit_undoes_its_table() -> None:
    net = Net(make_cluster(3))
    net.run(0.5)
    n3 = net.nodes["n3"].key
    # Far ahead (it would leave no version an operator could edit after): refused.
    _publish(net, "n3", Overrides(MAX_VERSION, "n3", (), ("n1", "n2")).signed(n3, "web"))
    assert net.cores["n1"].overrides == Overrides()
    assert "ahead of ours" in net.of("n1", OverridesRefused)[-1].reason
    # Within the step, in its own name: adopted, like any member's edit, and shown as its own.
    own = Overrides(MAX_VERSION_STEP, "n3", (), ("n1", "n2")).signed(n3, "web")
    _publish(net, "n3", own)
    assert net.cores["n1"].overrides == own and net.cores["n1"].view.members == ("n3",)
    # An operator on n1 undoes it with the next edit; n3 cannot get out of reach.
    undo = (
        net.cores["n1"].overrides.with_drain("n1", False, by="n1").with_drain("n2", False, by="n1")
    )
    assert net.cores["n1"].set_overrides(undo)
    net.run(0.3)
    assert net.cores["n2"].overrides == undo
    assert net.cores["n2"].view.members == ("n1", "n2", "n3")


def test_a_saved_table_is_kept_only_while_its_issuer_can_sign_it() -> None:
    nodes = make_cluster(3)
    core = nodes["n1"].core()
    own_legacy = Overrides(4, "n1", (), ("n2",))  # saved before tables were signed
    assert core.set_overrides(own_legacy, source="state")
    assert core.overrides.verifies([nodes["n1"].public_key], "web")
    # A table of another issuer that does not verify (e.g. signed by a key since removed).
    other = Overrides(9, "n2", (), ("n3",)).signed(Ed25519PrivateKey.generate(), "web")
    assert not core.set_overrides(other, source="state")
    assert core.overrides == own_legacy
    refused = [e for e in iter(core.next_event, None) if isinstance(e, OverridesRefused)]
    assert [(e.source, e.reason) for e in refused] == [("state", "signature is not n2's")]


def test_a_node_that_changes_its_key_reissues_the_table_it_signed() -> None:
    """Key rotation: once the old key leaves the roster, a node that restarts could no
    longer verify a table signed with it, and would disagree with every peer forever."""
    net = Net(make_cluster(2))
    net.run(0.5)
    net.cores["n1"].set_overrides(Overrides().with_drain("n2", True, by="n1"))
    net.run(0.2)
    new_key = Ed25519PrivateKey.generate()
    rotated = _with_keys(net.nodes["n1"], "n1", [net.nodes["n1"].key, new_key])
    net.cores["n1"].rekey(rotated, new_key, public_key_bytes(new_key))
    assert net.cores["n1"].overrides.version == 2
    assert net.cores["n1"].overrides.verifies([public_key_bytes(new_key)], "web")
    net.cores["n2"].rekey(_with_keys(net.nodes["n2"], "n1", [new_key]), *_own(net, "n2"))
    net.run(0.2)
    assert net.cores["n2"].overrides.version == 2
    assert net.cores["n2"].overrides.verifies([public_key_bytes(new_key)], "web")


def _with_keys(node: Node, member: str, keys: list[Ed25519PrivateKey]) -> Config:
    roster = tuple(
        replace(m, public_keys=tuple(public_key_bytes(k) for k in keys)) if m.name == member else m
        for m in node.config.roster
    )
    return replace(node.config, roster=roster)


def _own(net: Net, name: str) -> tuple[Ed25519PrivateKey, bytes]:
    return net.nodes[name].key, net.nodes[name].public_key
