"""The controller's rules on real cores over the hand-stepped `Net`: quorum, maturity,
view agreement before planned claims, the config-mismatch winner, hold-down."""

from __future__ import annotations

from dataclasses import replace

from tests.clusterkit import Node, make_cluster
from tests.unit.test_core import STEP, Net
from vipd.membership.events import HolddownStarted, SelfDisrupted
from vipd.membership.wire import Flag
from vipd.placement.controller import Controller
from vipd.placement.overrides import Overrides

ALL6 = frozenset(f"www{i}" for i in range(1, 7))


def controllers(net: Net) -> dict[str, Controller]:
    return {name: Controller(net.nodes[name].config) for name in net.cores}


def with_policy(nodes: dict[str, Node], policy: str) -> dict[str, Node]:
    return {n: Node(replace(x.config, partition_policy=policy), x.key) for n, x in nodes.items()}


def test_majority_minority_side_holds_nothing_all_policy_serves_everything() -> None:
    for policy, isolated_holds in (("majority", frozenset()), ("all", ALL6)):
        net = Net(with_policy(make_cluster(3), policy))
        net.run(0.5)
        net.cut.add("n1")
        net.run(1.0)  # n1 and the others lose each other
        ctl = controllers(net)
        lone = ctl["n1"].decide(net.cores["n1"], held=frozenset(), now=net.now)
        assert lone.hold == isolated_holds, policy
        if policy == "majority":
            assert lone.reason == "no quorum"
        pair = ctl["n2"].decide(net.cores["n2"], held=frozenset(), now=net.now)
        assert pair.reason == "placement" and len(pair.hold) == 3


def test_majority_tie_goes_to_the_side_with_the_first_roster_name() -> None:
    net = Net(with_policy(make_cluster(4), "majority"))
    net.run(0.5)
    ctl = Controller(net.nodes["n1"].config)
    # {n1, n2} | {n3, n4}: a 2|2 split of a 4-node roster.
    assert ctl.has_quorum(frozenset({"n1", "n2"}))
    assert not ctl.has_quorum(frozenset({"n3", "n4"}))
    assert ctl.has_quorum(frozenset({"n2", "n3", "n4"}))


def test_lone_cold_start_waits_mature_after_then_takes_everything() -> None:
    net = Net(make_cluster(3), start=["n1"])
    core, ctl = net.cores["n1"], Controller(net.nodes["n1"].config)
    net.run(core.timing.startup_wait + 0.1)
    assert core.ready and not core.mature
    assert ctl.decide(core, frozenset(), net.now).hold == frozenset()
    net.run(core.timing.mature_after - core.timing.startup_wait)
    assert core.mature
    assert ctl.decide(core, frozenset(), net.now).hold == ALL6


def test_joining_a_running_cluster_is_mature_at_once() -> None:
    net = Net(make_cluster(3), start=["n1", "n2"])
    net.run(4.0)  # n1 and n2 mature (mature_after passed)
    net.start("n3")
    net.run(0.3)
    core = net.cores["n3"]
    assert core.ready and core.mature  # heard a ready member: no mature_after wait
    assert net.now - core.started < core.timing.mature_after


def test_planned_claims_wait_for_view_agreement_failover_claims_do_not() -> None:
    net = Net(make_cluster(3), start=["n1", "n2"])
    net.run(4.0)
    n1, n2 = net.cores["n1"], net.cores["n2"]
    ctl = Controller(net.nodes["n1"].config)
    n2.set_held(frozenset(range(6)), now=net.now)  # n2 holds the whole pool (n1 restarted?)
    net.run(0.05)
    # n3 joins while n2's datagrams are lost: n1's view gains n3, but n2 still advertises
    # the old view digest, so the new view is not agreed yet.
    net.cut.add("n2")
    net.start("n3")
    net.run(0.2)
    assert "n3" in n1.view.members and not n1.view_agreed()
    mine = {g for g, o in ctl.owners(n1).items() if o == "n1"}
    waiting = ctl.decide(n1, frozenset(), net.now)
    assert waiting.hold == frozenset(), "planned claims must wait for agreement"
    deadline = ctl.next_deadline()
    assert deadline is not None and deadline > net.now
    # n2 is lost (dead_after): its groups have no live holder and are claimed at once.
    net.run(n1.timing.dead_after)
    assert "n2" not in n1.view.members
    claimed = ctl.decide(n1, frozenset(), net.now)
    assert claimed.hold == {g for g, o in ctl.owners(n1).items() if o == "n1"}
    assert mine  # (n1 had groups to claim in the first place)


