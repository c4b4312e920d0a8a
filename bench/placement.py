"""Placement benchmark: time to compute an assignment, and groups moved per membership change.

Run: ``python bench/placement.py`` (options: ``--repeats``, ``--trials``, ``--seed``).
Prints two tables and exits 0.

Timing: "cold" empties both memos (name hashes and phase 1), as at start or after a reload,
so it is phase 1 plus a trivial phase 2; "warm" is a view change with the roster unchanged,
which is phase 2 alone.

Movement is counted in groups (each group is one or more addresses that move together)
against the optimum, for three changes of one random roster:

- leave: everyone was live, member ``x`` leaves; ``x``'s groups must move.
- rejoin: ``x`` comes back to the full cluster; the groups it receives must move.
- 2nd leave: ``x`` is still dead and ``y`` leaves; ``y``'s groups must move.

Everything else that moves is "extra". Each change is placed twice: with the roster
(``assign(groups, live, roster)``, two-phase) and, for comparison, without it
(``assign(groups, live)``: the balanced greedy over the live set alone).

A third table counts pool edits (a reload adding or removing one group, whole roster live):
the unchanged groups whose balanced placement changes. A reload pins exactly those where they
are (`Controller.reload_pins`), so none of them moves; the table shows how many pins an edit
costs. The first table also times `place` with 50 pins and 50 preferences (warm).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from vipd.placement.assign import _homes, _name_hash, assign, place

WeightFn = Callable[[random.Random], int]
Placement = Mapping[str, str]


def equal_weight(rng: random.Random) -> int:
    return 1


def mixed_weight(rng: random.Random) -> int:
    return rng.choice((1, 2, 3, 4))


def names(rng: random.Random, prefix: str, count: int) -> list[str]:
    """Random distinct names: sequential ones would flatter nothing, but look artificial."""
    out: set[str] = set()
    while len(out) < count:
        out.add(f"{prefix}{rng.getrandbits(40):010x}")
    return sorted(out)


def time_warm(
    groups: list[str], live: dict[str, int], roster: dict[str, int], repeats: int
) -> float:
    """Median wall time in ms of a placement whose phase 1 and name hashes are memoised."""
    assign(groups, live, roster)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        assign(groups, live, roster)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def time_overlay(groups: list[str], roster: dict[str, int], repeats: int) -> float:
    """Median ms of `place` (warm) with 50 pins and 50 three-member preferences on top."""
    rng = random.Random(7)
    members = sorted(roster)
    pins = {g: rng.choice(members) for g in rng.sample(groups, 50)}
    prefer = {g: rng.sample(members, 3) for g in rng.sample(groups, 50)}
    place(groups, roster, roster, pins=pins, prefer=prefer)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        place(groups, roster, roster, pins=pins, prefer=prefer)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def pool_edit_shifts(groups: list[str], roster: dict[str, int], extra: str) -> tuple[int, int]:
    """Unchanged groups whose owner changes when `extra` is added, and when groups[0] goes."""
    base = assign(groups, roster, roster)
    added = assign([*groups, extra], roster, roster)
    removed = assign(groups[1:], roster, roster)
    return (
        sum(1 for g in groups if added[g] != base[g]),
        sum(1 for g in groups[1:] if removed[g] != base[g]),
    )


def time_cold(groups: list[str], roster: dict[str, int], repeats: int) -> float:
    """Median wall time in ms with both memos emptied first (start, or a reload)."""
    samples = []
    for _ in range(repeats):
        _name_hash.cache_clear()
        _homes.cache_clear()
        start = time.perf_counter()
        assign(groups, roster, roster)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


@dataclass(frozen=True)
class Movement:
    optimum: int  # groups that had to move
    moved: int  # groups that changed owner

    @property
    def extra(self) -> int:
        return self.moved - self.optimum


def moved(before: Placement, after: Placement) -> int:
    return sum(1 for g, m in before.items() if after[g] != m)


def held_by(placement: Placement, member: str) -> int:
    return sum(1 for m in placement.values() if m == member)


def changes(
    groups: list[str], roster: dict[str, int], x: str, y: str, use_roster: bool
) -> tuple[Movement, Movement, Movement]:
    """(leave x from full, rejoin x to full, leave y while x is dead)."""
    minus_x = {m: w for m, w in roster.items() if m != x}
    minus_xy = {m: w for m, w in minus_x.items() if m != y}
    anchor = roster if use_roster else None
    full = assign(groups, roster, anchor)
    one_dead = assign(groups, minus_x, anchor)
    back = assign(groups, roster, anchor)
    two_dead = assign(groups, minus_xy, anchor)
    return (
        Movement(held_by(full, x), moved(full, one_dead)),
        Movement(held_by(back, x), moved(one_dead, back)),
        Movement(held_by(one_dead, y), moved(one_dead, two_dead)),
    )


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]
    for row in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cell (median)")
    parser.add_argument("--trials", type=int, default=20, help="random rosters per row")
    parser.add_argument("--seed", type=int, default=1, help="seed for names and choices")
    args = parser.parse_args()
    rng = random.Random(args.seed)

    print(f"placement time, median of {args.repeats} runs (ms), equal weights unless noted")
    print("cold = phase 1 (memos empty: start, reload); warm = phase 2 only (a view change)")
    rows: list[tuple[str, ...]] = []
    for n_groups in (1000, 10000):
        for n_members in (32, 256):
            groups = names(rng, "g", n_groups)
            roster = {m: 1 for m in names(rng, "n", n_members)}
            mixed = {m: mixed_weight(rng) for m in roster}
            order = sorted(roster, key=lambda _: rng.random())
            one_dead = {m: 1 for m in order[1:]}
            eighth_dead = {m: 1 for m in order[n_members // 8 :]}
            rows.append(
                (
                    str(n_groups),
                    str(n_members),
                    f"{time_cold(groups, roster, args.repeats):.1f}",
                    f"{time_cold(groups, mixed, args.repeats):.1f}",
                    f"{time_warm(groups, roster, roster, args.repeats):.2f}",
                    f"{time_warm(groups, one_dead, roster, args.repeats):.2f}",
                    f"{time_warm(groups, eighth_dead, roster, args.repeats):.2f}",
                    f"{time_overlay(groups, roster, args.repeats):.2f}",
                )
            )
    print_table(
        (
            "groups",
            "members",
            "cold",
            "cold w 1-4",
            "warm all live",
            "warm 1 dead",
            "warm 1/8 dead",
            "warm +pins/prefs",
        ),
        rows,
    )

    print()
    print(f"groups moved per change, {args.trials} random rosters per row")
    print("optimum: leave / 2nd leave = the leaver's groups, rejoin = the joiner's new groups")
    cases = [
        (100, 8, equal_weight, "equal"),
        (1000, 32, equal_weight, "equal"),
        (1000, 32, mixed_weight, "1-4"),
        (1000, 256, equal_weight, "equal"),
        (10000, 32, equal_weight, "equal"),
    ]
    kinds = ("leave", "rejoin", "2nd leave")
    rows = []
    for n_groups, n_members, weight, wlabel in cases:
        runs: dict[bool, list[tuple[Movement, Movement, Movement]]] = {True: [], False: []}
        for _ in range(args.trials):
            groups = names(rng, "g", n_groups)
            roster = {m: weight(rng) for m in names(rng, "n", n_members)}
            x, y = rng.sample(sorted(roster), 2)
            for use_roster in (True, False):
                runs[use_roster].append(changes(groups, roster, x, y, use_roster))
        for k, kind in enumerate(kinds):
            two = [r[k] for r in runs[True]]
            old = [r[k] for r in runs[False]]
            rows.append(
                (
                    f"{n_groups}x{n_members} {wlabel}",
                    kind,
                    f"{statistics.mean(r.optimum for r in two):.1f}",
                    f"{statistics.mean(r.moved for r in two):.1f}",
                    f"{statistics.mean(r.extra for r in two):.1f}",
                    str(max(r.extra for r in two)),
                    f"{statistics.mean(r.extra for r in old):.1f}",
                    str(max(r.extra for r in old)),
                )
            )
    print_table(
        (
            "case",
            "change",
            "optimum",
            "moved",
            "extra mean",
            "extra max",
            "no-roster extra mean",
            "no-roster max",
        ),
        rows,
    )

    print()
    print(f"pool edits: unchanged groups a reload pins in place, {args.trials} rosters per row")
    rows = []
    for n_groups, n_members in ((100, 8), (1000, 32), (1000, 256), (10000, 32)):
        shifts = []
        for _ in range(args.trials):
            groups = names(rng, "g", n_groups)
            roster = {m: 1 for m in names(rng, "n", n_members)}
            shifts.append(pool_edit_shifts(groups, roster, f"new{rng.getrandbits(40):010x}"))
        rows.append(
            (
                f"{n_groups}x{n_members}",
                f"{statistics.mean(a for a, _ in shifts):.1f}",
                str(max(a for a, _ in shifts)),
                f"{statistics.mean(r for _, r in shifts):.1f}",
                str(max(r for _, r in shifts)),
            )
        )
    print_table(("case", "add: pins mean", "max", "remove: pins mean", "max"), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
