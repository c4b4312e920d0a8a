"""`assign.place`: the operator's pins and the pool's preferences over balanced placement.

Balance (I5) and movement (I6) of the automatic part are `test_assign.py`'s; here: pins and
preferences win while their member is placeable, lapse to automatic placement otherwise,
and appearing or lapsing moves only their own group. Drains are members taken out of the
placeable set (the core's view), so they move exactly what a leave moves.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from vipd.placement.assign import assign, place

MEMBERS = [f"n{i}" for i in range(1, 9)]
GROUPS = st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=60, unique=True)
ROSTER = dict.fromkeys(MEMBERS, 1)
#: groups, live members, pins, preferences
Case = tuple[list[str], dict[str, int], dict[str, str], dict[str, list[str]]]


@st.composite
def scenario(draw: st.DrawFn) -> Case:
    groups = draw(GROUPS)
    live = draw(st.lists(st.sampled_from(MEMBERS), min_size=1, unique=True))
    members = {m: ROSTER[m] for m in live}
    pins = draw(st.dictionaries(st.sampled_from(groups), st.sampled_from(MEMBERS), max_size=8))
    prefer = draw(
        st.dictionaries(
            st.sampled_from(groups),
            st.lists(st.sampled_from(MEMBERS), min_size=1, max_size=3, unique=True),
            max_size=8,
        )
    )
    return groups, members, pins, prefer


@settings(deadline=None, max_examples=300)
@given(scenario())
def test_pins_then_preferences_then_placement(case: Case) -> None:
    groups, members, pins, prefer = case
    placed = place(groups, members, ROSTER, pins=pins, prefer=prefer)
    auto = assign(groups, members, ROSTER)
    assert set(placed) == set(groups) and set(placed.values()) <= set(members)
    for g in groups:
        if pins.get(g) in members:
            assert placed[g] == pins[g]
        elif any(p in members for p in prefer.get(g, ())):
            assert placed[g] == next(p for p in prefer[g] if p in members)
        else:
            assert placed[g] == auto[g]


@settings(deadline=None, max_examples=200)
@given(scenario(), st.randoms(use_true_random=False))
def test_deterministic_under_shuffled_input(case: Case, rnd: random.Random) -> None:
    groups, members, pins, prefer = case
    first = place(groups, members, ROSTER, pins=pins, prefer=prefer)
    shuffled_groups = list(groups)
    rnd.shuffle(shuffled_groups)
    shuffled_members = dict(rnd.sample(sorted(members.items()), len(members)))
    again = place(
        shuffled_groups,
        shuffled_members,
        dict(rnd.sample(sorted(ROSTER.items()), len(ROSTER))),
        pins=dict(rnd.sample(sorted(pins.items()), len(pins))),
        prefer=prefer,
    )
    assert again == first


@settings(deadline=None, max_examples=200)
@given(scenario(), st.data())
def test_a_pin_appearing_or_lapsing_moves_only_its_group(case: Case, data: st.DataObject) -> None:
    groups, members, pins, prefer = case
    group = data.draw(st.sampled_from(groups))
    target = data.draw(st.sampled_from(sorted(members)))
    before = place(groups, members, ROSTER, pins=pins, prefer=prefer)
    after = place(groups, members, ROSTER, pins={**pins, group: target}, prefer=prefer)
    assert {g for g in groups if before[g] != after[g]} <= {group}
    assert after[group] == target


@settings(deadline=None, max_examples=200)
@given(scenario())
def test_a_pinned_member_dying_moves_its_pins_and_what_a_leave_moves(case: Case) -> None:
    groups, members, pins, prefer = case
    if len(members) < 2:
        return
    gone = sorted(members)[0]
    rest = {m: w for m, w in members.items() if m != gone}
    before = place(groups, members, ROSTER, pins=pins, prefer=prefer)
    after = place(groups, rest, ROSTER, pins=pins, prefer=prefer)
    auto_before, auto_after = assign(groups, members, ROSTER), assign(groups, rest, ROSTER)
    moved = {g for g in groups if before[g] != after[g]}
    # Only groups on the leaver, or whose automatic placement the leave moved (I6), move.
    allowed = {g for g in groups if before[g] == gone or auto_before[g] != auto_after[g]}
    assert moved <= allowed
    assert gone not in after.values()


def test_preferences_follow_their_order_and_names_outside_the_config_are_ignored() -> None:
    groups = ["www-a", "www-b", "www-c"]
    members = {"n1": 1, "n2": 1, "n3": 1}
    prefer = {"www-a": ["n3", "n1"], "www-b": ["ghost", "n2"]}
    placed = place(groups, members, ROSTER, pins={"nope": "n1", "www-c": "ghost"}, prefer=prefer)
    assert placed["www-a"] == "n3" and placed["www-b"] == "n2"
    assert placed["www-c"] == assign(groups, members, ROSTER)["www-c"]
    without_n3 = place(groups, {"n1": 1, "n2": 1}, ROSTER, prefer=prefer)
    assert without_n3["www-a"] == "n1"


def test_drain_is_a_leave_for_placement() -> None:
    """The core leaves drained members out of the view: placement over the rest moves the
    drained member's groups and what balance forces, exactly like a leave."""
    groups = [f"g{i}" for i in range(40)]
    everyone = dict.fromkeys(MEMBERS[:5], 1)  # the whole roster is live
    drained = {m: w for m, w in everyone.items() if m != "n2"}
    before, after = assign(groups, everyone, everyone), place(groups, drained, everyone)
    assert {g for g in groups if before[g] != after[g]} == {g for g in groups if before[g] == "n2"}
