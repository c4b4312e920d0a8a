"""What this node should hold and announce right now: pure, on top of the membership core.

The daemon (and the simulator in the tests) feed it the core, the groups actually held in the
kernel and the time; it answers with a `Decision`. The rules, in order:

1. Leaving (graceful stop): placement is computed without us; every group we hold is handed
   over make-before-break (kept until its new owner advertises holding it).
2. Partition policy "majority": a side with fewer than half of the roster (ties: the side
   with the first roster name in sorted order wins) holds nothing.
3. Config mismatch: if another config digest wins among the live members, we hold nothing
   after `handover_timeout` (the winners claim at once: they cannot read our holdings).
4. Otherwise placement over the view decides. A group moving away is kept until its new
   owner holds it (make-before-break). A group moving to us is claimed
   - at once if no live peer holds it (failover, cold start: no extra round),
   - else only once the view is agreed (every member advertises our view digest) or
     `settle_time` has passed since the view appeared (planned change).
   Nothing new is claimed before the node is ready and mature. A group whose owner is still
   in its startup wait has an interim owner (`effective_owners`): a ready member holding
   it, or, if nobody holds it any more, a ready member.
5. Announcements, only for groups placement gives us and only from an agreed view: a group
   a peer also advertises (partition heal, one-way cut, a crashed daemon's leftovers) is
   announced again when the overlap is first seen and when it ends, and one a peer says it
   let go of lately (a false failover claimed and released between two heartbeats) when
   that is first seen; a group we already held
   is announced again when it becomes ours; everything we own is announced again when a
   member comes back from silence or when this node finds it was cut off itself. A group
   moving away has its pending announcement repeats stopped at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vipd.config import Config
from vipd.membership.core import MembershipCore
from vipd.membership.events import BecameReady, Event, MemberJoined, MemberLost, SelfDisrupted
from vipd.placement.assign import place
from vipd.placement.handover import HandoverOutcome, HandoverPolicy
from vipd.placement.overrides import Overrides

if TYPE_CHECKING:
    from vipd.memo import Memo


@dataclass(frozen=True)
class Decision:
    hold: frozenset[str]  # groups to hold now (the kernel is brought to exactly this)
    announce: tuple[str, ...]  # groups to announce again now
    quiet: tuple[str, ...]  # groups now moving away: stop their pending announcement repeats
    outcomes: tuple[HandoverOutcome, ...]  # handovers that finished (or stalled) just now
    reason: str  # why the node holds what it holds: "placement", "leaving", "no quorum", ...


class Controller:
    def __init__(self, config: Config, *, memo: Memo | None = None) -> None:
        self.node = config.node
        self._assign = memo.assign if memo is not None else None  # shared between nodes
        self.roster_weights = {m.name: m.weight for m in config.roster}
        self.tiebreaker = min(self.roster_weights)
        self.policy = HandoverPolicy(config.node, config.timing.handover_timeout)
        self._owners_cache: tuple[tuple[object, ...], dict[str, str | None]] | None = None
        self._view_seen: tuple[bytes, float] | None = None
        self._passive_since: float | None = None
        self._contested: frozenset[str] = frozenset()
        self._announce_all = False
        self._last_loss: float | None = None
        self._overlapped: frozenset[str] = frozenset()  # owned groups seen doubly held
        self._handing: frozenset[str] = frozenset()
        self._owned: frozenset[str] = frozenset()  # groups held or claimed that are ours
        self._served: set[str] = set()  # groups seen held by anyone since we started
        self._ready_at: float | None = None  # when this node finished its startup wait
        self._let_go: frozenset[str] = frozenset()  # ours, advertised as released by a peer
        # Owned groups to announce once the view is settled: held ones that became ours,
        # and ones a peer newly says it let go of.
        self._to_announce: frozenset[str] = frozenset()
        self._next_deadline: float | None = None
        self.use_pool(config)

    def use_pool(self, config: Config) -> None:
        """Take a (re)loaded config's pool: groups are known by name, so what we knew of a
        group the new pool keeps stays; what we knew of a removed group is dropped."""
        self.config = config
        self.groups = [g.name for g in config.pool]
        self.index = {name: i for i, name in enumerate(self.groups)}
        self.prefer = {g.name: g.prefer for g in config.pool if g.prefer}
        self._owners_cache = None
        names = frozenset(self.groups)
        self._served &= names
        self._contested &= names
        self._overlapped &= names
        self._handing &= names
        self._owned &= names
        self._let_go &= names
        self._to_announce &= names

    def reload_pins(self, old: Controller, core: MembershipCore) -> dict[str, str]:
        """Groups a pool reload would move although they did not change: placement balances
        over the whole pool, so adding or removing one group can shift others (no pure
        balanced placement can avoid it). They are pinned where they are instead (reason
        "reload" in the operator table); `vipctl rebalance` lets them go."""
        before, after = old.owners(core), self.owners(core)
        unchanged = set(old.config.pool) & set(self.config.pool)
        return {
            g.name: owner
            for g in unchanged
            if (owner := before.get(g.name)) is not None and after.get(g.name) != owner
        }

    def observe(self, event: Event, now: float) -> None:
        if isinstance(event, MemberJoined | SelfDisrupted):
            # A member back from silence (partition heal, restart) may hold, or may have made
            # clients point at, anything; and if we were the one cut off (a stall), peers took
            # our groups and clients followed them: everything we own is announced again,
            # once the view is agreed (announcing from a stale view would steal clients for
            # groups we are about to give back).
            self._announce_all = True
        elif isinstance(event, MemberLost):
            self._last_loss = now
        elif isinstance(event, BecameReady):
            self._ready_at = now

    def owners(self, core: MembershipCore) -> dict[str, str | None]:
        """Placement over the core's view with its operator table (moves, drains)."""
        view, table = core.view, core.overrides
        key = (view.members, view.weights, table.version, table.issuer)
        if self._owners_cache is None or self._owners_cache[0] != key:
            self._owners_cache = (key, self._place(view.as_weights(), table))
        return self._owners_cache[1]

    def _place(self, members: dict[str, int], table: Overrides) -> dict[str, str | None]:
        placed = place(
            self.groups,
            members,
            self.roster_weights,
            pins=table.pins(),
            prefer=self.prefer,
            assign_with=self._assign,
        )
        return {g: placed.get(g) for g in self.groups}

    def effective_owners(
        self,
        core: MembershipCore,
        holders: dict[str, frozenset[str]],
        held: frozenset[str],
        now: float,
    ) -> dict[str, str | None]:
        """Placement over the view, except for groups whose owner is still in its startup
        wait (it cannot claim yet); they get an interim owner, and the real owner takes them
        over make-before-break once ready:

        - a group someone holds stays with its ready holders, or the first of them by name
          if there are several (a healed partition), so an overlap ends within one settle
          time instead of lasting until the owner is ready, and the holder that keeps the
          group owns it and so announces it (after a heal or a stall, for instance);
        - a group nobody holds goes to a ready member, since a failover must not wait for a
          joiner: if it was served since we started (its holder died or restarted, quorum
          was lost and is back), or if we have been ready for startup_wait already (we are
          not starting along with its owner). Not otherwise: at a cold start every node is
          about to be ready and the pool must be split once."""
        owners = self.owners(core)
        ready = core.ready_members()
        if len(ready) == len(core.view.members) or not ready:
            return owners
        interim: dict[str, str | None] = {}
        for g, owner in owners.items():
            if owner in ready or owner is None:
                continue
            holding = holders[g] | {self.node} if g in held else holders[g]
            if holding & ready:
                interim[g] = min(holding & ready)
        settled_in = self._ready_at is not None and (
            now - self._ready_at >= self.config.timing.startup_wait
        )
        orphans = [
            g
            for g, o in owners.items()
            if o not in ready
            and not holders[g]
            and g not in held
            and (settled_in or g in self._served)
        ]
        if orphans:
            weights = core.view.as_weights()
            placed = self._place({m: weights[m] for m in ready}, core.overrides)
            interim.update({g: placed[g] for g in orphans})
        return {**owners, **interim} if interim else owners

    @property
    def owned(self) -> frozenset[str]:
        """Groups the last decision holds (or claims) that placement gives to us."""
        return self._owned

    def has_quorum(self, connected: frozenset[str]) -> bool:
        """Partition policy over the members we can hear (placed or not: a member in
        hold-down is still on our side of a partition)."""
        if self.config.partition_policy == "all":
            return True
        members, roster = len(connected), len(self.roster_weights)
        return 2 * members > roster or (2 * members == roster and self.tiebreaker in connected)

    def next_deadline(self) -> float | None:
        """When the last decision may change with no new input (a handover, settle or
        config-mismatch timeout); always in the future, so a timer on it cannot spin."""
        return self._next_deadline

    def decide(self, core: MembershipCore, held: frozenset[str], now: float) -> Decision:
        timing = self.config.timing
        view = core.view
        if self._view_seen is None or self._view_seen[0] != view.digest:
            self._view_seen = (view.digest, now)
        holders_by_index = core.holders_map()
        holders = {g: holders_by_index.get(self.index[g], frozenset()) for g in self.groups}
        if len(self._served) < len(self.groups):
            self._served |= held | {g for g, h in holders.items() if h}
        owners = self.effective_owners(core, holders, held, now)
        if not core.config_passive:
            self._passive_since = None
        elif self._passive_since is None:
            self._passive_since = now

        outcomes: list[HandoverOutcome] = []
        deadlines: list[float | None] = []
        settled = False  # the view is agreed (or settle_time passed): safe to announce
        if not core.leaving and not self.has_quorum(core.connected()):
            hold, reason = frozenset[str](), "no quorum"
        elif not core.leaving and self._passive_since is not None:
            release_at = self._passive_since + timing.handover_timeout
            hold, reason = (frozenset() if now >= release_at else held), "config mismatch"
            deadlines.append(release_at)
        else:
            keep, outcomes = self.policy.groups_to_hold(
                owners=owners,
                held=held,
                holders=holders,
                observable=core.observable_peers(),
                now=now,
            )
            deadlines.append(self.policy.next_deadline())
            settle_at = self._view_seen[1] + timing.settle_time
            settled = core.view_agreed() or now >= settle_at
            may_claim = core.ready and core.mature and not core.leaving
            # Majority policy: after a loss, wait one heartbeat interval before failover
            # claims, so a node being cut off (its peers expiring one by one) sees that it is
            # in the minority before it claims and announces anything.
            grace_until = (
                self._last_loss + timing.heartbeat_interval
                if self.config.partition_policy == "majority" and self._last_loss is not None
                else now
            )
            hold = frozenset(
                g
                for g in keep
                if g in held or (may_claim and (settled if holders[g] else now >= grace_until))
            )
            if may_claim and hold != keep:
                # planned claims wait for agreement (or settle_time), failover ones the grace
                deadlines += [settle_at, grace_until]
            reason = "leaving" if core.leaving else "placement"

        # Announce only what placement gives us, and only from an agreed view: a stale view
        # (just healed, just resumed) must not pull clients to groups we are about to release.
        # Overlaps are announced when first seen and again when they end (the other holder let
        # go, but clients may still point at it): the heartbeat-level form of "announce again
        # whenever another MAC answers for an address we hold".
        owned = frozenset(g for g in hold if owners.get(g) == self.node)
        mine = owned & held
        # A group we already held that becomes ours (its intended owner died or left during
        # the handover) was last announced by whoever held it meanwhile, maybe not us: it is
        # announced again. Fresh claims are not: the claim announces them.
        became = mine - self._owned
        self._owned = owned
        contested = frozenset(g for g in mine if holders[g])
        # A peer that let go of one of our groups lately may have claimed and released it
        # between two heartbeats (a false failover): clients may point there, unseen by us.
        released = core.released_map()
        let_go = frozenset(g for g in mine if self.index[g] in released)
        self._to_announce = (self._to_announce | became | (let_go - self._let_go)) & mine
        self._let_go = let_go
        self._overlapped = (self._overlapped | contested) & mine
        again: frozenset[str] = frozenset()
        if reason == "placement" and settled:
            ended = self._overlapped - contested
            fresh = (contested - self._contested) | ended | self._to_announce
            again = mine if self._announce_all else fresh
            self._announce_all = False
            self._contested = contested
            self._overlapped -= ended
            self._to_announce = frozenset()
        elif (
            self._announce_all
            or mine - self._contested
            or self._overlapped - contested
            or self._to_announce
        ):
            deadlines.append(self._view_seen[1] + timing.settle_time)
        # A group held but no longer ours is being handed over: its claim-time repeats must
        # not pull clients back from the new owner before we release it.
        handing = (hold & held) - mine
        quiet = handing - self._handing
        self._handing = handing
        pending = [d for d in deadlines if d is not None and d > now]
        self._next_deadline = min(pending) if pending else None
        return Decision(hold, tuple(sorted(again)), tuple(sorted(quiet)), tuple(outcomes), reason)
