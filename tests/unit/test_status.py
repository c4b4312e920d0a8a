"""The typed status snapshot: its JSON shape, the parse back, and the builder over real cores."""

from __future__ import annotations

import copy
import json
from typing import Any, cast

import pytest

from tests.clusterkit import make_cluster
from tests.unit.test_core import Net
from vipd.membership.core import MembershipCore
from vipd.node.status import (
    CounterStatus,
    GroupOverride,
    GroupStatus,
    MemberStatus,
    MoveStatus,
    OverridesStatus,
    Status,
    ViewStatus,
    build_status,
)
from vipd.placement.controller import Controller
from vipd.placement.overrides import Move, Overrides
from vipd.vipctl import format_status

SMALL = Status(
    node="n1",
    cluster="web",
    incarnation=7,
    ready=True,
    mature=False,
    leaving=False,
    passive=False,
    holddown=True,
    holding="view",
    config_digest="0011",
    view=ViewStatus(digest="aabb", members=("n1", "n2")),
    members=(
        MemberStatus("n1", "self", 0.0, 7, ("ready",), True, "ff", False),
        MemberStatus("n2", "unknown", None, 0, (), False, None, True),
    ),
    pool=(
        GroupStatus(
            "www1", "eth0", ("203.0.113.11/32",), "n2", False, GroupOverride("n2", "move"), ()
        ),
        GroupStatus("www2", "eth1", (), None, True, None, ("n1", "n2")),
    ),
    overrides=OverridesStatus(
        version=3, issuer="n1", moves=(MoveStatus("www1", "n2", "move"),), drained=("n2",)
    ),
    counters=CounterStatus(
        plain={"rx_accepted": 5},
        rejected={"replay": 1},
        hooks={"run": 2},
        notify_sent=4,
        notify_dropped=1,
    ),
    announcements={"203.0.113.11": 9},
)

SMALL_JSON: dict[str, Any] = {
    "node": "n1",
    "cluster": "web",
    "incarnation": 7,
    "ready": True,
    "mature": False,
    "leaving": False,
    "passive": False,
    "holddown": True,
    "holding": "view",
    "config_digest": "0011",
    "view": {"digest": "aabb", "members": ["n1", "n2"]},
    "members": [
        {
            "name": "n1",
            "state": "self",
            "age": 0.0,
            "incarnation": 7,
            "flags": ["ready"],
            "config_digest_ok": True,
            "pool_digest": "ff",
            "drained": False,
        },
        {
            "name": "n2",
            "state": "unknown",
            "age": None,
            "incarnation": 0,
            "flags": [],
            "config_digest_ok": False,
            "pool_digest": None,
            "drained": True,
        },
    ],
    "pool": [
        {
            "group": "www1",
            "interface": "eth0",
            "addresses": ["203.0.113.11/32"],
            "owner": "n2",
            "held_here": False,
            "override": {"node": "n2", "reason": "move"},
            "prefer": [],
        },
        {
            "group": "www2",
            "interface": "eth1",
            "addresses": [],
            "owner": None,
            "held_here": True,
            "override": None,
            "prefer": ["n1", "n2"],
        },
    ],
    "overrides": {
        "version": 3,
        "issuer": "n1",
        "moves": [{"group": "www1", "node": "n2", "reason": "move"}],
        "drained": ["n2"],
    },
    "counters": {
        "rx_accepted": 5,
        "rejected": {"replay": 1},
        "hooks": {"run": 2},
        "notify_sent": 4,
        "notify_dropped": 1,
    },
    "announcements": {"203.0.113.11": 9},
}


def _types(v: object) -> object:
    """The value with every leaf replaced by its type: `==` alone says 1 == 1.0 == True."""
    if isinstance(v, dict):
        return {k: _types(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_types(x) for x in v]
    return type(v)


def test_to_json_shape_is_pinned() -> None:
    out = SMALL.to_json()
    assert out == SMALL_JSON
    assert _types(out) == _types(SMALL_JSON)  # lists not tuples, None where None
    assert list(out["counters"]) == [
        "rx_accepted",
        "rejected",
        "hooks",
        "notify_sent",
        "notify_dropped",
    ]


def test_round_trip_is_exact_through_json_text() -> None:
    text = json.dumps(SMALL.to_json())
    back = Status.from_json(json.loads(text))
    assert back == SMALL
    assert json.dumps(back.to_json()) == text


def test_from_json_names_a_missing_pool() -> None:
    reply = copy.deepcopy(SMALL_JSON)
    del reply["pool"]
    with pytest.raises(ValueError, match="missing key 'pool'"):
        Status.from_json(reply)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["members"][1].pop("age"), "missing key 'members[1].age'"),
        (lambda d: d["members"][0].update(age="soon"), "'members[0].age' must be a number"),
        (lambda d: d.update(ready=1), "'ready' must be true or false"),
        (lambda d: d.update(incarnation=True), "'incarnation' must be an integer"),
        (lambda d: d["counters"].pop("hooks"), "missing key 'counters.hooks'"),
        (lambda d: d["counters"].update(claims="x"), "'counters.claims' must be an integer"),
        (lambda d: d["pool"][0]["override"].pop("node"), "'pool[0].override.node'"),
        (lambda d: d.update(view=[]), "'view' must be an object"),
        (lambda d: d["overrides"].update(moves={}), "'overrides.moves' must be a list"),
    ],
)
def test_from_json_names_the_bad_key(mutate: Any, message: str) -> None:
    reply = copy.deepcopy(SMALL_JSON)
    mutate(reply)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Status.from_json(reply)


