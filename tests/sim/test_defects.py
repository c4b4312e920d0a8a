"""Defects in vipd found by the simulator: one deterministic reproduction each.

Each test states what the design requires. Fixed defects stay as regression tests (the commit
that fixed them is named). Open ones are marked ``xfail(strict=True)``: they fail today for
the reason given; once vipd is fixed they pass, strict xfail turns that into a failure, and
whoever fixed it removes the marker here and the tag in `tests.sim.invariants.KNOWN_DEFECTS`.

K1-K4 failed on b6c35fa; K2 (stall) was fixed by 5db8211; K1, K2 (heal), K3, K4 by 7ac1d76;
K2 (overlap ends, repeats during a handover) and K5 by the commit after 7ac1d76 ("Announce owned
groups again when an overlap ends ..."); K2 (seed 4189) and K6 by "controller: interim owner for
held groups whose owner is starting; announce held groups that become ours".
"""

from __future__ import annotations

import pytest

from tests.sim.harness import Run, formed
from tests.sim.schedules import run_seed
from tests.sim.simulator import NetParams
from vipd.config import PROFILES

LAN = PROFILES["lan"]
FAST = PROFILES["fast"]


def _stale_client_entries(run: Run) -> list[tuple[str, str, str | None]]:
    """(group, holder, node the client's neighbour entry points at) where they differ."""
    holders = run.sim.owner_of()
    return [
        (g, holders[g][0], run.sim.client_arp.get(a))
        for g, texts in run.sim.pool_text
        for a in texts
        if len(holders[g]) == 1 and run.sim.client_arp.get(a) != holders[g][0]
    ]


def test_k1_member_in_holddown_still_counts_for_majority() -> None:
    """3 nodes, majority: n01 flaps into hold-down, then n03's machine dies. n01 + n02 are 2
    of 3, connected: a majority, so the pool must stay served. vipd: n02's view holds only
    n02 (hold-down members are left out of the view) and n01 computes the same, so both
    decide "no quorum" and release everything for the rest of the hold-down (5-40 s).
    Fixed in 7ac1d76 (quorum counts every connected member)."""
    run = formed(3, 9, policy="majority")
    run.flap("n01", 2)
    assert run.events("n01", "HolddownStarted")
    run.sim.machine_down("n03")
    run.run(LAN.dead_after + 1.0)
    served = run.held_by("n01") | run.held_by("n02")
    assert served == run.all_groups(), f"unserved: {sorted(run.all_groups() - served)}"


def test_k2_node_back_from_a_long_stall_reannounces_what_it_kept() -> None:
    """n03's loop stalls 40 s (a suspended VM), longer than freshness_window: the peers take
    its groups and announce them; when n03 resumes, every queued heartbeat is stale, so it
    never sees them held elsewhere. The peers hear n03 again and release its groups to it:
    n03 holds them, but clients were last told the peers' MACs and nobody tells them
    otherwise (the design's 'again whenever another MAC is seen answering' is missing).
    Fixed in 5db8211 (everything kept is announced again after SelfDisrupted)."""
    run = formed(5, 10)
    run.sim.stall("n03", 40.0)
    run.run(41.0)
    run.settle()
    assert _stale_client_entries(run) == []


def test_k2_node_back_from_a_stall_with_a_full_socket_buffer_reannounces() -> None:
    """The same with an ordinary stall (3 x dead_after) when the socket buffer fills before
    the peers take over (8 datagrams here; a 200 KB buffer at 255 peers fills in 0.1 s).
    Fixed in 5db8211."""
    run = formed(5, 10, net=NetParams(rcvbuf=8))
    run.sim.stall("n03", 3 * LAN.dead_after)
    run.run(3 * LAN.dead_after + 1.0)
    run.settle()
    assert _stale_client_entries(run) == []


def test_k2_after_a_heal_clients_reach_the_final_owner_within_one_settle_time() -> None:
    """Partition {n01, n03, n04} | {n02}, fast profile, then heal. On the heal every node
    re-announces what it keeps at its first MemberJoined; n02 re-announces groups it is about
    to release (it has not heard their owners yet), after their owners' own re-announce.
    It releases them a moment later; clients stay on n02 until the owners' next repeat
    (+1 s), though the issue asks for the final owner within one settle time (0.15 s).
    Fixed in 7ac1d76 (announce only owned groups, only from an agreed view)."""
    net = NetParams(delay=0.0002, jitter=0.005, dup=0.05)
    run = formed(4, 39, seed=1, timing=FAST, net=net)
    run.sim.partition(["n01", "n03", "n04"])
    run.run(0.2)
    run.sim.heal()
    run.run(run.checker.bounds.heal)
    assert _stale_client_entries(run) == []


