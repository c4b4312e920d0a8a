"""The wire enums are append-only: every (name, value) ever shipped is pinned here.

Flag bits and TLV types go on the wire to nodes of other versions; Reject values are metric
label values. Changing or dropping a shipped member breaks peers or dashboards, so that fails
here. Adding a member is fine, but it must be added to the pinned table below too.
"""

from __future__ import annotations

import enum

import pytest

from vipd.membership.wire import TLV, Flag, Reject

PINNED_FLAG: list[tuple[str, int]] = [
    ("NONE", 0),
    ("JOINING", 1),
    ("READY", 2),
    ("DRAINING", 4),
    ("LEAVING", 8),
    ("HOLDDOWN", 16),
    ("EPHEMERAL", 32),
    ("DUPLICATE", 64),
]

PINNED_TLV: list[tuple[str, int]] = [
    ("VIEW_DIGEST", 1),
    ("CONFIG_DIGEST", 2),
    ("HELD", 3),
    ("STATS", 4),
    ("OVERRIDES", 5),
    ("RELEASED", 6),
    ("POOL_DIGEST", 7),
    ("SIGNED_OVERRIDES", 8),
    ("NONCE", 9),
]

PINNED_REJECT: list[tuple[str, str]] = [
    ("OVERSIZED", "oversized"),
    ("TRUNCATED", "truncated"),
    ("MALFORMED", "malformed"),
    ("BAD_MAGIC", "bad_magic"),
    ("BAD_VERSION", "bad_version"),
    ("WRONG_CLUSTER", "wrong_cluster"),
    ("UNKNOWN_SENDER", "unknown_sender"),
    ("OWN_NAME", "own_name"),
    ("UNKNOWN_KEY", "unknown_key"),
    ("BAD_SIGNATURE", "bad_signature"),
    ("REPLAY", "replay"),
    ("STALE", "stale"),
    ("SOURCE_NOT_ALLOWED", "source_not_allowed"),
    ("RATE_LIMITED", "rate_limited"),
    ("DUPLICATE", "duplicate"),
    ("DUPLICATE_NODE", "duplicate_node"),
]

CASES = [
    pytest.param(Flag, PINNED_FLAG, id="Flag"),
    pytest.param(TLV, PINNED_TLV, id="TLV"),
    pytest.param(Reject, PINNED_REJECT, id="Reject"),
]


def members(cls: type[enum.Enum]) -> dict[str, object]:
    # __members__ includes aliases and, for IntFlag, every declared member (not just single bits).
    return {name: m.value for name, m in cls.__members__.items()}


@pytest.mark.parametrize(("cls", "pinned"), CASES)
def test_pinned_table_is_itself_consistent(
    cls: type[enum.Enum], pinned: list[tuple[str, object]]
) -> None:
    names = [n for n, _ in pinned]
    values = [v for _, v in pinned]
    assert len(set(names)) == len(names), f"{cls.__name__}: duplicate name in the pinned table"
    assert len(set(values)) == len(values), f"{cls.__name__}: duplicate value in the pinned table"


@pytest.mark.parametrize(("cls", "pinned"), CASES)
def test_shipped_members_unchanged(cls: type[enum.Enum], pinned: list[tuple[str, object]]) -> None:
    actual = members(cls)
    problems = []
    for name, value in pinned:
        if name not in actual:
            problems.append(f"{name} = {value!r} was removed")
        elif actual[name] != value:
            problems.append(f"{name} changed from {value!r} to {actual[name]!r}")
    assert not problems, (
        f"{cls.__name__} is APPEND-ONLY (it goes on the wire or into metric labels): a shipped "
        f"member is never renumbered, renamed, reused or removed; keep it (reserved if retired) "
        f"and give new members new values. Problems: {'; '.join(problems)}"
    )


@pytest.mark.parametrize(("cls", "pinned"), CASES)
def test_no_unpinned_members(cls: type[enum.Enum], pinned: list[tuple[str, object]]) -> None:
    pinned_names = {n for n, _ in pinned}
    pinned_values = {v for _, v in pinned}
    new = {n: v for n, v in members(cls).items() if n not in pinned_names}
    reused = {n: v for n, v in new.items() if v in pinned_values}
    assert not reused, (
        f"{cls.__name__} is APPEND-ONLY: {reused} reuse values already shipped under another "
        f"name; give new members new values"
    )
    assert not new, (
        f"{cls.__name__} has new members {new}: if they are meant to ship, append them to the "
        f"pinned table in tests/unit/test_wire_enums.py (their values are then fixed for good)"
    )
