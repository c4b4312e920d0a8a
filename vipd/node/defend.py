"""When to re-announce ("defend") an address after another machine claimed it.

Pure: no IO, no clock. Time comes in as `now` (seconds, any monotonic origin, the same one
on every call), as everywhere in the core.

The rule (config: `announce.defend_interval`): a conflict is answered at once, then at most
once per `interval` per address, and the last word is ours. A conflicting frame that
arrives inside the interval is never dropped: it is answered when the interval ends, by one
deferred defence that also covers every further conflict seen until it is sent. Two holders
that both defend therefore exchange at most one announcement each per interval instead of
flooding the link, and whatever the other holder sent last is still overridden.

Every time `on_conflict` returns is a promise: the caller announces at that time and then
calls `defended(address, now)`. Until then, further conflicts return None (they are covered
by the promised defence). A promise a whole interval overdue is taken as lost (the caller's
timer was cancelled without `forget`), so one missed `defended` cannot silence an address
for good. (With an interval of 0 that is at once: every conflict is answered at once.)

Addresses are compared as bare addresses: an `IPv4Interface("203.0.113.10/24")` (what the
daemon keeps in its pool) and the `IPv4Address("203.0.113.10")` of a sighting are the same
key, so `defended(pool_entry)` and `on_conflict(sighting.address)` meet.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass
class _Entry:
    last: float | None = None  # when the last defence was sent
    due: float | None = None  # a promised defence not yet reported by `defended`


def _key(address: IPAddress) -> IPAddress:
    # Interfaces are subclasses of the address types but compare and hash with their
    # network; `.packed` is the bare address (and drops an IPv6 scope id).
    return ipaddress.ip_address(address.packed)


class DefendPolicy:
    """Per-address defence rate limiter; memory: one small entry per address passed in.

    Entries exist only for addresses given to `on_conflict` or `defended`; `forget`
    (called when the address is released) removes them, so the table is bounded by the
    addresses this node holds.
    """

    def __init__(self, interval: float) -> None:
        if not (math.isfinite(interval) and interval >= 0):
            raise ValueError(f"defend interval must be a finite number >= 0 s, got {interval!r}")
        self.interval = float(interval)
        self._entries: dict[IPAddress, _Entry] = {}

    def on_conflict(self, address: IPAddress, now: float) -> float | None:
        """Another MAC claimed `address` at `now`: when to defend it.

        * `now`: the last defence is at least `interval` ago (or there was none);
        * `last defence + interval`: inside the interval, and no defence is promised yet;
        * None: a defence is already promised (it answers this conflict too).
        """
        key = _key(address)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
        if entry.due is not None:
            if now < entry.due + self.interval:
                return None
            entry.due = None  # overdue by a whole interval: the promise was lost
        if entry.last is None or now - entry.last >= self.interval:
            entry.due = now
        else:
            entry.due = entry.last + self.interval
        return entry.due

    def defended(self, address: IPAddress, now: float) -> None:
        """A defence (or any announcement) of `address` was sent at `now`.

        Clears the promise: conflicts seen before `now` are answered. An announcement sent
        for another reason (claim, refresh) counts too and starts a new interval.
        """
        entry = self._entries.setdefault(_key(address), _Entry())
        entry.last = now if entry.last is None else max(entry.last, now)
        entry.due = None

    def forget(self, address: IPAddress) -> None:
        """The address was released: drop its state (a later claim starts afresh)."""
        self._entries.pop(_key(address), None)

    def pending(self, address: IPAddress) -> float | None:
        """The promised defence time of `address`, or None."""
        entry = self._entries.get(_key(address))
        return None if entry is None else entry.due

    def __len__(self) -> int:
        """Addresses with state (for tests and metrics)."""
        return len(self._entries)
