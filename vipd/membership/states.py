"""Member state rules: the one table that says how a peer's state moves.

Inputs are what we learn about a peer: a heartbeat with its flags, or silence for dead_after.
`NEXT[(state, signal)]` is the new state. Every pair that leaves the state as it is is listed
in `UNCHANGED`, so each (state, signal) pair is a decision someone made: a pair is in exactly one
of the two (tests/unit/test_state_table.py walks them all). A new state or signal therefore means
deciding each of its pairs, not inheriting "unchanged" by omission.
"""

from __future__ import annotations

import enum


class MemberState(enum.StrEnum):
    UNKNOWN = "unknown"  # never heard from since we started
    JOINING = "joining"  # heard, still in its startup wait: not yet in placement
    ALIVE = "alive"  # heard and ready: takes part in placement
    LEFT = "left"  # said it is leaving (graceful stop)
    DEAD = "dead"  # silent for dead_after


class Signal(enum.StrEnum):
    HEARD_JOINING = "heard_joining"
    HEARD_READY = "heard_ready"
    HEARD_LEAVING = "heard_leaving"
    SILENT = "silent"  # no valid heartbeat for dead_after


S, G = MemberState, Signal

NEXT: dict[tuple[MemberState, Signal], MemberState] = {
    (S.UNKNOWN, G.HEARD_JOINING): S.JOINING,
    (S.UNKNOWN, G.HEARD_READY): S.ALIVE,
    (S.UNKNOWN, G.HEARD_LEAVING): S.LEFT,
    (S.JOINING, G.HEARD_READY): S.ALIVE,
    (S.JOINING, G.HEARD_LEAVING): S.LEFT,
    (S.JOINING, G.SILENT): S.DEAD,
    (S.ALIVE, G.HEARD_JOINING): S.JOINING,  # restarted and listening again
    (S.ALIVE, G.HEARD_LEAVING): S.LEFT,
    (S.ALIVE, G.SILENT): S.DEAD,
    (S.LEFT, G.HEARD_JOINING): S.JOINING,
    (S.LEFT, G.HEARD_READY): S.ALIVE,
    (S.DEAD, G.HEARD_JOINING): S.JOINING,
    (S.DEAD, G.HEARD_READY): S.ALIVE,
    (S.DEAD, G.HEARD_LEAVING): S.LEFT,
}

#: Pairs deliberately left as they are (`next_state` returns the state itself).
UNCHANGED: frozenset[tuple[MemberState, Signal]] = frozenset(
    {
        (S.UNKNOWN, G.SILENT),  # never heard, so nothing to time out (not MONITORED)
        (S.JOINING, G.HEARD_JOINING),
        (S.ALIVE, G.HEARD_READY),
        (S.LEFT, G.HEARD_LEAVING),  # its last goodbyes still arriving
        (S.LEFT, G.SILENT),  # a peer that left is expected to go quiet: it is not DEAD
        (S.DEAD, G.SILENT),
    }
)

#: States in which a peer is expected to keep sending heartbeats (and so can time out).
MONITORED = frozenset({S.JOINING, S.ALIVE})


def next_state(state: MemberState, signal: Signal) -> MemberState:
    return NEXT.get((state, signal), state)
