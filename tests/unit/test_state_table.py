"""Every (MemberState, Signal) pair is decided: either a transition in NEXT, or in UNCHANGED."""

from __future__ import annotations

import itertools

import pytest

from vipd.membership.states import NEXT, UNCHANGED, MemberState, Signal, next_state

ALL_PAIRS = list(itertools.product(MemberState, Signal))


def label(pair: tuple[MemberState, Signal]) -> str:
    state, signal = pair
    return f"({state.name}, {signal.name})"


def test_every_pair_is_decided_exactly_once() -> None:
    missing = [label(p) for p in ALL_PAIRS if p not in NEXT and p not in UNCHANGED]
    both = [label(p) for p in ALL_PAIRS if p in NEXT and p in UNCHANGED]
    assert not missing, (
        f"pairs in neither NEXT nor UNCHANGED: {', '.join(missing)}; decide each one in "
        f"vipd/membership/states.py"
    )
    assert not both, f"pairs in both NEXT and UNCHANGED: {', '.join(both)}"


def test_tables_hold_only_real_pairs() -> None:
    valid = set(ALL_PAIRS)
    assert set(NEXT) <= valid
    assert set(UNCHANGED) <= valid


@pytest.mark.parametrize("pair", sorted(NEXT), ids=label)
def test_next_state_follows_next(pair: tuple[MemberState, Signal]) -> None:
    assert next_state(*pair) == NEXT[pair]


@pytest.mark.parametrize("pair", sorted(UNCHANGED), ids=label)
def test_next_state_keeps_unchanged(pair: tuple[MemberState, Signal]) -> None:
    state, signal = pair
    assert next_state(state, signal) == state
