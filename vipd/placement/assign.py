"""Deterministic placement of pool groups on live members (pure: no IO, no time, no random).

Placement runs in two phases. Phase 1 places every group on the whole *roster* (every configured
member, alive or not) and calls that member the group's *home*; it depends only on the pool and
the roster, so it is computed once per config and cached. Phase 2 leaves every group whose home
is live at home and places only the *orphans* (homes not live) on the live members, with
capacities chosen so the final counts are balanced over the live set. A dead node therefore
moves only its own groups, as with per-address rendezvous hashing (MetalLB L2), while counts
stay within one of the quota.

Both phases use one primitive: weighted rendezvous (highest-random-weight) hashing with
quotas, resolved by a greedy over (group, member) pairs in global score order.

1. Every name is hashed once with BLAKE2b (a group and a member live in separate hash
   domains). The score of a pair is a 64-bit value ``h`` obtained by mixing the two name hashes
   with integer arithmetic (xor, then an odd-constant multiply modulo 2**64): cheap enough to do
   for every pair in CPython, and a function of the two names only.
2. Weights turn ``h`` into an exponential race: with ``U = 1 - h / 2**64`` uniform, the key is
   ``-ln(U) / w`` (smaller wins), so member ``m`` is a group's first choice with probability
   ``w_m / W``. ``-ln`` is computed in 64-bit fixed point with integers only (bit length for
   the exponent, a short atanh series for the mantissa) and the division by ``w`` is done by
   multiplying with ``lcm(weights) // w``: bit-identical on every CPU, libm and Python build.
   Ties fall back to ``h``, then to the names, so the order of pairs is total. With equal
   weights the key is ``h`` itself (the same order the general formula gives).
3. Quotas: with ``G`` groups and total weight ``W`` every member may hold ``f = floor(G*w/W)``;
   the ``E = G - sum(f)`` remaining units (``E < N``) are extras, one per member, taken by
   whichever members reach their floor first in score order.
4. Greedy: visit pairs best-first; a pair is taken if its group is still free and its member
   still has room (below its floor, or at its floor while extras remain). So a group ends on
   its best member except where every better one was already full of groups that score
   higher there. It is run lazily: a heap holds each free group's best member that still has
   room; a member that is full stays full, so skipping it equals visiting and rejecting it.
   Members may start with groups already counted (phase 2); the rule is the same.

Phase 1 is this greedy over all groups and the roster, every count starting at zero. Each
roster member ``i`` ends with ``c_i`` home groups, ``floor(G*w_i/W_R)`` or one more.

Phase 2, over the live members ``L`` (total weight ``W_L``), with live quotas ``f_i`` and
``E`` extras from step 3:

a. Every group whose home is live stays there for now; the others form the orphan set ``D``.
b. No live member holds more than ``f_i + 1`` home groups: ``c_i <= floor(G*w_i/W_R) + 1 <=
   floor(G*w_i/W_L) + 1 = f_i + 1`` because ``L`` is part of the roster, so ``W_L <= W_R``.
   (Not ``ceil(G*w_i/W_R)``: a member whose share is a whole number can still take an extra.)
   Members at ``f_i + 1`` use up extras first, one each. If there are more of them than ``E``
   (possible only with unequal weights) the surplus ones, chosen by worst marginal pair (the
   member's lowest-scored home group, compared over all of them), give that group back to
   ``D``; this is the only way a group whose home is live moves, and it moves exactly as many
   as balance forces (every count must end at ``f_i`` or ``f_i + 1``, with exactly ``E`` at
   ``f_i + 1``, so each surplus member must lose one). With equal weights it never
   happens: if ``f = G // n`` equals ``q = G // N`` (else nobody is above ``f``), then
   ``E = G - n*q = r + (N - n)*q >= r``, and only ``r = G - N*q`` members hold ``q + 1``.
   (Defensive: if ``members`` gives a member another weight than the roster, the bound above
   can fail; such a member first gives back its lowest-scored groups down to ``f_i + 1``.)
c. The greedy places ``D`` on the live members, starting from those counts, with the extras
   left over.

Why every group is placed (both phases): after (b) each member holds at most ``f_i + 1``, and
the members at ``f_i + 1`` number at most ``E``, so the room left, ``sum(f_i - c_i)`` over
members at or below their floor plus the extras left, is exactly ``G - sum(c_i) = |D|``.
Suppose group ``g`` finds every member full. If the extras are spent, every member holds at
least its floor and ``E`` hold one more, so ``G`` groups are already placed and ``g`` cannot be
free. Otherwise every member is above its floor, so ``N <= E``, but ``E`` is a sum of ``N``
fractional parts, so ``E <= N - 1``. Either way a contradiction.

Invariants (docs: ``shared/DESIGN.md``):

- I4 determinism: the result depends only on the set of group names, the roster and the live
  member -> weight mapping. Inputs are sorted by name before use, hashes are BLAKE2b (never
  ``hash()``, which is salted per process), all arithmetic is on integers, and every choice
  (pair order, which surplus member gives back) is by a total order on keys and names.
- I5 balance: the final counts are ``f_i`` or ``f_i + 1`` with exactly ``E`` members at
  ``f_i + 1``, hence within one of ``G*w_i/W_L``; with equal weights all counts are ``G // n``
  or ``G // n + 1``. This holds for every live subset of the roster.
- I6 minimal movement: with the whole roster live, phase 2 changes nothing (no orphans, and
  exactly ``E`` members at ``f_i + 1``), so the placement is phase 1. When one member leaves a
  full cluster with equal weights, (b) never gives back, so exactly the leaver's groups move;
  when it returns the placement is phase 1 again, so exactly those groups come back. (With
  unequal weights a leave can also force a give-back: one group in about 1.5% of random
  weighted leaves.) With several members dead, groups homed on live members stay put; between
  two views only the leaver's groups and orphans move (orphans are re-placed by the greedy
  and may shuffle among the live members: on a second leave about 8 extra moves over 32
  required at 1,000 groups x 32 members, 33 over 323 at 10,000), plus the give-backs of (b).
  Without a roster (``roster=None``, roster = live
  set) this is the plain greedy, whose quota boundaries cascade: every survivor's quota rises
  but it receives a Poisson-distributed share of the leaver's groups, so some overflow and
  push out their lowest-scored group, which moves on in turn; about 0.5*sqrt(G) extra moves
  per leave or join. (Ordering pairs by rank before score, by regret, handing out extras
  only after all floors, and repairing plain HRW by cheapest eviction all moved as much or
  more; anchoring to the roster is what removes it.) ``bench/placement.py`` measures both.

Cost (CPython 3.11): phase 1 is one integer mix per pair plus a heap pass, about 5 ms for
1,000 groups x 32 members (10 ms with mixed weights, 45 ms for 10,000 groups), and is memoised
(``lru_cache`` on the sorted pool and roster, which change only on reload). Phase 2 with a warm
memo is a pass over the groups plus the greedy over the orphans: well under 1 ms at 1,000 x 32
with one member dead. The memos only cache pure functions; they never change a result.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from heapq import heapify, heappop, heappush
from math import lcm
from typing import NamedTuple

__all__ = ["assign", "place", "quotas"]

_ONE = 1 << 64
_MASK64 = _ONE - 1
# Odd 64-bit multiplier (2**64 / golden ratio): a bijection modulo 2**64 whose high bits, which
# decide the order, depend on every input bit.
_MIX = 0x9E3779B97F4A7C15
# floor(ln(2) * 2**64), computed with decimal at 60 digits; a literal so no libm is involved.
_LN2 = 0xB17217F7D1CF79AB


@lru_cache(maxsize=32768)
def _name_hash(domain: bytes, name: str) -> int:
    """64-bit hash of a name; memoised because the pool and roster rarely change."""
    digest = hashlib.blake2b(
        name.encode("utf-8", "surrogatepass"), digest_size=8, person=domain
    ).digest()
    return int.from_bytes(digest, "big")


_GROUP_DOMAIN = b"vipd.assign.grp"
_MEMBER_DOMAIN = b"vipd.assign.mbr"


def _neg_ln(h: int) -> int:
    """``-ln(U) * 2**64`` (floored) for ``U = (2**64 - h) / 2**64``, integers only.

    ``U = y * 2**(b - 64)`` with ``y`` in (1/2, 1], so ``-ln U = (64 - b) ln 2 - ln y`` and
    ``-ln y = 2 atanh(z)``, ``z = (1 - y) / (1 + y)`` in [0, 1/3), summed to z**5 (absolute error
    below 1.5e-4). The result never decreases as ``h`` grows, so equal weights rank by ``h``.
    """
    u = _ONE - h
    b = (u - 1).bit_length()
    top = 1 << b
    z = ((top - u) << 64) // (top + u)
    z2 = (z * z) >> 64
    z3 = (z * z2) >> 64
    z5 = (z3 * z2) >> 64
    return (64 - b) * _LN2 + 2 * (z + z3 // 3 + z5 // 5)


def quotas(n_groups: int, weights: Sequence[int]) -> tuple[list[int], int]:
    """Floor share ``n_groups * w // W`` of each weight, and the extras ``R`` left over.

    ``R < len(weights)`` because it is a sum of fractional parts, each below one.
    """
    total = sum(weights)
    floors = [n_groups * w // total for w in weights]
    return floors, n_groups - sum(floors)


def _check_weights(what: str, members: Mapping[str, int]) -> None:
    for name, weight in members.items():
        # bool is an int subclass; True as a weight is a config bug, not weight 1.
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
            raise ValueError(f"assign: {what} {name!r} has weight {weight!r}; need an int >= 1")


def _check_groups(groups: Sequence[str]) -> None:
    if len(set(groups)) != len(groups):
        dups = sorted(name for name, k in Counter(groups).items() if k > 1)
        raise ValueError(f"assign: duplicate group names {dups}")


class _Scores:
    """Pair keys of groups against one member set (names sorted); smaller key = better pair.

    Members of equal weight rank among themselves by ``h`` alone, so a group's best member is
    the best of the per-weight minima of ``h``: the costly ``-ln`` runs once per distinct
    weight, not once per pair. Equal weights (the common case) need no ``-ln`` at all.
    ``-ln(U) / w`` is compared as ``-ln(U) * (lcm // w)``: exact, and unchanged by scaling all
    weights.
    """

    __slots__ = ("classes", "mhash", "mult", "weighted")

    def __init__(self, names: Sequence[str], weights: Sequence[int]) -> None:
        self.mhash = [_name_hash(_MEMBER_DOMAIN, m) for m in names]
        scale = lcm(*weights)
        self.mult = [scale // w for w in weights]
        self.weighted = len(set(weights)) > 1
        by_weight: dict[int, list[int]] = {}
        for mi, w in enumerate(weights):
            by_weight.setdefault(w, []).append(mi)
        self.classes = [
            (scale // w, idxs, [self.mhash[i] for i in idxs]) for w, idxs in by_weight.items()
        ]

    def key(self, hg: int, mi: int) -> int:
        """Key of (group hash, member index); the low 64 bits (``h``) break ties in ``-ln``."""
        h = ((hg ^ self.mhash[mi]) * _MIX) & _MASK64
        if not self.weighted:
            return h
        return ((_neg_ln(h) * self.mult[mi]) << 64) | h

    def first_choice(self, hg: int) -> tuple[int, int]:
        """(key, member index) of the group's best member; the lowest index wins a tie."""
        if not self.weighted:
            hs = [((hg ^ x) * _MIX) & _MASK64 for x in self.mhash]
            h = min(hs)
            return h, hs.index(h)
        best: tuple[int, int] | None = None
        for class_mult, idxs, hl in self.classes:
            hs = [((hg ^ x) * _MIX) & _MASK64 for x in hl]
            h = min(hs)
            cand = (((_neg_ln(h) * class_mult) << 64) | h, idxs[hs.index(h)])
            if best is None or cand < best:
                best = cand
        assert best is not None
        return best

    def ranking(self, hg: int) -> list[tuple[int, int]]:
        """All (key, member index) pairs of a group, best first; ``[0]`` is the first choice."""
        return sorted((self.key(hg, j), j) for j in range(len(self.mhash)))


def _greedy(
    todo: Iterable[int],
    ghash: Sequence[int],
    scores: _Scores,
    floor_quota: Sequence[int],
    extras: int,
    count: list[int],
) -> dict[int, int]:
    """Place groups ``todo`` (indices into ``ghash``) best pair first; returns {group: member}.

    ``count`` (updated in place) is what each member already holds; a member has room below
    its floor, or at its floor while some of the ``extras`` are left. The caller guarantees
    that the room adds up to ``len(todo)`` with every count at most floor + 1 (see the module
    docstring), which is what makes every group find a member.
    """
    n = len(floor_quota)
    heap: list[tuple[int, int, int]] = []
    for gi in todo:
        k, mi = scores.first_choice(ghash[gi])
        heap.append((k, gi, mi))
    heapify(heap)

    result: dict[int, int] = {}
    # Full preference lists, built only for groups that lose their first choice.
    rankings: dict[int, list[tuple[int, int]]] = {}
    cursor: dict[int, int] = {}
    while heap:
        _, gi, mi = heappop(heap)
        c = count[mi]
        if c < floor_quota[mi] or (c == floor_quota[mi] and extras > 0):
            if c == floor_quota[mi]:
                extras -= 1
            count[mi] = c + 1
            result[gi] = mi
            continue
        ranking = rankings.get(gi)
        if ranking is None:
            ranking = rankings[gi] = scores.ranking(ghash[gi])
            pos = 1  # ranking[0] is the first choice just rejected
        else:
            pos = cursor[gi]
        # Full is permanent (counts only grow, extras only shrink), so skip full members now.
        while pos < n:
            k, j = ranking[pos]
            pos += 1
            c = count[j]
            if c < floor_quota[j] or (c == floor_quota[j] and extras > 0):
                cursor[gi] = pos
                heappush(heap, (k, gi, j))
                break
        else:  # pragma: no cover - excluded by the counting argument in the module docstring
            raise AssertionError(f"assign: group #{gi} found no member with room")
    return result


class _Homes(NamedTuple):
    """Phase 1 result, aligned with the sorted group names."""

    home: tuple[str, ...]  # the group's home (a roster member)
    ghash: tuple[int, ...]  # the group's name hash, kept for phase 2


@lru_cache(maxsize=4)
def _homes(gnames: tuple[str, ...], roster: tuple[tuple[str, int], ...]) -> _Homes:
    """Phase 1: the greedy over every group and the whole roster (both sorted by name).

    Memoised: the key changes only when the pool or the roster does (a reload), and four
    entries hold an old and a new config with room to spare.
    """
    names = [m for m, _ in roster]
    weights = [w for _, w in roster]
    floor_quota, extras = quotas(len(gnames), weights)
    ghash = tuple(_name_hash(_GROUP_DOMAIN, g) for g in gnames)
    placed = _greedy(
        range(len(gnames)), ghash, _Scores(names, weights), floor_quota, extras, [0] * len(names)
    )
    return _Homes(tuple(names[placed[gi]] for gi in range(len(gnames))), ghash)


def _settle(gnames: tuple[str, ...], homes: _Homes, members: Mapping[str, int]) -> dict[str, str]:
    """Phase 2: keep live homes, place the orphans so the live counts end balanced."""
    live = sorted(members)
    weights = [members[m] for m in live]
    index = {m: i for i, m in enumerate(live)}
    floor_quota, extras = quotas(len(gnames), weights)
    held: list[list[int]] = [[] for _ in live]
    orphans: list[int] = []
    for gi, home in enumerate(homes.home):
        mi = index.get(home)
        if mi is None:
            orphans.append(gi)
        else:
            held[mi].append(gi)

    scores = _Scores(live, weights)
    ghash = homes.ghash

    def worst_first(mi: int) -> list[int]:
        return sorted(held[mi], key=lambda gi: (scores.key(ghash[gi], mi), gi), reverse=True)

    above = [mi for mi in range(len(live)) if len(held[mi]) > floor_quota[mi]]
    for mi in above:
        surplus = len(held[mi]) - floor_quota[mi] - 1
        if surplus > 0:  # only if members and roster disagree on this member's weight
            ranked = worst_first(mi)
            orphans += ranked[:surplus]
            held[mi] = ranked[surplus:]
    if len(above) > extras:
        # More members sit at floor + 1 than there are extras: the members whose worst home
        # group scores worst (over all of them) give that group back. Scores are only
        # computed here, so the common case costs no pair scores at all.
        margins = sorted(
            ((scores.key(ghash[gi], mi), gi, mi) for mi in above for gi in worst_first(mi)[:1]),
            reverse=True,
        )
        for _, gi, mi in margins[: len(above) - extras]:
            held[mi].remove(gi)
            orphans.append(gi)
        extras = 0
    else:
        extras -= len(above)

    result = dict(zip(gnames, homes.home, strict=True))
    if orphans:
        count = [len(mine) for mine in held]
        for gi, mi in _greedy(orphans, ghash, scores, floor_quota, extras, count).items():
            result[gnames[gi]] = live[mi]
    return result


def assign(
    groups: Sequence[str],
    members: Mapping[str, int],
    roster: Mapping[str, int] | None = None,
) -> dict[str, str]:
    """Place every group on one live member.

    groups: group names (each unique). members: live member name -> weight (int >= 1).
    roster: every configured member, alive or not -> weight; ``None`` means ``members`` (the
    plain greedy over the live set, with its extra movement). A live name missing from the
    roster is treated as a roster member with its live weight (defensive: the daemon passes
    the whole configured roster). Phase 1 uses the roster's weights, the live quotas the
    weights in ``members``; they are the same when both come from one config.
    Returns {group: member} covering every group, in group-name order; {} if there are no
    members. Raises ValueError on duplicate group names or a weight that is not an int >= 1.
    """
    _check_groups(groups)
    _check_weights("member", members)
    if roster is not None:
        _check_weights("roster member", roster)
    if not members or not groups:
        return {}
    full = dict(roster) if roster is not None else {}
    for name, weight in members.items():
        full.setdefault(name, weight)
    gnames = tuple(sorted(groups))
    return _settle(gnames, _homes(gnames, tuple(sorted(full.items()))), members)


#: `assign`'s shape: (groups, members -> weight, roster -> weight or None) -> group -> member.
Assign = Callable[[Sequence[str], Mapping[str, int], Mapping[str, int] | None], dict[str, str]]


def place(
    groups: Sequence[str],
    members: Mapping[str, int],
    roster: Mapping[str, int] | None = None,
    *,
    pins: Mapping[str, str] | None = None,
    prefer: Mapping[str, Sequence[str]] | None = None,
    assign_with: Assign | None = None,
) -> dict[str, str]:
    """`assign` (or `assign_with`, an equivalent such as `vipd.memo.Memo.assign`), then
    the operator's pins and the pool's preferences on top.

    pins: group -> member (`vipctl move`, reload pins); prefer: group -> members, first
    choice first (Wackamole's Prefer). A group goes to its pinned member if that member is
    in ``members``, else to its first preferred member that is, else where `assign` puts
    it. Both are an overlay on the balanced placement of *every* group, so a pin or
    preference appearing or lapsing (its member dies, is drained, comes back) moves only
    that group; the price is that balance (I5) holds over the groups without one, and a
    member receiving pinned or preferred groups holds them on top of its balanced share.
    Names that are not groups or not members are ignored (a table made on another config).
    """
    placed = (assign_with or assign)(groups, members, roster)
    for group in placed:
        target = pins.get(group) if pins else None
        if target is not None and target in members:
            placed[group] = target
            continue
        for choice in prefer.get(group, ()) if prefer else ():
            if choice in members:
                placed[group] = choice
                break
    return placed
