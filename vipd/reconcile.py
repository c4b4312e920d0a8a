"""Pure decisions about addresses: which groups to hold now, and the kernel actions to get there.

`HandoverPolicy` is make-before-break: a group that placement gives to someone else is kept
until the new owner is seen holding it (its heartbeat lists the group), or the handover times
out. Claims never wait: a group assigned to us is claimed at once, which is what makes failover
after a crash fast. `plan` turns "groups to hold" plus the kernel's actual addresses into
orders. Addresses outside the pool are never touched.
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
class HandoverDone:
    """A group we held was released: `how` is "confirmed" (the new owner holds it),
    "timeout" (it never confirmed), or "unowned" (no live member can take it)."""

    group: str
    new_owner: str | None
    how: str


class HandoverPolicy:
    def __init__(self, node: str, timeout: float) -> None:
        self.node = node
        self.timeout = timeout
        self._waiting_since: dict[str, float] = {}

    def groups_to_hold(
        self,
        *,
        owners: Mapping[str, str | None],
        held: Set[str],
        holders: Mapping[str, Set[str]],
        now: float,
    ) -> tuple[frozenset[str], list[HandoverDone]]:
        """owners: group -> member placement gives it to (None: nobody is live).
        held: groups this node holds now. holders: group -> peers advertising it."""
        assigned = {g for g, owner in owners.items() if owner == self.node}
        keep = set(assigned)
        done: list[HandoverDone] = []
        for group in sorted(set(held) - keep):
            new_owner = owners.get(group)
            since = self._waiting_since.setdefault(group, now)
            if new_owner is None:
                done.append(HandoverDone(group, None, "unowned"))
            elif new_owner in holders.get(group, ()):
                done.append(HandoverDone(group, new_owner, "confirmed"))
            elif now - since >= self.timeout:
                done.append(HandoverDone(group, new_owner, "timeout"))
            else:
                keep.add(group)
        waiting = keep - assigned
        for group in list(self._waiting_since):
            if group not in waiting:
                del self._waiting_since[group]
        return frozenset(keep), done

    def next_deadline(self) -> float | None:
        """When a pending handover times out (the shell re-plans then)."""
        if not self._waiting_since:
            return None
        return min(self._waiting_since.values()) + self.timeout


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
    for group in pool:
        present = actual.get(group.interface, frozenset())
        by_ip = {a.ip: a for a in present}
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
