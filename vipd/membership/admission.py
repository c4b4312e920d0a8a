"""Who may cost us work: source filtering and a per-source budget for rejected datagrams.

Both run before a datagram is even parsed, so a flood costs a dictionary lookup each.

- `accept_from` (mod_backhand's ``AcceptStats``): heartbeats from outside these networks are
  dropped unread. None accepts any source (signatures are still checked).
- The budget: each source may have `REJECT_RATE` datagrams a second rejected (burst
  `REJECT_BURST`); past that, everything from it is dropped unread until the bucket refills.
  Only rejections are charged, so a genuine peer, whose datagrams are accepted, never runs
  dry, and a junk source cannot make us verify signatures at line rate. A flood that forges a
  genuine peer's source address can still drown that peer's heartbeats: an on-link attacker
  can deny service (see docs/security.md); it cannot take an address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

REJECT_RATE = 50.0  # rejected datagrams per second a source may cost us, sustained
REJECT_BURST = 100.0
MAX_SOURCES = 4096  # bound on the budget table (spoofed sources cannot grow it further)


class Admission:
    def __init__(self, accept_from: Sequence[IPNetwork] | None) -> None:
        self._networks = tuple(accept_from) if accept_from is not None else None
        self._allowed: dict[str, bool] = {}  # source text -> verdict (bounded like _buckets)
        self._buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, at)
        self._dry: set[str] = set()  # sources whose bucket ran dry (reported once per spell)

    def source_allowed(self, source: str) -> bool:
        if self._networks is None:
            return True
        verdict = self._allowed.get(source)
        if verdict is None:
            try:
                address = ipaddress.ip_address(source.split("%", 1)[0])
            except ValueError:
                verdict = False
            else:
                if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                    address = address.ipv4_mapped
                verdict = any(address in net for net in self._networks)
            if len(self._allowed) >= MAX_SOURCES:
                self._allowed.clear()
            self._allowed[source] = verdict
        return verdict

    def limited(self, source: str, now: float) -> tuple[bool, bool]:
        """(drop it, first drop of this dry spell) for a datagram from `source`."""
        bucket = self._buckets.get(source)
        if bucket is None:
            return False, False
        tokens = min(REJECT_BURST, bucket[0] + (now - bucket[1]) * REJECT_RATE)
        # Hysteresis: a source that ran dry is read again only once half the burst is back,
        # so a sustained flood makes one dry spell (one report), not one per token.
        if tokens >= (REJECT_BURST / 2 if source in self._dry else 1.0):
            self._dry.discard(source)
            return False, False
        first = source not in self._dry
        self._dry.add(source)
        return True, first

    def charge(self, source: str, now: float) -> None:
        """A datagram from `source` was rejected: it costs one token."""
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= MAX_SOURCES:
                self._forget_idle(now)
            tokens = REJECT_BURST
        else:
            tokens = min(REJECT_BURST, bucket[0] + (now - bucket[1]) * REJECT_RATE)
        self._buckets[source] = (tokens - 1.0, now)

    def _forget_idle(self, now: float) -> None:
        """Drop sources whose bucket has refilled (they cost nothing to forget); if every
        source is still busy (a spoofed flood), forget the oldest half."""
        refill = REJECT_RATE
        full = [
            s for s, (t, at) in self._buckets.items() if t + (now - at) * refill >= REJECT_BURST
        ]
        for s in full:
            del self._buckets[s]
        if len(self._buckets) >= MAX_SOURCES:
            for source in list(self._buckets)[: MAX_SOURCES // 2]:
                del self._buckets[source]
        self._dry &= self._buckets.keys()
