"""DefendPolicy: answer at once, then at most once per interval, and the last word is ours."""

from __future__ import annotations

import ipaddress
import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vipd.node.defend import DefendPolicy

A = ipaddress.IPv4Address("203.0.113.10")
B = ipaddress.IPv4Address("203.0.113.11")
A6 = ipaddress.IPv6Address("2001:db8:1::10")


def test_first_conflict_is_answered_at_once() -> None:
    p = DefendPolicy(1.0)
    assert p.on_conflict(A, 10.0) == 10.0


def test_conflict_after_a_whole_interval_is_answered_at_once() -> None:
    p = DefendPolicy(1.0)
    p.defended(A, 10.0)
    assert p.on_conflict(A, 11.0) == 11.0  # exactly one interval later counts
    p.defended(A, 11.0)
    assert p.on_conflict(A, 15.5) == 15.5


def test_two_conflicts_inside_one_interval_give_exactly_one_deferred_defence() -> None:
    p = DefendPolicy(1.0)
    assert p.on_conflict(A, 0.0) == 0.0
    p.defended(A, 0.0)
    assert p.on_conflict(A, 0.3) == 1.0  # deferred to the end of the interval, not dropped
    assert p.on_conflict(A, 0.6) is None  # covered by the defence at 1.0
    assert p.on_conflict(A, 0.999) is None
    assert p.pending(A) == 1.0


def test_after_the_deferred_defence_fires_the_next_conflict_gets_the_next_one() -> None:
    p = DefendPolicy(1.0)
    p.on_conflict(A, 0.0)
    p.defended(A, 0.0)
    assert p.on_conflict(A, 0.3) == 1.0
    p.defended(A, 1.0)
    assert p.pending(A) is None
    assert p.on_conflict(A, 1.2) == 2.0  # its own deferred defence, one interval later
    assert p.on_conflict(A, 1.5) is None
    p.defended(A, 2.0)
    assert p.on_conflict(A, 3.5) == 3.5  # quiet for an interval: at once again


def test_an_immediate_answer_is_pending_until_reported() -> None:
    # A second frame before the first answer went out is covered by that answer.
    p = DefendPolicy(1.0)
    assert p.on_conflict(A, 5.0) == 5.0
    assert p.on_conflict(A, 5.0) is None
    p.defended(A, 5.0)
    assert p.on_conflict(A, 5.1) == 6.0


def test_any_announcement_counts_as_the_last_word() -> None:
    # A claim or refresh announcement just went out: a conflict right after waits.
    p = DefendPolicy(2.0)
    p.defended(A, 100.0)
    assert p.on_conflict(A, 100.5) == 102.0


def test_a_defence_sent_early_clears_the_pending_one() -> None:
    p = DefendPolicy(1.0)
    p.defended(A, 0.0)
    assert p.on_conflict(A, 0.5) == 1.0
    p.defended(A, 0.7)  # e.g. a refresh went out first: the conflict is answered
    assert p.pending(A) is None
    assert p.on_conflict(A, 0.8) == 1.7


def test_a_lost_promise_expires_after_a_whole_interval() -> None:
    p = DefendPolicy(1.0)
    p.defended(A, 0.0)
    assert p.on_conflict(A, 0.5) == 1.0
    assert p.on_conflict(A, 1.9) is None  # the timer may just be late
    assert p.on_conflict(A, 2.0) == 2.0  # a whole interval overdue: answered afresh


def test_addresses_are_independent() -> None:
    p = DefendPolicy(1.0)
    p.defended(A, 0.0)
    assert p.on_conflict(A, 0.5) == 1.0
    assert p.on_conflict(B, 0.5) == 0.5
    assert p.on_conflict(A6, 0.6) == 0.6


def test_forget_drops_the_state() -> None:
    p = DefendPolicy(1.0)
    p.defended(A, 0.0)
    assert p.on_conflict(A, 0.5) == 1.0
    p.forget(A)
    assert len(p) == 0
    assert p.pending(A) is None
    assert p.on_conflict(A, 0.6) == 0.6  # a fresh claim starts afresh
    p.forget(B)  # never seen: fine


def test_interfaces_and_addresses_are_the_same_key() -> None:
    # The daemon reports defences for its pool entries (interfaces with a prefix) and gets
    # conflicts for the bare addresses of sightings.
    p = DefendPolicy(1.0)
    p.defended(ipaddress.IPv4Interface("203.0.113.10/24"), 0.0)
    assert p.on_conflict(A, 0.5) == 1.0
    p.forget(ipaddress.IPv4Interface("203.0.113.10/32"))
    assert len(p) == 0


def test_zero_interval_answers_every_conflict_at_once() -> None:
    p = DefendPolicy(0.0)
    assert p.on_conflict(A, 1.0) == 1.0
    assert p.on_conflict(A, 1.0) == 1.0  # no limit: even before the first was reported
    p.defended(A, 1.0)
    assert p.on_conflict(A, 1.0) == 1.0


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_interval_must_be_finite_and_not_negative(bad: float) -> None:
    with pytest.raises(ValueError, match="defend interval"):
        DefendPolicy(bad)


@settings(max_examples=500, deadline=None)
@given(
    st.floats(0.01, 10.0),
    st.lists(st.tuples(st.floats(0.0, 5.0), st.sampled_from([A, B])), max_size=60),
)
def test_schedule_properties(
    interval: float, gaps: list[tuple[float, ipaddress.IPv4Address]]
) -> None:
    """A caller that carries out every answer when due, against any stream of conflicts:

    * at most one answer is outstanding per address;
    * answers of one address are at least `interval` apart;
    * every conflict is followed by an answer at or after it (the last word is ours).
    """
    p = DefendPolicy(interval)
    now = 0.0
    due: dict[ipaddress.IPv4Address, float] = {}
    sent: dict[ipaddress.IPv4Address, list[float]] = {A: [], B: []}
    last_conflict: dict[ipaddress.IPv4Address, float] = {}

    def run_until(t: float) -> None:
        for addr, at in sorted(due.items(), key=lambda kv: kv[1]):
            if at <= t:
                sent[addr].append(at)
                p.defended(addr, at)
                del due[addr]

    for gap, addr in gaps:
        now += gap
        run_until(now)
        last_conflict[addr] = now
        answer = p.on_conflict(addr, now)
        if answer is not None:
            assert addr not in due
            assert answer >= now
            due[addr] = answer
            if answer == now:
                run_until(now)
        else:
            assert addr in due
    run_until(math.inf)
    for addr, times in sent.items():
        assert all(b - a >= interval - 1e-9 for a, b in itertools.pairwise(times))
        if addr in last_conflict:
            assert times and times[-1] >= last_conflict[addr]