def test_from_json_refuses_a_non_object() -> None:
    with pytest.raises(ValueError, match="'status' must be an object"):
        Status.from_json(["not", "a", "status"])


def test_the_snapshot_cannot_be_changed_through_a_caller_dict() -> None:
    plain = {"rx_accepted": 1}
    c = CounterStatus(plain=plain, rejected={}, hooks={}, notify_sent=0, notify_dropped=0)
    plain["rx_accepted"] = 99
    assert c.plain == {"rx_accepted": 1}
    assert c.value("rx_accepted") == 1 and c.value("claims") == 0 and c.value("notify_sent") == 0


class FakeCounters:
    """What `build_status` reads from `vipd.counters.Counters`."""

    def __init__(self, core: MembershipCore) -> None:
        self.core = core

    def as_dict(self) -> dict[str, int]:
        return self.core.counters.as_dict()

    def rejected(self) -> dict[str, int]:
        return dict(self.core.rejected)


def _flag_names(flags: Any) -> list[str]:
    return [f.name.lower() for f in type(flags) if f.value and f in flags and f.name]


def reference_status(
    core: MembershipCore, controller: Controller, held: frozenset[str], now: float
) -> dict[str, Any]:
    """`Daemon.status()` as it was before the typed snapshot (hook/notify/frames fixed)."""
    config = core.config
    owners = controller.owners(core)
    table = core.overrides
    members: list[dict[str, Any]] = [
        {
            "name": core.name,
            "state": "self",
            "age": 0.0,
            "incarnation": core.incarnation,
            "flags": _flag_names(core.flags),
            "config_digest_ok": True,
            "pool_digest": config.pool_digest.hex(),
            "drained": core.draining,
        }
    ]
    for p in core.peers.values():
        members.append(
            {
                "name": p.name,
                "state": p.state.value,
                "age": None if p.last_heard is None else round(now - p.last_heard, 3),
                "incarnation": p.incarnation,
                "flags": _flag_names(p.flags),
                "config_digest_ok": p.config_ok,
                "pool_digest": p.pool_digest.hex() if p.pool_digest else None,
                "drained": p.name in table.drained,
            }
        )
    return {
        "node": core.name,
        "cluster": config.cluster,
        "incarnation": core.incarnation,
        "ready": core.ready,
        "mature": core.mature,
        "leaving": core.leaving,
        "passive": core.config_passive,
        "holddown": core.holddown_until is not None,
        "holding": "quorum",
        "config_digest": core.config_digest.hex(),
        "view": {"digest": core.view.digest_hex, "members": list(core.view.members)},
        "members": members,
        "pool": [
            {
                "group": g.name,
                "interface": g.interface,
                "addresses": [str(a) for a in g.addresses],
                "owner": owners.get(g.name),
                "held_here": g.name in held,
                "override": (
                    {"node": m.target, "reason": m.reason}
                    if (m := table.move_of(g.name)) is not None
                    else None
                ),
                "prefer": list(g.prefer),
            }
            for g in config.pool
        ],
        "overrides": {
            "version": table.version,
            "issuer": table.issuer,
            "moves": [
                {"group": m.group, "node": m.target, "reason": m.reason} for m in table.moves
            ],
            "drained": list(table.drained),
        },
        "counters": {
            **core.counters.as_dict(),
            "rejected": dict(core.rejected),
            "hooks": {"run": 3, "failed": 0},
            "notify_sent": 2,
            "notify_dropped": 1,
        },
        "announcements": {"203.0.113.11/32": 6},
    }


def test_build_status_matches_the_old_daemon_dict() -> None:
    nodes = make_cluster(3, groups=3)
    net = Net(nodes, start=["n1", "n2"])  # n3 never heard: age None, no pool digest
    net.run(3.0)
    core = net.cores["n1"]
    core.overrides = Overrides(
        version=2, issuer="n2", moves=(Move("www1", "n2", "move"),), drained=("n3",)
    )
    controller = Controller(nodes["n1"].config)
    held = frozenset({"www2"})
    status = build_status(
        core=core,
        controller=controller,
        config=nodes["n1"].config,
        # Duck-typed stand-in: build_status reads only as_dict() and rejected().
        counters=cast(Any, FakeCounters(core)),
        held=held,
        hold_reason="quorum",
        hook_counters={"run": 3, "failed": 0},
        notify_sent=2,
        notify_dropped=1,
        frames_sent={"203.0.113.11/32": 6},
        now=net.now,
    )
    expected = reference_status(core, controller, held, net.now)
    assert status.to_json() == expected
    assert _types(status.to_json()) == _types(expected)
    assert Status.from_json(json.loads(json.dumps(expected))) == status
    assert {m.name: m.state for m in status.members} == {
        "n1": "self",
        "n2": "alive",
        "n3": "unknown",
    }
    assert status.pool[0].override == GroupOverride("n2", "move")


def test_vipctl_renders_the_typed_snapshot() -> None:
    text = format_status(SMALL)
    assert text.splitlines()[0] == "node n1  cluster web  ready  view aabb (2: n1 n2)"
    assert "n2      unknown  -" in text
    assert "move -> n2" in text and "prefer n1,n2" in text
    assert "drained" in text and "MISMATCH" in text
    assert text.endswith("rejected datagrams: replay=1\noperator table: version 3 by n1")
