"""Events the membership core emits: frozen dataclasses named as facts."""

from __future__ import annotations

from dataclasses import dataclass

from vipd.membership.states import MemberState


@dataclass(frozen=True)
class MemberJoined:
    """First valid heartbeat from a member that was unknown, dead or gone."""

    name: str
    incarnation: int


@dataclass(frozen=True)
class DuplicateNode:
    """Another instance is running under this node's name and key (a cloned machine, a
    second copy of the config): this node holds nothing while it hears it."""

    incarnation: int
    nonce: str
    source: str


@dataclass(frozen=True)
class DuplicateGone:
    """The other instance has been silent for dead_after: this node takes part again, under
    a new incarnation above both, so its peers follow it and not the other's last word."""

    old_incarnation: int
    new_incarnation: int


@dataclass(frozen=True)
class IncarnationWentBack:
    """A member we had lost came back with a lower incarnation. It runs without
    `node.state_dir`, and its clock went back between two starts."""

    name: str
    old_incarnation: int
    new_incarnation: int


@dataclass(frozen=True)
class MemberRestarted:
    """A live member came back with a higher incarnation (its daemon restarted)."""

    name: str
    old_incarnation: int
    new_incarnation: int


@dataclass(frozen=True)
class MemberStateChanged:
    name: str
    old: MemberState
    new: MemberState


@dataclass(frozen=True)
class MemberLost:
    """A member stopped counting: `reason` is "timeout" (no heartbeat for dead_after) or
    "left" (it said it is leaving)."""

    name: str
    reason: str


@dataclass(frozen=True)
class ViewChanged:
    """The set of members that take part in placement changed."""

    members: tuple[str, ...]
    digest: str


@dataclass(frozen=True)
class BecameReady:
    """This node finished listening (startup_wait) and now takes part in placement."""

    waited: float


@dataclass(frozen=True)
class PacketRejected:
    reason: str
    source: str
    sender: str | None
    detail: str


@dataclass(frozen=True)
class ConfigMismatch:
    """A member advertises a different digest of cluster + roster than ours."""

    name: str
    theirs: str
    ours: str


@dataclass(frozen=True)
class LoopStalled:
    """Our own timers ran `lag` seconds late; peers' deadlines were extended, not failed."""

    lag: float


@dataclass(frozen=True)
class BecameMature:
    """This node may now take addresses: it heard a ready peer, or `mature_after` passed
    on a cold start with nobody else up."""

    reason: str


@dataclass(frozen=True)
class SelfDisrupted:
    """This node was cut off from the cluster (a loop stall longer than dead_after, or losing
    every peer and finding them again unchanged). Counted for hold-down."""

    reason: str
    recent: int


@dataclass(frozen=True)
class HolddownStarted:
    """Flapped `flaps` times within flap_window: out of placement for `seconds`."""

    flaps: int
    seconds: float


@dataclass(frozen=True)
class ClockSkew:
    """A member's send time differs from our clock by `skew` seconds (more than half the
    freshness window): fix NTP before its heartbeats start being rejected as stale."""

    name: str
    skew: float


@dataclass(frozen=True)
class PoolDiffers:
    """A member runs another pool than ours (`ours` and `theirs` are pool digests): normal
    for the seconds of a rolling reload; its holdings are readable only if its pool is the
    one we ran before our last reload."""

    name: str
    theirs: str
    ours: str


@dataclass(frozen=True)
class OverridesAdopted:
    """The operator table (moves, drains) changed: `source` is "local" (a vipctl command
    or a reload here), "state" (loaded at start) or the member whose heartbeat carried it."""

    version: int
    issuer: str
    source: str
    moves: int
    drained: tuple[str, ...]


@dataclass(frozen=True)
class OverridesRefused:
    """A newer operator table was not adopted: its issuer is not in the roster, its
    signature is not the issuer's, or its version jumps too far (`reason`). `source` is the
    member whose heartbeat carried it, or "state" (our own saved table)."""

    version: int
    issuer: str
    source: str
    reason: str


Event = (
    MemberJoined
    | MemberRestarted
    | IncarnationWentBack
    | DuplicateNode
    | DuplicateGone
    | MemberStateChanged
    | MemberLost
    | ViewChanged
    | BecameReady
    | PacketRejected
    | ConfigMismatch
    | LoopStalled
    | ClockSkew
    | BecameMature
    | SelfDisrupted
    | HolddownStarted
    | PoolDiffers
    | OverridesAdopted
    | OverridesRefused
)
