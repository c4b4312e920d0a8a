"""The status snapshot: one typed tree that `vipctl status`, the control socket and the
Prometheus exporter all read.

Pure: no IO. `build_status` reads the membership core, the placement controller and the
config; `Status.to_json` gives the JSON shape the control socket serves (and `vipctl status
--json` prints); `Status.from_json` parses it back, raising `ValueError` naming the missing or
bad key, since vipctl receives it over a socket.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from vipd.config import Config
from vipd.membership.core import MembershipCore
from vipd.membership.wire import Flag
from vipd.placement.controller import Controller

if TYPE_CHECKING:
    from vipd.counters import Counters

T = TypeVar("T")

#: Keys of the "counters" object that are not plain counters.
_COUNTER_EXTRAS = ("rejected", "hooks", "notify_sent", "notify_dropped")


def _frozen_map(m: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType(dict(m))


@dataclass(frozen=True)
class ViewStatus:
    digest: str  # hex
    members: tuple[str, ...]


@dataclass(frozen=True)
class MemberStatus:
    name: str
    state: str  # "self" for this node, else a MemberState value
    age: float | None  # seconds since last heard; None if never heard
    incarnation: int
    flags: tuple[str, ...]  # lower-case Flag names
    config_digest_ok: bool
    pool_digest: str | None  # hex; None if the peer has not advertised one
    drained: bool


@dataclass(frozen=True)
class GroupOverride:
    """An operator move (or reload pin) on one group."""

    node: str
    reason: str


@dataclass(frozen=True)
class GroupStatus:
    group: str
    interface: str
    addresses: tuple[str, ...]
    owner: str | None
    held_here: bool
    override: GroupOverride | None
    prefer: tuple[str, ...]


@dataclass(frozen=True)
class MoveStatus:
    group: str
    node: str
    reason: str


@dataclass(frozen=True)
class OverridesStatus:
    version: int
    issuer: str
    moves: tuple[MoveStatus, ...]
    drained: tuple[str, ...]


@dataclass(frozen=True)
class CounterStatus:
    """`plain` holds the daemon's named counters (sparse: one never bumped may be absent);
    `rejected` counts refused datagrams by reason, `hooks` hook runs by outcome."""

    plain: Mapping[str, int] = field(hash=False)
    rejected: Mapping[str, int] = field(hash=False)
    hooks: Mapping[str, int] = field(hash=False)
    notify_sent: int
    notify_dropped: int

    def __post_init__(self) -> None:
        for name in ("plain", "rejected", "hooks"):
            object.__setattr__(self, name, _frozen_map(getattr(self, name)))
        clash = set(self.plain) & set(_COUNTER_EXTRAS)
        if clash:
            raise ValueError(f"plain counters may not be named {sorted(clash)}")

    def value(self, name: str) -> int:
        """A counter by its JSON name: a plain one (0 if never bumped) or a notify count."""
        if name == "notify_sent":
            return self.notify_sent
        if name == "notify_dropped":
            return self.notify_dropped
        return self.plain.get(name, 0)


@dataclass(frozen=True)
class Status:
    node: str
    cluster: str
    incarnation: int
    ready: bool
    mature: bool
    leaving: bool
    passive: bool
    holddown: bool
    holding: str  # the controller's current hold reason ("" if none)
    config_digest: str  # hex
    view: ViewStatus
    members: tuple[MemberStatus, ...]  # this node first
    pool: tuple[GroupStatus, ...]
    overrides: OverridesStatus
    counters: CounterStatus
    announcements: Mapping[str, int] = field(hash=False)  # address text -> frames sent

    def __post_init__(self) -> None:
        object.__setattr__(self, "announcements", _frozen_map(self.announcements))

    # --- JSON ------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The dict the control socket serves: plain JSON types, lists not tuples."""
        c = self.counters
        return {
            "node": self.node,
            "cluster": self.cluster,
            "incarnation": self.incarnation,
            "ready": self.ready,
            "mature": self.mature,
            "leaving": self.leaving,
            "passive": self.passive,
            "holddown": self.holddown,
            "holding": self.holding,
            "config_digest": self.config_digest,
            "view": {"digest": self.view.digest, "members": list(self.view.members)},
            "members": [
                {
                    "name": m.name,
                    "state": m.state,
                    "age": m.age,
                    "incarnation": m.incarnation,
                    "flags": list(m.flags),
                    "config_digest_ok": m.config_digest_ok,
                    "pool_digest": m.pool_digest,
                    "drained": m.drained,
                }
                for m in self.members
            ],
            "pool": [
                {
                    "group": g.group,
                    "interface": g.interface,
                    "addresses": list(g.addresses),
                    "owner": g.owner,
                    "held_here": g.held_here,
                    "override": (
                        None
                        if g.override is None
                        else {"node": g.override.node, "reason": g.override.reason}
                    ),
                    "prefer": list(g.prefer),
                }
                for g in self.pool
            ],
            "overrides": {
                "version": self.overrides.version,
                "issuer": self.overrides.issuer,
                "moves": [
                    {"group": m.group, "node": m.node, "reason": m.reason}
                    for m in self.overrides.moves
                ],
                "drained": list(self.overrides.drained),
            },
            "counters": {
                **c.plain,
                "rejected": dict(c.rejected),
                "hooks": dict(c.hooks),
                "notify_sent": c.notify_sent,
                "notify_dropped": c.notify_dropped,
            },
            "announcements": dict(self.announcements),
        }

    @classmethod
    def from_json(cls, d: object) -> Status:
        """Parse what `to_json` produced (e.g. a control-socket reply). Raises ValueError
        naming the missing or ill-typed key; keys it does not know are ignored."""
        s = _obj(d, "status")
        view = _obj(_key(s, "view", ""), "view")
        overrides = _obj(_key(s, "overrides", ""), "overrides")
        counters = _obj(_key(s, "counters", ""), "counters")
        plain: dict[str, int] = {}
        for k, v in counters.items():
            if k not in _COUNTER_EXTRAS:
                plain[k] = _int(v, f"counters.{k}")
        return cls(
            node=_str(_key(s, "node", ""), "node"),
            cluster=_str(_key(s, "cluster", ""), "cluster"),
            incarnation=_int(_key(s, "incarnation", ""), "incarnation"),
            ready=_bool(_key(s, "ready", ""), "ready"),
            mature=_bool(_key(s, "mature", ""), "mature"),
            leaving=_bool(_key(s, "leaving", ""), "leaving"),
            passive=_bool(_key(s, "passive", ""), "passive"),
            holddown=_bool(_key(s, "holddown", ""), "holddown"),
            holding=_str(_key(s, "holding", ""), "holding"),
            config_digest=_str(_key(s, "config_digest", ""), "config_digest"),
            view=ViewStatus(
                digest=_str(_key(view, "digest", "view"), "view.digest"),
                members=_strs(_key(view, "members", "view"), "view.members"),
            ),
            members=_items(_key(s, "members", ""), "members", _member),
            pool=_items(_key(s, "pool", ""), "pool", _group),
            overrides=OverridesStatus(
                version=_int(_key(overrides, "version", "overrides"), "overrides.version"),
                issuer=_str(_key(overrides, "issuer", "overrides"), "overrides.issuer"),
                moves=_items(_key(overrides, "moves", "overrides"), "overrides.moves", _move),
                drained=_strs(_key(overrides, "drained", "overrides"), "overrides.drained"),
            ),
            counters=CounterStatus(
                plain=plain,
                rejected=_int_map(_key(counters, "rejected", "counters"), "counters.rejected"),
                hooks=_int_map(_key(counters, "hooks", "counters"), "counters.hooks"),
                notify_sent=_int(_key(counters, "notify_sent", "counters"), "counters.notify_sent"),
                notify_dropped=_int(
                    _key(counters, "notify_dropped", "counters"), "counters.notify_dropped"
                ),
            ),
            announcements=_int_map(_key(s, "announcements", ""), "announcements"),
        )