def test_k3_failover_does_not_wait_for_a_starting_member() -> None:
    """n03's machine dies just as n04 starts (a planned join). n03's groups are re-placed
    over the view, which includes n04 while it listens (startup_wait); the ones placed on
    n04 stay unserved until n04 is ready, instead of being claimed at once by a ready
    member ('claims of addresses whose holder is dead happen at once'). Fixed in 7ac1d76
    (orphans whose owner is still starting go to a ready member for now)."""
    run = formed(4, 24, start=["n01", "n02", "n03"])
    lost = run.held_by("n03")
    down = run.sim.now
    run.sim.machine_down("n03")
    run.run(LAN.dead_after - 0.1)
    run.sim.start("n04")  # 0.1 s before the survivors notice n03 is gone
    run.sim.run_until(down + LAN.dead_after + 2 * LAN.heartbeat_interval + 0.05)
    served = frozenset().union(*(run.held_by(n) for n in ("n01", "n02", "n04")))
    # vipd today: the last of them is claimed 1.42 s after the machine died, not ~0.8 s.
    assert lost <= served, f"unserved {run.sim.now - down:.2f} s on: {sorted(lost - served)}"


def test_k4_minority_node_claims_nothing_while_it_is_cut_off() -> None:
    """Majority policy, 5 nodes, n01 cut off. Its peers' deadlines expire one by one; while
    its view still has 3 of 5 it claims (and announces) the groups of the peers it already
    lost, then drops everything when quorum goes. 'A side with fewer than half of the roster
    holds nothing': with a partition that only stops heartbeats (multicast filtered), those
    frames pull clients off the majority's holders for the rest of the partition.
    Fixed in 7ac1d76 (majority waits one interval after a loss before failover claims)."""
    run = formed(5, 20, policy="majority", seed=3, net=NetParams(delay=0.001, jitter=0.01))
    t0 = run.sim.now
    run.sim.isolate("n01")
    run.run(LAN.dead_after + 1.0)
    claims = [x for t, x in run.events("n01", "kernel claim") if t >= t0]
    assert claims == []


# --- open on 7ac1d76, fixed since ---------------------------------------


@pytest.mark.parametrize("seed", [182, 248, 302, 349])
def test_k2_clients_reach_the_holder_after_every_overlap(seed: int) -> None:
    """Random schedules (replay: VIPD_SIM_SEED=<seed>) where an address ends on one holder
    but the client's neighbour entry stays on the node that released it, past the heal bound:

    - 182 (lan), 248 (fast): a one-way cut. The node that cannot hear the owner claims its
      groups and keeps announcing them (claim repeats, its own re-announces); at the heal it
      releases, while the owner, which never lost anyone, has no reason to announce again.
    - 302 (fast): n02, which took n04's group during n04's stall, stalls itself; on resume its
      timer runs first, SelfDisrupted re-announces everything from its pre-stall view, then the
      queued heartbeats show n04 back and it releases: its frame came last.
    - 349 (lan): just after a heal a deadline expires before the first heartbeat from the far
      side arrives: a failover claim and its frame, released 2 ms later; the holder sees the
      overlap while its view is not agreed, so it does not re-announce, and once agreed the
      overlap is over.

    A fifth variant shows in test_scale's 64-node run (heartbeat 1 s): during a
    make-before-break handover the old holder's pending announce repeat (+5 s after its own
    claim) fires after the new owner's claim and before the old holder's release, so clients
    go back to the old holder until the new owner's +1 s repeat; repeats are cancelled at the
    release, not when the handover begins.

    Common cause: nothing re-announces when an overlap *ends*; the design's "again whenever
    another MAC is seen answering for an address we hold" would cover all of them."""
    result = run_seed(seed, write_trace=False)
    assert result.violations == [], "\n".join(map(str, result.violations[:3]))


@pytest.mark.parametrize("seed", [260, 1196, 2674])
def test_k8_a_false_failover_released_between_heartbeats_is_announced_by_the_owner(
    seed: int,
) -> None:
    """Found by the 3,000-seed sweep; failed on the commit before the RELEASED field.

    A node loses the owner for a moment (a loss burst: 260, 1196; the owner's loop stalls
    just under dead_after: 2674), claims its group and announces it, then hears the owner
    again and releases it, all between two of its heartbeats, or with the one heartbeat that
    listed the group lost. The owner never sees anyone else hold the group, so nothing
    announces it again: clients stay on the node that released it. Fixed: a heartbeat lists
    the groups its sender let go of in the last 2 x dead_after (RELEASED), and an owner that
    sees one of its groups there announces it again."""
    result = run_seed(seed, write_trace=False)
    assert result.violations == [], "\n".join(map(str, result.violations[:3]))


