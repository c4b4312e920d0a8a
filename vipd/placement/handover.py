"""Pure decisions about addresses: which groups to hold now, and the kernel actions to get there.

`HandoverPolicy` is make-before-break: a group that placement gives to someone else is kept
until the new owner is seen holding it (its heartbeat lists the group). Claims never wait: a
group assigned to us is claimed at once, which is what makes failover after a crash fast.
`plan` turns "groups to hold" plus the kernel's actual addresses into orders. Addresses
outside the pool are never touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass

from vipd.config import IPInterface, PoolGroup


@dataclass(frozen=True)
class ClaimAddress:
    group: str
    interface: str
    address: IPInterface


@dataclass(frozen=True)
class ReleaseAddress:
    group: str
    interface: str
    address: IPInterface
    reason: str


Action = ClaimAddress | ReleaseAddress


@dataclass(frozen=True)
class HandoverOutcome:
    """What happened to a group moving away from this node.

    `how`: "confirmed" (released: the new owner's heartbeat shows it holds the group),
    "unowned" (released: no live member can take it), "timeout" (released: the new owner's
    holdings cannot be seen, e.g. its config digest differs, and handover_timeout passed), or
    "stalled" (kept: the new owner is observable but has not claimed within handover_timeout;
    we go on serving rather than leave a hole)."""

    group: str
    new_owner: str | None
    how: str


class HandoverPolicy:
    def __init__(self, node: str, timeout: float) -> None:
        self.node = node
        self.timeout = timeout
        self._waiting_since: dict[str, float] = {}
        self._stalled: set[str] = set()

    def groups_to_hold(
        self,
        *,
        owners: Mapping[str, str | None],
        held: Set[str],
        holders: Mapping[str, Set[str]],
        observable: Set[str],
        now: float,
    ) -> tuple[frozenset[str], list[HandoverOutcome]]:
        """owners: group -> member placement gives it to (None: nobody is live).
        held: groups this node holds now. holders: group -> peers advertising it.
        observable: peers whose advertised holdings we can read."""
        assigned = {g for g, owner in owners.items() if owner == self.node}
        keep = set(assigned)
        outcomes: list[HandoverOutcome] = []
        for group in sorted(set(held) - keep):
            new_owner = owners.get(group)
            since = self._waiting_since.setdefault(group, now)
            overdue = now - since >= self.timeout
            if new_owner is None:
                outcomes.append(HandoverOutcome(group, None, "unowned"))
            elif new_owner in holders.get(group, ()):
                outcomes.append(HandoverOutcome(group, new_owner, "confirmed"))
            elif overdue and new_owner not in observable:
                outcomes.append(HandoverOutcome(group, new_owner, "timeout"))
            else:
                keep.add(group)
                if overdue and group not in self._stalled:
                    self._stalled.add(group)
                    outcomes.append(HandoverOutcome(group, new_owner, "stalled"))
        waiting = keep - assigned
        for group in list(self._waiting_since):
            if group not in waiting:
                del self._waiting_since[group]
                self._stalled.discard(group)
        return frozenset(keep), outcomes

    def next_deadline(self) -> float | None:
        """When a pending handover reaches its timeout (the shell re-plans then)."""
        pending = [t for g, t in self._waiting_since.items() if g not in self._stalled]
        return min(pending) + self.timeout if pending else None


def plan(
    pool: tuple[PoolGroup, ...],
    hold: Set[str],
    actual: Mapping[str, Set[IPInterface]],
) -> list[Action]:
    """Orders that bring the kernel (`actual`: interface -> addresses) to `hold`.

    Matching is by IP: a pool address present with another prefix length is released and
    claimed again with the configured one.
    """
    actions: list[Action] = []
    # One index per interface, not per group: plan() must stay linear in the pool size.
    by_iface = {iface: {a.ip: a for a in present} for iface, present in actual.items()}
    for group in pool:
        by_ip = by_iface.get(group.interface, {})
        for address in group.addresses:
            found = by_ip.get(address.ip)
            if group.name in hold:
                if found is None:
                    actions.append(ClaimAddress(group.name, group.interface, address))
                elif found != address:
                    actions.append(ReleaseAddress(group.name, group.interface, found, "prefix"))
                    actions.append(ClaimAddress(group.name, group.interface, address))
            elif found is not None:
                actions.append(ReleaseAddress(group.name, group.interface, found, "not ours"))
    return actions