def test_planned_claims_go_ahead_after_settle_time_without_agreement() -> None:
    net = Net(make_cluster(3), start=["n1", "n2"])
    net.run(4.0)
    n1, n2 = net.cores["n1"], net.cores["n2"]
    n2.set_held(frozenset(range(6)), now=net.now)
    net.run(0.05)
    ctl = Controller(net.nodes["n1"].config)
    net.cut.add("n2")
    net.start("n3")
    net.run(0.2)
    first = ctl.decide(n1, frozenset(), net.now)
    assert first.hold == frozenset()
    settle_at = ctl.next_deadline()
    assert settle_at is not None
    net.now = settle_at  # n2 is still alive (within dead_after) but silent about the view
    later = ctl.decide(n1, frozenset(), net.now)
    assert later.hold and later.hold <= {g for g, o in ctl.owners(n1).items() if o == "n1"}


def test_config_mismatch_loser_releases_and_never_claims() -> None:
    nodes = make_cluster(3, groups=6)
    # n3 runs a different roster (a typo in a weight) with its own, valid key.
    config = nodes["n3"].config
    roster = tuple(replace(m, weight=2) if m.name == "n1" else m for m in config.roster)
    nodes["n3"] = Node(replace(config, roster=roster), nodes["n3"].key)
    net = Net(nodes)
    net.run(1.0)
    assert net.cores["n3"].config_passive and not net.cores["n1"].config_passive
    # The winners place the pool over themselves only.
    assert net.cores["n1"].view.members == ("n1", "n2")
    ctl = Controller(nodes["n3"].config)
    held = frozenset({"www1"})
    first = ctl.decide(net.cores["n3"], held, net.now)
    assert first.hold == held and first.reason == "config mismatch"
    net.run(net.cores["n3"].timing.handover_timeout + 0.01)
    assert ctl.decide(net.cores["n3"], held, net.now).hold == frozenset()


def test_a_node_cut_off_twice_goes_into_holddown_and_out_of_placement() -> None:
    net = Net(make_cluster(3))
    net.run(0.5)
    dead_after = net.cores["n1"].timing.dead_after
    for _ in range(2):
        net.cut.add("n1")
        net.run(dead_after + 0.3)
        net.cut.discard("n1")
        net.run(0.3)
    disruptions = net.of("n1", SelfDisrupted)
    assert len(disruptions) == 2
    (started,) = net.of("n1", HolddownStarted)
    assert started.flaps == 2 and started.seconds == net.cores["n1"].timing.holddown
    assert net.cores["n1"].flags & Flag.HOLDDOWN
    for name in ("n1", "n2", "n3"):
        assert net.cores[name].view.members == ("n2", "n3"), name  # everyone agrees
    # The others did not flap: losing one peer of two is not being cut off.
    assert net.of("n2", SelfDisrupted) == []
    net.run(started.seconds + 0.2)
    assert not net.cores["n1"].flags & Flag.HOLDDOWN
    assert net.cores["n2"].view.members == ("n1", "n2", "n3")


def test_holddown_never_leaves_the_pool_unplaced() -> None:
    net = Net(make_cluster(2))
    net.run(0.5)
    dead_after = net.cores["n1"].timing.dead_after
    for _ in range(2):  # a 2-node cluster split twice: both sides were cut off twice
        net.cut.add("n1")
        net.run(dead_after + 0.3)
        net.cut.discard("n1")
        net.run(0.3)
    assert net.cores["n1"].flags & Flag.HOLDDOWN and net.cores["n2"].flags & Flag.HOLDDOWN
    assert net.cores["n1"].view.members == ("n1", "n2")  # all held down: all placed