def test_k2_group_that_becomes_ours_after_an_overlap_is_announced() -> None:
    """Seed 4189 (lan, replay: VIPD_SIM_SEED=4189), open on 65e03ee. n04 holds g0034 but is
    handing it to n01, a member that crashed while joining (placed, observable, never claims:
    "stalled" handover, n04 keeps it). n04's loop stalls 1.38 s; n07, having lost n04 and n01,
    claims g0034 and announces it (t=5.977). n04 resumes (t=6.644): its SelfDisrupted
    re-announce covers only the groups it owns, and in its view g0034 still belongs to n01
    (its stall-extended deadline for n01 has not run out). n07 hears n04 and hands g0034 back
    (t=6.653). At t=6.844 n04 finally loses n01 and g0034 becomes its own, but the overlap is
    over, so nothing announces it: clients stay on n07, which released it, for good (n04's
    last frames for it are from t=3.25). Fixed: a held group that becomes ours is announced
    again, and a group whose owner is not ready belongs (for now) to a ready holder, so n04
    owns g0034 as soon as it resumes and its SelfDisrupted re-announce covers it."""
    result = run_seed(4189, write_trace=False)
    assert result.violations == [], "\n".join(map(str, result.violations[:3]))


def test_k5_cold_start_splits_the_pool_once() -> None:
    """A cold start of 5 nodes must split the pool once (3881b5b: "place joining members so a
    cold start splits the pool once"). Since 7ac1d76 a node that is ready first sees the
    others' groups unheld and their owners not yet ready, takes them as interim owner, then
    hands them over make-before-break a few ms later: 58 claims and 35 releases for 23 groups,
    with a GARP burst from each interim owner."""
    run = formed(5, 23)
    claims = [x for _, who, x in run.sim.trace.lines if x.startswith("kernel claim")]
    assert len(claims) == 23


def test_k6_after_a_heal_one_holder_within_one_settle_time_even_if_the_owner_is_starting() -> None:
    """Seed 2893 (fast profile, replay: VIPD_SIM_SEED=2893), on 65e03ee: n01 leaves and a
    partition {n01, n02, n03, n05, n06} | {n04, n07} follows; each side takes n01's groups
    (policy "all"): g0013 on n06 and on n04. n01 rejoins 10 ms before the heal (t=2.864) and
    owns g0013 in the merged view, but is in its startup wait (0.3 s). Both holders keep
    g0013 until n01 holds it (make-before-break, t=3.165), so it stays doubly held 0.3 s
    after the heal: more than one settle time (0.15 s) + detection. Fixed: a group whose owner
    is still starting belongs for now to its first ready holder by name, which keeps it (and,
    having seen the overlap or a member come back, announces it); the others release at once."""
    result = run_seed(2893, write_trace=False)
    assert result.violations == [], "\n".join(map(str, result.violations[:3]))


def test_k7_client_returns_to_the_holder_after_the_node_that_pulled_it_away_dies() -> None:
    """Seed 416 (lan, replay: VIPD_SIM_SEED=416): policy "all", partition {n01, n02} | {n03}
    that stops heartbeats but not the client. n02 loses n03, claims n03's groups and announces
    them: the client follows n02 (correct for policy "all": both sides serve). n02's machine
    then dies before the heal. n03 never heard n02 hold anything (it had already lost it), so
    no overlap is ever seen and nothing re-announces: the client keeps n02's MAC until its
    own neighbour entry times out (Linux: ~30-60 s of NUD probing; some routers: hours).

    Heartbeats cannot fix this; the design's "announce again whenever another MAC is seen
    answering for an address we hold" can. Fixed by the conflict listener
    (`vipd.arp.listener`, `vipd.node.defend`): n03 sees n02's frames for addresses it owns and
    answers each, at most once per announce.defend_interval and always after the last one,
    so the last word is n03's when n02 dies."""
    result = run_seed(416, write_trace=False)
    assert result.violations == [], "\n".join(map(str, result.violations[:3]))


@pytest.mark.parametrize("seed", [3000, 3364])
def test_k9_orphans_do_not_wait_for_a_starting_owner_when_nobody_was_lost(seed: int) -> None:
    """Found by the sweep of seeds 2000-4999; failed on the commit before "interim owner for
    orphans served before". The interim owner for an unheld group whose owner is still
    starting (K3's fix) applied only within startup_wait + settle_time of a MemberLost:

    - 3364 (lan): n03's machine reboots within dead_after, so its peers see a restart, not a
      loss; its groups are gone with the machine, and they waited for n03's startup wait,
      twice (it crashed once more while starting): 2.5 s unserved.
    - 3000 (lan, majority): quorum comes back through joins; the groups placed on members
      still starting waited for them, with n05 ready and idle all along.

    Fixed: an unheld group gets a ready interim owner if it was served since the deciding
    node started, or if that node has been ready for startup_wait (it is not starting along
    with the owner, which is what a cold start needs to split the pool once, K5)."""
    result = run_seed(seed, write_trace=False)
    assert result.violations == [], "\n".join(map(str, result.violations[:3]))
