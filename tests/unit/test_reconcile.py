"""Make-before-break handover decisions and the kernel action plan."""

from __future__ import annotations

import ipaddress

from vipd.config import PoolGroup
from vipd.placement.handover import ClaimAddress, HandoverPolicy, ReleaseAddress, plan

A = ipaddress.ip_interface("203.0.113.11/32")
B = ipaddress.ip_interface("203.0.113.12/32")
V6 = ipaddress.ip_interface("2001:db8:1::12/128")
POOL = (
    PoolGroup("www1", "eth0", (A,)),
    PoolGroup("www2", "eth0", (B, V6)),
)


def test_claims_what_is_ours_and_releases_pool_addresses_that_are_not() -> None:
    other = ipaddress.ip_interface("198.51.100.11/24")
    actions = plan(POOL, {"www2"}, {"eth0": {A, other}})
    assert actions == [
        ReleaseAddress("www1", "eth0", A, "not ours"),
        ClaimAddress("www2", "eth0", B),
        ClaimAddress("www2", "eth0", V6),
    ]  # the node's own address (not in the pool) is never touched


def test_wrong_prefix_is_replaced() -> None:
    wide = ipaddress.ip_interface("203.0.113.11/24")
    assert plan(POOL, {"www1"}, {"eth0": {wide}}) == [
        ReleaseAddress("www1", "eth0", wide, "prefix"),
        ClaimAddress("www1", "eth0", A),
    ]


def test_nothing_to_do_when_kernel_matches() -> None:
    assert plan(POOL, {"www1", "www2"}, {"eth0": {A, B, V6}}) == []


def test_group_moving_away_is_kept_until_the_new_owner_holds_it() -> None:
    policy = HandoverPolicy("n1", timeout=2.0)
    owners = {"www1": "n2", "www2": "n1"}
    seen = {"n2"}
    keep, done = policy.groups_to_hold(
        owners=owners, held={"www1", "www2"}, holders={"www1": set()}, observable=seen, now=10.0
    )
    assert keep == {"www1", "www2"} and done == []
    assert policy.next_deadline() == 12.0
    keep, done = policy.groups_to_hold(
        owners=owners, held={"www1", "www2"}, holders={"www1": {"n2"}}, observable=seen, now=10.1
    )
    assert keep == {"www2"}
    assert [(d.group, d.new_owner, d.how) for d in done] == [("www1", "n2", "confirmed")]
    assert policy.next_deadline() is None


def test_an_observable_new_owner_that_never_claims_leaves_no_hole() -> None:
    policy = HandoverPolicy("n1", timeout=2.0)
    args = {"owners": {"www1": "n2"}, "held": {"www1"}, "holders": {}, "observable": {"n2"}}
    policy.groups_to_hold(now=10.0, **args)  # type: ignore[arg-type]
    keep, done = policy.groups_to_hold(now=12.0, **args)  # type: ignore[arg-type]
    assert keep == {"www1"}
    assert [d.how for d in done] == ["stalled"]  # reported once, and kept
    assert policy.next_deadline() is None  # no busy timer while it waits
    keep, done = policy.groups_to_hold(now=20.0, **args)  # type: ignore[arg-type]
    assert keep == {"www1"} and done == []


def test_handover_times_out_when_the_new_owner_cannot_be_observed() -> None:
    policy = HandoverPolicy("n1", timeout=2.0)
    args = {"owners": {"www1": "n2"}, "held": {"www1"}, "holders": {}, "observable": set()}
    policy.groups_to_hold(now=10.0, **args)  # type: ignore[arg-type]
    keep, done = policy.groups_to_hold(now=11.9, **args)  # type: ignore[arg-type]
    assert keep == {"www1"} and done == []
    keep, done = policy.groups_to_hold(now=12.0, **args)  # type: ignore[arg-type]
    assert keep == frozenset() and [d.how for d in done] == ["timeout"]


def test_nobody_left_to_take_it() -> None:
    policy = HandoverPolicy("n1", timeout=2.0)
    keep, done = policy.groups_to_hold(
        owners={"www1": None}, held={"www1"}, holders={}, observable=set(), now=1.0
    )
    assert keep == frozenset() and done[0].how == "unowned"


def test_claims_never_wait() -> None:
    policy = HandoverPolicy("n1", timeout=2.0)
    keep, _ = policy.groups_to_hold(
        owners={"www1": "n1"}, held=set(), holders={}, observable=set(), now=1.0
    )
    assert keep == {"www1"}