def _group_placed(ctl: Controller, before: tuple[str, ...], on: str, after_on: str) -> str:
    """A group placement gives to `on` over `before` and to `after_on` once `on` is gone."""
    weights = dict.fromkeys(before, 1)
    first = ctl._place(weights, Overrides())
    then = ctl._place({m: w for m, w in weights.items() if m != on}, Overrides())
    return next(g for g in ctl.groups if first[g] == on and then[g] == after_on)


def test_a_doubly_held_group_stays_with_one_holder_while_its_owner_is_starting() -> None:
    """A healed partition: n1 and n2 both hold a group whose owner in the merged view, n3, is
    still in its startup wait. The overlap must end now (within one settle time), not when
    n3 is ready: the first ready holder by name keeps it, the other releases it."""
    net = Net(make_cluster(4, groups=12), start=["n1", "n2"])
    net.run(4.0)
    ctl = controllers(net)
    group = _group_placed(ctl["n1"], ("n1", "n2", "n3"), "n3", "n1")
    index = ctl["n1"].index[group]
    for name in ("n1", "n2"):
        net.cores[name].set_held(net.cores[name].held | {index}, now=net.now)
    net.start("n3")  # n4 never answers: n3 stays in its startup wait
    net.run(0.2)
    assert not net.cores["n3"].ready and "n3" in net.cores["n1"].view.members
    n1 = ctl["n1"].decide(net.cores["n1"], frozenset({group}), net.now)
    n2 = ctl["n2"].decide(net.cores["n2"], frozenset({group}), net.now)
    assert group in n1.hold and group not in n2.hold
    assert [(o.group, o.new_owner, o.how) for o in n2.outcomes] == [(group, "n1", "confirmed")]
    # Once n3 is ready it takes the group over from n1, make-before-break.
    net.run(net.cores["n3"].timing.startup_wait)
    assert net.cores["n3"].ready
    n3 = Controller(net.nodes["n3"].config)
    assert group in n3.decide(net.cores["n3"], frozenset(), net.now).hold


def test_a_held_group_that_becomes_ours_is_announced_again() -> None:
    """n1 still holds a group it is handing to n3 (n3 never claimed it); n3 dies and the group
    becomes n1's. Whoever clients last heard for it, n1 must announce it now: nothing else
    will (it was never contested, and n1 never claimed it afresh)."""
    net = Net(make_cluster(3, groups=12))
    net.run(1.0)
    ctl = Controller(net.nodes["n1"].config)
    group = _group_placed(ctl, ("n1", "n2", "n3"), "n3", "n1")
    owned = {g for g, o in ctl.owners(net.cores["n1"]).items() if o == "n1"}
    held = frozenset({group}) | owned
    first = ctl.decide(net.cores["n1"], held, net.now)
    assert group in first.hold and group not in first.announce  # kept while handing over
    net.cut.add("n3")
    net.run(net.cores["n1"].timing.dead_after + 0.1)
    assert net.cores["n1"].view.members == ("n1", "n2")
    decisions = [ctl.decide(net.cores["n1"], held, net.now)]
    net.run(net.cores["n1"].timing.settle_time)
    decisions.append(ctl.decide(net.cores["n1"], held, net.now))
    announced = [g for d in decisions for g in d.announce]
    assert announced == [group]


def test_the_owner_announces_a_group_a_peer_claimed_and_let_go_of_unseen() -> None:
    """A false failover between two heartbeats: n2 claims one of n1's groups (its frames pull
    clients over) and lets go before any heartbeat lists it. n1 learns it from RELEASED and
    announces the group again, once."""
    net = Net(make_cluster(3, groups=12))
    net.run(1.0)
    ctl = Controller(net.nodes["n1"].config)
    held = frozenset(g for g, o in ctl.owners(net.cores["n1"]).items() if o == "n1")
    ctl.decide(net.cores["n1"], held, net.now)  # (the first decision announces what it holds)
    assert ctl.decide(net.cores["n1"], held, net.now).announce == ()
    group = min(held)
    n2 = net.cores["n2"]
    n2.set_held(n2.held | {ctl.index[group]}, now=net.now)
    n2.set_held(n2.held - {ctl.index[group]}, now=net.now)
    net.run(2 * STEP)
    assert ctl.decide(net.cores["n1"], held, net.now).announce == (group,)
    net.run(0.5)
    assert ctl.decide(net.cores["n1"], held, net.now).announce == ()
