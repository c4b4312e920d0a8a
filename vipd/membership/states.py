"""Member state rules: the one table that says how a peer's state moves.

Inputs are what we learn about a peer: a heartbeat with its flags, or silence for dead_after.
`NEXT[(state, signal)]` is the new state; a pair missing from the table leaves it unchanged.
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

#: States in which a peer is expected to keep sending heartbeats (and so can time out).
MONITORED = frozenset({S.JOINING, S.ALIVE})


def next_state(state: MemberState, signal: Signal) -> MemberState:
    return NEXT.get((state, signal), state)
