"""The simulator can fail: bugs injected into vipd (monkeypatched for one test) are caught.

Each test breaks one rule of the design in the real code, runs a scenario (or a few random
schedules) that passes on the unbroken code (see test_scenarios / test_random), and requires
the invariant checker to report the matching invariant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import pytest

from tests.sim import test_scenarios
from tests.sim.cluster import ClusterSpec
from tests.sim.harness import Run, formed
from tests.sim.schedules import run_seed
from vipd.config import PROFILES
from vipd.membership.core import MembershipCore
from vipd.placement import assign as assign_module
from vipd.placement.assign import assign as real_assign
from vipd.placement.controller import Controller
from vipd.placement.handover import HandoverOutcome, HandoverPolicy

LAN = PROFILES["lan"]


def _invariants(run: Run) -> set[str]:
    run.settle()
    return {v.invariant for v in run.checker.finish()}


def _break_before_make(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug: release a group as soon as placement moves it (no make-before-break)."""

    def groups_to_hold(
        self: HandoverPolicy, *, owners: Mapping[str, str | None], **_: object
    ) -> tuple[frozenset[str], list[HandoverOutcome]]:
        return frozenset(g for g, o in owners.items() if o == self.node), []

    monkeypatch.setattr(HandoverPolicy, "groups_to_hold", groups_to_hold)


def test_break_before_make_is_caught_on_graceful_leave(monkeypatch: pytest.MonkeyPatch) -> None:
    run = formed(4, 20)
    _break_before_make(monkeypatch)
    run.sim.leave("n02")
    assert "I2" in _invariants(run)


def test_break_before_make_is_caught_on_join(monkeypatch: pytest.MonkeyPatch) -> None:
    run = formed(4, 20, start=["n01", "n02", "n03"])
    _break_before_make(monkeypatch)
    run.sim.start("n04")
    assert "I2" in _invariants(run)


def test_break_before_make_is_caught_by_random_schedules(monkeypatch: pytest.MonkeyPatch) -> None:
    _break_before_make(monkeypatch)
    caught = [s for s in range(8) if run_seed(s, write_trace=False).violations]
    assert len(caught) >= 2, caught  # seeds 0-7 all pass on the real code


def test_node_dependent_placement_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug: one node places the pool with its own hash salt (different order of members)."""
    real_owners = Controller.owners

    def owners(self: Controller, core: object) -> dict[str, str | None]:
        placed = real_owners(self, core)  # type: ignore[arg-type]
        if self.node != "n02":
            return placed
        members = sorted({o for o in placed.values() if o})
        shift = {m: members[(i + 1) % len(members)] for i, m in enumerate(members)}
        return {g: shift.get(o) if o else None for g, o in placed.items()}

    monkeypatch.setattr(Controller, "owners", owners)
    found = _invariants(_unformed(3, 9))
    assert "I4" in found, found


def _unformed(nodes: int, groups: int, **kw: object) -> Run:
    """Like `formed`, without asserting that the start converged (a bug may prevent it)."""
    from tests.sim.invariants import Checker
    from tests.sim.simulator import Sim

    sim = Sim(ClusterSpec(nodes=nodes, groups=groups, **kw))  # type: ignore[arg-type]
    run = Run(sim, Checker(sim))
    for name in sim.order:
        sim.start(name)
    run.settle()
    return run


def test_unbalanced_placement_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug: placement puts every group on the first member."""

    def assign(
        groups: Sequence[str], members: Mapping[str, int], roster: Mapping[str, int] | None = None
    ) -> dict[str, str]:
        first = min(members)
        return {g: first for g in real_assign(groups, members, roster=roster)}

    monkeypatch.setattr(assign_module, "assign", assign)
    assert "I5" in _invariants(_unformed(3, 9))


def test_placement_without_roster_anchor_is_caught_by_i6(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug: placement over the live set only (plain greedy): a leave moves other groups."""

    def assign(
        groups: Sequence[str], members: Mapping[str, int], roster: Mapping[str, int] | None = None
    ) -> dict[str, str]:
        return real_assign(groups, members, roster=None)

    monkeypatch.setattr(assign_module, "assign", assign)
    run = formed(6, 40)
    run.sim.leave("n03")
    run.settle()
    run.sim.start("n03")
    assert "I6" in _invariants(run)


def test_keeping_everything_after_a_heal_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug: a node never gives up a group it holds (no release after a partition heals)."""
    real = HandoverPolicy.groups_to_hold

    def groups_to_hold(
        self: HandoverPolicy, **kw: object
    ) -> tuple[frozenset[str], list[HandoverOutcome]]:
        keep, outcomes = real(self, **kw)  # type: ignore[arg-type]
        held = cast(frozenset[str], kw["held"])
        return keep | held, outcomes

    run = formed(3, 9)
    monkeypatch.setattr(HandoverPolicy, "groups_to_hold", groups_to_hold)
    run.sim.partition(["n01"])
    run.run(LAN.dead_after + 1.0)
    run.sim.heal()
    assert "I3" in _invariants(run)


def test_ignoring_the_config_mismatch_rule_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug: a node with a different roster never yields (config_passive always False)."""
    monkeypatch.setattr(MembershipCore, "config_passive", property(lambda self: False))
    odd = ClusterSpec(nodes=3, groups=6, weights=((1, 2),)).config("n01")
    run = formed(3, 6, configs={"n01": odd}, start=["n01"])
    run.sim.start("n02")
    run.run(0.5)
    run.sim.start("n03")
    assert "I3" in _invariants(run)


def test_stall_blindness_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug: the core does not notice its own stall (no lag measurement): the stalled node
    accuses its peers on resume and grabs their groups."""
    real = MembershipCore.handle_timer

    def handle_timer(self: MembershipCore, *, now: float) -> None:
        self._armed = None
        real(self, now=now)

    monkeypatch.setattr(MembershipCore, "handle_timer", handle_timer)
    with pytest.raises(AssertionError, match="accused its peers"):
        test_scenarios.test_stall_of_two_dead_after_no_accusation_by_the_stalled_node()
