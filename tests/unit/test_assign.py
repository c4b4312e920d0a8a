"""Placement of pool groups on live members: determinism (I4), balance (I5), movement (I6).

Most properties are checked on a live subset of a roster (``assign(groups, live, roster)``,
the two-phase placement the daemon uses); the plain greedy over the live set alone
(``roster=None``) is phase 1 of it and keeps its own movement tests at the end of I6.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections.abc import Mapping, Sequence
from itertools import pairwise

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vipd.placement.assign import _homes, _neg_ln, assign, quotas

# Names as a config could spell them, including non-ASCII; group and member names may overlap.
NAMES = st.text(min_size=1, max_size=10)
# Mostly small weights, sometimes wildly skewed ones (a 1000x box next to a 1x box).
WEIGHTS = st.one_of(st.integers(1, 6), st.integers(1, 1000))

Roster = dict[str, int]


@st.composite
def numbered(draw: st.DrawFn, prefix: str, most: int) -> list[str]:
    """Larger sets than st.lists reaches in practice: www0..wwwN under a drawn salt."""
    salt = draw(st.text(max_size=3))
    return [f"{prefix}{salt}{i}" for i in range(draw(st.integers(0, most)))]


def member_sets(weight: st.SearchStrategy[int], least: int = 1) -> st.SearchStrategy[Roster]:
    small = st.dictionaries(NAMES, weight, min_size=least, max_size=24)
    large = (
        numbered("n", 40)
        .filter(lambda names: len(names) >= least)
        .flatmap(
            lambda names: st.lists(weight, min_size=len(names), max_size=len(names)).map(
                lambda ws: dict(zip(names, ws, strict=True))
            )
        )
    )
    return st.one_of(small, large)


@st.composite
def rostered(
    draw: st.DrawFn, weight: st.SearchStrategy[int], dead: int = 0
) -> tuple[Roster, Roster]:
    """(roster, live): a roster and a live subset of it with at least ``dead`` members gone.

    With ``dead=0`` the whole roster is live about a third of the time.
    """
    roster = draw(member_sets(weight, least=dead + 1))
    names = sorted(roster)
    if dead == 0 and draw(st.integers(0, 2)) == 0:
        return roster, dict(roster)
    live = draw(st.sets(st.sampled_from(names), min_size=1, max_size=len(names) - dead))
    return roster, {m: roster[m] for m in names if m in live}


GROUPS = st.one_of(st.lists(NAMES, unique=True, max_size=150), numbered("www", 300))
SOME_GROUPS = st.one_of(
    st.lists(NAMES, unique=True, min_size=1, max_size=150), numbered("www", 300).filter(bool)
)
EQUAL = member_sets(st.just(1))
WEIGHTED = member_sets(WEIGHTS)
ANY_MEMBERS = st.one_of(EQUAL, WEIGHTED)
ANY_WEIGHT = st.one_of(st.just(1), WEIGHTS)  # all equal, or drawn per member


def counts(result: Mapping[str, str], members: Mapping[str, int]) -> dict[str, int]:
    """Groups per member, members holding nothing included."""
    out = dict.fromkeys(members, 0)
    for member in result.values():
        out[member] += 1
    return out


def homes(groups: Sequence[str], roster: Roster) -> dict[str, str]:
    """Phase 1 straight from its (memoised) function, not through assign()."""
    names = tuple(sorted(groups))
    return dict(zip(names, _homes(names, tuple(sorted(roster.items()))).home, strict=True))


def must_give_back(groups: Sequence[str], roster: Roster, live: Roster) -> int:
    """Home groups on live members that balance forces off their home, counted directly.

    A live member holding floor + 1 of its home groups needs an extra unit to keep them all;
    if more members are in that state than there are extras, the surplus ones must each
    lose one (every count must end at floor or floor + 1, with exactly E at floor + 1).
    """
    held = counts(homes(groups, roster), roster)
    names = sorted(live)
    floors, extras = quotas(len(groups), [live[m] for m in names])
    at_top = sum(1 for m, f in zip(names, floors, strict=True) if held[m] == f + 1)
    return max(0, at_top - extras)


def left_home(groups: Sequence[str], roster: Roster, live: Roster) -> list[str]:
    """Groups whose home is live but which were placed elsewhere."""
    home = homes(groups, roster)
    result = assign(groups, live, roster)
    return [g for g in groups if home[g] in live and result[g] != home[g]]


def extra_bound(n_groups: int) -> float:
    """Largest tolerated number of moves beyond the optimum for one leave or join (no roster).

    Measured with 40,000 random leaves and joins (G <= 250 groups, 2..40 members; equal
    weights, weights 1..5, and weights 1..100): the extra was 0.45*sqrt(G) on average, 1.4 *
    sqrt(G) at the 99.9th percentile and 2.12*sqrt(G) at worst (16 extra moves, G = 57,
    39 members); 4,000 hypothesis examples per movement test stayed under this bound too.
    The bound leaves headroom above that worst case; the seeded test below holds the
    average far tighter.
    """
    return 2.5 * math.sqrt(n_groups) + 3


def leave_extra(groups: Sequence[str], members: Mapping[str, int], leaver: str) -> int:
    """Groups that changed owner although their owner stayed (optimum: zero of them)."""
    before = assign(groups, members)
    after = assign(groups, {m: w for m, w in members.items() if m != leaver})
    return sum(1 for g in groups if before[g] != leaver and before[g] != after[g])


def join_extra(groups: Sequence[str], members: Mapping[str, int], joiner: str, weight: int) -> int:
    """Groups that changed owner but not to the joiner (optimum: zero of them)."""
    before = assign(groups, members)
    after = assign(groups, {**members, joiner: weight})
    return sum(1 for g in groups if after[g] != joiner and before[g] != after[g])


# --- I4: determinism -------------------------------------------------------------------------


@settings(deadline=None, max_examples=300)
@given(GROUPS, rostered(ANY_WEIGHT), st.data())
def test_input_order_does_not_matter(
    groups: list[str], case: tuple[Roster, Roster], data: st.DataObject
) -> None:
    roster, live = case
    shuffled_groups = data.draw(st.permutations(groups))
    shuffled_live = dict(data.draw(st.permutations(list(live.items()))))
    shuffled_roster = dict(data.draw(st.permutations(list(roster.items()))))
    expected = assign(groups, live, roster)
    got = assign(shuffled_groups, shuffled_live, shuffled_roster)
    assert list(got.items()) == list(expected.items())  # same mapping, same (name) order


def test_independent_of_python_hash_seed() -> None:
    # hash() of str is salted per process; a stray set/dict iteration would show up here.
    groups = [f"www{i}" for i in range(40)]
    roster = {f"n{i}": 1 + i % 3 for i in range(9)}
    live = {m: w for m, w in roster.items() if m not in {"n2", "n7"}}
    code = (
        "import json, sys; from vipd.placement.assign import assign; "
        "g, m, r = json.load(sys.stdin); print(json.dumps([assign(g, m), assign(g, m, r)]))"
    )
    expected = [assign(groups, live), assign(groups, live, roster)]
    for seed in ("1", "2"):
        proc = subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps([groups, live, roster]),
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        assert json.loads(proc.stdout) == expected


def test_known_answer() -> None:
    # Pinned output: nodes running different vipd versions must agree on owners, so a change
    # here (hash, mixer, -ln, tie rules) is a cluster-wide compatibility break. Change it only
    # together with a protocol/config version bump. These are phase 1 (the whole roster live),
    # unchanged since placement became two-phase.
    groups = [f"www{i}" for i in range(1, 11)]
    cases: list[tuple[Roster, dict[str, str]]] = [
        (
            {"n1": 1, "n2": 1, "n3": 1},
            {
                "www1": "n1",
                "www10": "n2",
                "www2": "n2",
                "www3": "n3",
                "www4": "n3",
                "www5": "n1",
                "www6": "n1",
                "www7": "n3",
                "www8": "n2",
                "www9": "n2",
            },
        ),
        (
            {"n1": 1, "n2": 2, "n3": 1, "n4": 3},
            {
                "www1": "n1",
                "www10": "n4",
                "www2": "n2",
                "www3": "n3",
                "www4": "n3",
                "www5": "n4",
                "www6": "n4",
                "www7": "n4",
                "www8": "n2",
                "www9": "n2",
            },
        ),
        # Picked because ranking with unweighted scores (quotas alone) gives another answer.
        (
            {"n1": 1, "n2": 1, "n3": 5},
            {
                "www1": "n3",
                "www10": "n3",
                "www2": "n2",
                "www3": "n3",
                "www4": "n3",
                "www5": "n1",
                "www6": "n3",
                "www7": "n3",
                "www8": "n2",
                "www9": "n3",
            },
        ),
    ]
    for roster, expected in cases:
        assert assign(groups, roster) == expected
        assert assign(groups, roster, roster) == expected


def test_known_answer_two_phase() -> None:
    # Pinned like the above, for the orphan placement and the give-back rule of phase 2.
    groups = [f"www{i}" for i in range(1, 11)]
    roster = {"n1": 1, "n2": 1, "n3": 1, "n4": 1}
    full = {
        "www1": "n1",
        "www10": "n4",
        "www2": "n2",
        "www3": "n3",
        "www4": "n3",
        "www5": "n4",
        "www6": "n1",
        "www7": "n4",
        "www8": "n2",
        "www9": "n2",
    }
    assert assign(groups, roster, roster) == full
    # n2 dies: only www2, www8, www9 move; the live set alone would also move www1 and www6.
    no_n2 = {"n1": 1, "n3": 1, "n4": 1}
    assert assign(groups, no_n2, roster) == {**full, "www2": "n3", "www8": "n1", "www9": "n1"}
    plain = assign(groups, no_n2)
    assert {g for g in groups if full[g] != "n2" and plain[g] != full[g]} == {"www1", "www6"}

    # Unequal weights. n1 holds nothing, yet when it dies the live quotas are n2 2, n3 4, n4 3
    # with one extra: n2 (3 home groups) and n4 (4) cannot both keep floor + 1, and n3 must
    # get a fourth group. n4's worst home group scores worse than n2's, so www6 goes to n3.
    roster = {"n1": 1, "n2": 3, "n3": 5, "n4": 4}
    full = {
        "www1": "n2",
        "www10": "n4",
        "www2": "n2",
        "www3": "n3",
        "www4": "n3",
        "www5": "n4",
        "www6": "n4",
        "www7": "n4",
        "www8": "n2",
        "www9": "n3",
    }
    assert assign(groups, roster, roster) == full
    assert assign(groups, {"n2": 3, "n3": 5, "n4": 4}, roster) == {**full, "www6": "n3"}


@settings(deadline=None)
@given(GROUPS, rostered(WEIGHTS), st.integers(2, 50))
def test_scaling_all_weights_changes_nothing(
    groups: list[str], case: tuple[Roster, Roster], factor: int
) -> None:
    roster, live = case
    scaled_roster = {m: w * factor for m, w in roster.items()}
    scaled_live = {m: w * factor for m, w in live.items()}
    assert assign(groups, scaled_live, scaled_roster) == assign(groups, live, roster)


def test_phase_one_is_computed_once_per_pool_and_roster() -> None:
    groups = [f"www{i}" for i in range(50)]
    roster = {f"n{i}": 1 + i % 2 for i in range(6)}
    _homes.cache_clear()
    assign(groups, roster, roster)
    assign(list(reversed(groups)), {"n1": 2, "n4": 1}, dict(reversed(roster.items())))
    info = _homes.cache_info()
    assert (info.misses, info.hits) == (1, 1)


# --- coverage -------------------------------------------------------------------------------


@settings(deadline=None, max_examples=300)
@given(GROUPS, rostered(ANY_WEIGHT))
def test_every_group_gets_exactly_one_live_member(
    groups: list[str], case: tuple[Roster, Roster]
) -> None:
    roster, live = case
    result = assign(groups, live, roster)
    assert set(result) == set(groups)
    assert set(result.values()) <= set(live)


@given(GROUPS, ANY_MEMBERS)
def test_no_members_no_placement(groups: list[str], roster: Roster) -> None:
    assert assign(groups, {}) == {}
    assert assign(groups, {}, roster) == {}


@given(GROUPS, NAMES, WEIGHTS, ANY_MEMBERS)
def test_a_single_member_gets_everything(
    groups: list[str], name: str, weight: int, others: Roster
) -> None:
    assert assign(groups, {name: weight}) == dict.fromkeys(groups, name)
    roster = {**others, name: weight}
    assert assign(groups, {name: weight}, roster) == dict.fromkeys(groups, name)


def test_no_groups_no_placement() -> None:
    assert assign([], {"n1": 1, "n2": 5}) == {}
    assert assign([], {"n1": 1}, {"n1": 1, "n2": 5}) == {}


def test_large_pool_is_covered_and_balanced() -> None:
    groups = [f"pool-{i:04d}" for i in range(1000)]
    roster = {f"node{i:02d}": 1 for i in range(32)}
    per_member = counts(assign(groups, roster, roster), roster)
    assert sum(per_member.values()) == 1000
    assert set(per_member.values()) == {31, 32}  # 1000 = 32*31 + 8: eight members hold 32
    live = {m: 1 for m in list(roster)[3:]}
    per_member = counts(assign(groups, live, roster), live)
    assert sum(per_member.values()) == 1000
    assert set(per_member.values()) == {34, 35}  # 1000 = 29*34 + 14


@settings(deadline=None)
@given(GROUPS, rostered(ANY_WEIGHT), st.dictionaries(NAMES, WEIGHTS, min_size=1, max_size=3))
def test_live_members_missing_from_the_roster_join_it(
    groups: list[str], case: tuple[Roster, Roster], strangers: Roster
) -> None:
    roster, live = case
    assume(not set(strangers) & set(roster))
    result = assign(groups, {**live, **strangers}, roster)
    assert result == assign(groups, {**live, **strangers}, {**roster, **strangers})
    assert set(result.values()) <= set(live) | set(strangers)


@settings(deadline=None)
@given(GROUPS, rostered(WEIGHTS), st.data())
def test_live_weights_that_disagree_with_the_roster_still_balance(
    groups: list[str], case: tuple[Roster, Roster], data: st.DataObject
) -> None:
    roster, live = case
    reweighed = {m: data.draw(WEIGHTS) for m in live}
    result = assign(groups, reweighed, roster)
    total = sum(reweighed.values())
    for member, held in counts(result, reweighed).items():
        floor = len(groups) * reweighed[member] // total
        assert floor <= held <= floor + 1


def test_a_member_far_over_its_live_quota_gives_back_its_worst_groups() -> None:
    # Only reachable when the live weights disagree with the roster: phase 1 gives "a" ten of
    # eleven groups, the live quotas are 5 and 5 plus one extra.
    groups = [f"www{i}" for i in range(11)]
    roster = {"a": 10, "b": 1}
    home = homes(groups, roster)
    result = assign(groups, {"a": 1, "b": 1}, roster)
    assert sorted(counts(result, roster).values()) == [5, 6]
    assert all(result[g] == "b" for g in groups if home[g] == "b")


# --- I5: balance ----------------------------------------------------------------------------


@settings(deadline=None, max_examples=300)
@given(GROUPS, rostered(st.just(1)))
def test_equal_weights_counts_differ_by_at_most_one(
    groups: list[str], case: tuple[Roster, Roster]
) -> None:
    roster, live = case
    per_member = counts(assign(groups, live, roster), live)
    assert max(per_member.values()) - min(per_member.values()) <= 1


@settings(deadline=None, max_examples=300)
@given(GROUPS, rostered(WEIGHTS))
def test_weighted_counts_are_the_floor_share_or_one_more(
    groups: list[str], case: tuple[Roster, Roster]
) -> None:
    roster, live = case
    total = sum(live.values())
    per_member = counts(assign(groups, live, roster), live)
    for member, weight in live.items():
        share = len(groups) * weight / total
        floor = len(groups) * weight // total
        assert floor <= per_member[member] <= floor + 1
        assert abs(per_member[member] - share) <= 1


def test_quotas_hand_out_exactly_the_remainder() -> None:
    assert quotas(10, [1, 1, 1]) == ([3, 3, 3], 1)
    assert quotas(10, [1, 2, 1, 3]) == ([1, 2, 1, 4], 2)
    assert quotas(2, [1, 1000]) == ([0, 1], 1)
    assert quotas(0, [4, 4]) == ([0, 0], 0)


# --- I6: minimal movement, two-phase (with a roster) ------------------------------------------


@settings(deadline=None, max_examples=200)
@given(GROUPS, ANY_MEMBERS)
def test_whole_roster_live_is_phase_one(groups: list[str], roster: Roster) -> None:
    assert assign(groups, roster, roster) == homes(groups, roster)


@settings(deadline=None, max_examples=300)
@given(SOME_GROUPS, member_sets(ANY_WEIGHT, least=2), st.data())
def test_leave_from_full_moves_the_leavers_groups_and_what_balance_forces(
    groups: list[str], roster: Roster, data: st.DataObject
) -> None:
    leaver = data.draw(st.sampled_from(sorted(roster)))
    live = {m: w for m, w in roster.items() if m != leaver}
    before = assign(groups, roster, roster)
    after = assign(groups, live, roster)
    extra = [g for g in groups if before[g] != leaver and after[g] != before[g]]
    if len(set(roster.values())) == 1:
        assert extra == []
    else:
        assert len(extra) == must_give_back(groups, roster, live)
    # Each extra mover is its home member's one surplus group.
    assert len({before[g] for g in extra}) == len(extra)
    # The return restores the placement, so exactly the groups that left come back. (This also
    # fails if phase 2 ever wrote into the memoised phase 1.)
    back = assign(groups, roster, roster)
    assert back == before
    assert {g for g in groups if back[g] != after[g]} == {
        g for g in groups if before[g] != after[g]
    }


@settings(deadline=None, max_examples=300)
@given(SOME_GROUPS, rostered(ANY_WEIGHT, dead=2))
def test_with_several_dead_live_homes_stay_unless_balance_forces(
    groups: list[str], case: tuple[Roster, Roster]
) -> None:
    roster, live = case
    home = homes(groups, roster)
    result = assign(groups, live, roster)
    held = counts(home, roster)
    names = sorted(live)
    floors, _ = quotas(len(groups), [live[m] for m in names])
    floor = dict(zip(names, floors, strict=True))
    moved = left_home(groups, roster, live)
    for g in moved:
        # Only a member at floor + 1 may lose a home group, and then only one.
        assert held[home[g]] == floor[home[g]] + 1
    assert len({home[g] for g in moved}) == len(moved)
    assert len(moved) == must_give_back(groups, roster, live)
    if len(set(roster.values())) == 1:
        assert moved == []
    assert all(result[g] == home[g] for g in groups if home[g] in live and g not in moved)


@settings(deadline=None, max_examples=200)
@given(SOME_GROUPS, rostered(st.just(1), dead=1), st.data())
def test_second_leave_moves_only_the_leaver_and_orphans(
    groups: list[str], case: tuple[Roster, Roster], data: st.DataObject
) -> None:
    roster, live = case
    assume(len(live) >= 2)
    leaver = data.draw(st.sampled_from(sorted(live)))
    rest = {m: w for m, w in live.items() if m != leaver}
    home = homes(groups, roster)
    before = assign(groups, live, roster)
    after = assign(groups, rest, roster)
    for g in groups:
        if before[g] != after[g]:
            assert before[g] == leaver or home[g] not in rest, g


def test_orphans_shuffle_little_on_a_second_leave() -> None:
    # Deterministic sample (seeded): 60 rosters of 4..32 equal members, G 50..300, one member
    # dead, then a second one leaves. Extra = groups that move but were not the second
    # leaver's: all are orphans of the first dead member re-placed because live quotas moved.
    # Measured: mean extra = 0.45*sqrt(orphans after the second leave), worst 1.28 (the bench
    # shows about 8 extra over 32 required at G = 1000, N = 32). Keeping live homes but
    # dealing the orphans round-robin over live names scores 1.70 here.
    rng = random.Random(20240612)
    ratio = 0.0
    cases = 60
    for _ in range(cases):
        groups = list(
            dict.fromkeys(f"g{rng.getrandbits(32):08x}" for _ in range(rng.randint(50, 300)))
        )
        roster = {f"n{rng.getrandbits(32):08x}": 1 for _ in range(rng.randint(4, 32))}
        first, second = rng.sample(sorted(roster), 2)
        live = {m: 1 for m in roster if m != first}
        rest = {m: 1 for m in live if m != second}
        before = assign(groups, live, roster)
        after = assign(groups, rest, roster)
        home = homes(groups, roster)
        orphans = sum(1 for g in groups if home[g] not in rest)
        extra = sum(1 for g in groups if before[g] != second and before[g] != after[g])
        ratio += extra / math.sqrt(orphans)
    assert ratio / cases <= 0.7


# --- I6: minimal movement, live set alone (roster=None; the greedy of phase 1) ---------------


@settings(deadline=None, max_examples=200)
@given(GROUPS, ANY_MEMBERS.filter(lambda m: len(m) >= 2), st.data())
def test_leave_moves_little_beyond_the_leavers_groups(
    groups: list[str], members: dict[str, int], data: st.DataObject
) -> None:
    leaver = data.draw(st.sampled_from(sorted(members)))
    assert leave_extra(groups, members, leaver) <= extra_bound(len(groups))


@settings(deadline=None, max_examples=200)
@given(GROUPS, ANY_MEMBERS, NAMES, WEIGHTS, st.data())
def test_join_takes_its_share_and_little_else_moves(
    groups: list[str], members: dict[str, int], joiner: str, weight: int, data: st.DataObject
) -> None:
    assume(joiner not in members)
    equal = len(set(members.values())) == 1
    if equal and data.draw(st.booleans()):
        weight = next(iter(members.values()))  # mostly test the common all-equal case
    assert join_extra(groups, members, joiner, weight) <= extra_bound(len(groups))
    after = assign(groups, {**members, joiner: weight})
    share = len(groups) * weight // (sum(members.values()) + weight)
    assert share <= sum(1 for m in after.values() if m == joiner) <= share + 1


def test_average_extra_movement_stays_small() -> None:
    # Deterministic sample (seeded): 150 leaves and 150 joins, G 50..300, 4..32 members,
    # equal weights. Measured: mean extra = 0.553*sqrt(G) on leave, 0.556*sqrt(G) on join
    # (optimum = the leaver's groups / the joiner's new groups; at G = 1000, N = 32 that is
    # about 21 extra moves over 31 required). Round-robin over sorted names scores 10.7 and
    # 11.5 here, so this fails as soon as placement stops following stable per-pair scores.
    rng = random.Random(20240611)
    leave_ratio = join_ratio = 0.0
    cases = 150
    for _ in range(cases):
        n_groups = rng.randint(50, 300)
        groups = [f"g{rng.getrandbits(32):08x}" for _ in range(n_groups)]
        members = {f"n{rng.getrandbits(32):08x}": 1 for _ in range(rng.randint(4, 32))}
        groups = list(dict.fromkeys(groups))
        root = math.sqrt(len(groups))
        leave_ratio += leave_extra(groups, members, rng.choice(sorted(members))) / root
        join_ratio += join_extra(groups, members, f"j{rng.getrandbits(32):08x}", 1) / root
    assert leave_ratio / cases <= 0.65
    assert join_ratio / cases <= 0.65


# --- inputs and internals -------------------------------------------------------------------


@pytest.mark.parametrize("weight", [0, -1, True, 1.5, "2", None])
def test_bad_weight_is_refused(weight: object) -> None:
    with pytest.raises(ValueError, match="need an int >= 1"):
        assign(["www1"], {"n1": 1, "n2": weight})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="roster member 'n2' has weight"):
        assign(["www1"], {"n1": 1}, {"n1": 1, "n2": weight})  # type: ignore[dict-item]


def test_duplicate_group_is_refused() -> None:
    with pytest.raises(ValueError, match=r"duplicate group names \['www1'\]"):
        assign(["www1", "www2", "www1"], {"n1": 1})


def test_names_that_are_not_valid_utf8_still_place() -> None:
    # Lone surrogates cannot come from TOML, but placement must not crash on any str.
    assert assign(["www\ud800"], {"n\udfff": 1, "n2": 1})["www\ud800"] in {"n\udfff", "n2"}
    assert assign(["www\ud800"], {"n2": 1}, {"n\udfff": 1, "n2": 1}) == {"www\ud800": "n2"}


def test_fixed_point_ln_is_monotone_and_close() -> None:
    rng = random.Random(7)
    edges = [0, 1, 2, (1 << 63) - 1, 1 << 63, (1 << 63) + 1, (1 << 64) - 2, (1 << 64) - 1]
    for k in range(1, 64):
        edges += [(1 << 64) - (1 << k) - 1, (1 << 64) - (1 << k), (1 << 64) - (1 << k) + 1]
    samples = sorted({*edges, *(rng.getrandbits(64) for _ in range(20000))})
    values = [_neg_ln(h) for h in samples]
    assert all(a <= b for a, b in pairwise(values))
    for h, v in zip(samples, values, strict=True):
        exact = 64 * math.log(2) - math.log((1 << 64) - h)  # -ln((2**64 - h) / 2**64)
        assert abs(v / 2**64 - exact) < 2e-4, h