# --- parsing helpers: each names the key path it complains about ---------------------------


def _bad(path: str, want: str, got: object) -> ValueError:
    return ValueError(f"malformed status: {path!r} must be {want}, got {got!r}")


def _obj(v: object, path: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise _bad(path, "an object", v)
    return v


def _key(d: Mapping[str, Any], key: str, parent: str) -> Any:
    path = f"{parent}.{key}" if parent else key
    if key not in d:
        raise ValueError(f"malformed status: missing key {path!r}")
    return d[key]


def _str(v: object, path: str) -> str:
    if not isinstance(v, str):
        raise _bad(path, "a string", v)
    return v


def _opt_str(v: object, path: str) -> str | None:
    return None if v is None else _str(v, path)


def _int(v: object, path: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(path, "an integer", v)
    return v


def _bool(v: object, path: str) -> bool:
    if not isinstance(v, bool):
        raise _bad(path, "true or false", v)
    return v


def _opt_float(v: object, path: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _bad(path, "a number or null", v)
    return float(v)


def _list(v: object, path: str) -> list[Any]:
    if not isinstance(v, list | tuple):
        raise _bad(path, "a list", v)
    return list(v)


def _strs(v: object, path: str) -> tuple[str, ...]:
    return tuple(_str(x, f"{path}[{i}]") for i, x in enumerate(_list(v, path)))


def _int_map(v: object, path: str) -> dict[str, int]:
    return {str(k): _int(x, f"{path}.{k}") for k, x in _obj(v, path).items()}


def _items(v: object, path: str, parse: Callable[[Mapping[str, Any], str], T]) -> tuple[T, ...]:
    out = []
    for i, x in enumerate(_list(v, path)):
        where = f"{path}[{i}]"
        out.append(parse(_obj(x, where), where))
    return tuple(out)


def _member(m: Mapping[str, Any], at: str) -> MemberStatus:
    return MemberStatus(
        name=_str(_key(m, "name", at), f"{at}.name"),
        state=_str(_key(m, "state", at), f"{at}.state"),
        age=_opt_float(_key(m, "age", at), f"{at}.age"),
        incarnation=_int(_key(m, "incarnation", at), f"{at}.incarnation"),
        flags=_strs(_key(m, "flags", at), f"{at}.flags"),
        config_digest_ok=_bool(_key(m, "config_digest_ok", at), f"{at}.config_digest_ok"),
        pool_digest=_opt_str(_key(m, "pool_digest", at), f"{at}.pool_digest"),
        drained=_bool(_key(m, "drained", at), f"{at}.drained"),
    )


def _group(g: Mapping[str, Any], at: str) -> GroupStatus:
    raw = _key(g, "override", at)
    override = None
    if raw is not None:
        o = _obj(raw, f"{at}.override")
        override = GroupOverride(
            node=_str(_key(o, "node", f"{at}.override"), f"{at}.override.node"),
            reason=_str(_key(o, "reason", f"{at}.override"), f"{at}.override.reason"),
        )
    return GroupStatus(
        group=_str(_key(g, "group", at), f"{at}.group"),
        interface=_str(_key(g, "interface", at), f"{at}.interface"),
        addresses=_strs(_key(g, "addresses", at), f"{at}.addresses"),
        owner=_opt_str(_key(g, "owner", at), f"{at}.owner"),
        held_here=_bool(_key(g, "held_here", at), f"{at}.held_here"),
        override=override,
        prefer=_strs(_key(g, "prefer", at), f"{at}.prefer"),
    )


def _move(m: Mapping[str, Any], at: str) -> MoveStatus:
    return MoveStatus(
        group=_str(_key(m, "group", at), f"{at}.group"),
        node=_str(_key(m, "node", at), f"{at}.node"),
        reason=_str(_key(m, "reason", at), f"{at}.reason"),
    )


# --- building -------------------------------------------------------------------------------


def flag_names(flags: Flag) -> tuple[str, ...]:
    """Set flags, lower-case, in bit order (NONE never listed)."""
    return tuple(f.name.lower() for f in Flag if f.value and f in flags and f.name)


def build_status(
    *,
    core: MembershipCore,
    controller: Controller,
    config: Config,
    counters: Counters,
    held: frozenset[str],
    hold_reason: str,
    hook_counters: Mapping[str, int],
    notify_sent: int,
    notify_dropped: int,
    frames_sent: Mapping[str, int],
    now: float,
) -> Status:
    """The snapshot of this node at monotonic time `now`. `held` names the groups whose
    every address is in the kernel; `frames_sent` is keyed by address text."""
    owners = controller.owners(core)
    table = core.overrides
    members = [
        MemberStatus(
            name=core.name,
            state="self",
            age=0.0,
            incarnation=core.incarnation,
            flags=flag_names(core.flags),
            config_digest_ok=True,
            pool_digest=config.pool_digest.hex(),
            drained=core.draining,
        )
    ]
    for p in core.peers.values():
        members.append(
            MemberStatus(
                name=p.name,
                state=p.state.value,
                age=None if p.last_heard is None else round(now - p.last_heard, 3),
                incarnation=p.incarnation,
                flags=flag_names(p.flags),
                config_digest_ok=p.config_ok,
                pool_digest=p.pool_digest.hex() if p.pool_digest else None,
                drained=p.name in table.drained,
            )
        )
    pool = []
    for g in config.pool:
        move = table.move_of(g.name)
        pool.append(
            GroupStatus(
                group=g.name,
                interface=g.interface,
                addresses=tuple(str(a) for a in g.addresses),
                owner=owners.get(g.name),
                held_here=g.name in held,
                override=None if move is None else GroupOverride(move.target, move.reason),
                prefer=tuple(g.prefer),
            )
        )
    return Status(
        node=core.name,
        cluster=config.cluster,
        incarnation=core.incarnation,
        ready=core.ready,
        mature=core.mature,
        leaving=core.leaving,
        passive=core.config_passive,
        holddown=core.holddown_until is not None,
        holding=hold_reason,
        config_digest=core.config_digest.hex(),
        view=ViewStatus(digest=core.view.digest_hex, members=tuple(core.view.members)),
        members=tuple(members),
        pool=tuple(pool),
        overrides=OverridesStatus(
            version=table.version,
            issuer=table.issuer,
            moves=tuple(MoveStatus(m.group, m.target, m.reason) for m in table.moves),
            drained=tuple(table.drained),
        ),
        counters=CounterStatus(
            plain=counters.as_dict(),
            rejected=counters.rejected(),
            hooks=hook_counters,
            notify_sent=notify_sent,
            notify_dropped=notify_dropped,
        ),
        announcements=frames_sent,
    )
