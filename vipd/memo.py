"""An explicit cache of pure results, shared by many nodes in one process.

A daemon is one node and passes no memo. The simulator runs up to 256 nodes in one process,
where every heartbeat is received N-1 times: verifying its Ed25519 signature (~60 us) and
decoding its body (~75 us at 1,000 groups) are pure functions of the datagram's bytes, and
placement is a pure function of (groups, members, roster) that every node computes for the
same view. `Memo` computes each once: the first receiver really verifies a datagram, every
other receiver gets the same answer (a tampered byte is another key, so a real check). The
tables are bounded; a full table is cleared (the next call computes again).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from vipd.membership import wire
from vipd.placement import assign as assign_module

MAX_ENTRIES = 200_000

K = TypeVar("K")
V = TypeVar("V")


def _cached(table: dict[K, V], key: K, compute: Callable[[], V]) -> V:
    if key in table:
        return table[key]
    if len(table) >= MAX_ENTRIES:
        table.clear()
    value = table[key] = compute()
    return value


class Memo:
    def __init__(self) -> None:
        self._verified: dict[tuple[bytes, bytes, tuple[bytes, ...]], wire.DecodeError | None] = {}
        self._bodies: dict[tuple[bytes, bytes], wire.Heartbeat | wire.DecodeError] = {}
        self._placements: dict[tuple[object, ...], dict[str, str]] = {}

    def verify(self, env: wire.Envelope, keys: tuple[bytes, ...]) -> None:
        """`wire.verify`, once per (signed bytes, signature, candidate keys)."""

        def check() -> wire.DecodeError | None:
            try:
                wire.verify(env, keys)
            except wire.DecodeError as e:
                return e
            return None

        error = _cached(self._verified, (env.signed, env.signature, keys), check)
        if error is not None:
            raise error

    def decode_body(self, env: wire.Envelope) -> wire.Heartbeat:
        """`wire.decode_body`, once per datagram (its result is frozen: safe to share)."""

        def decode() -> wire.Heartbeat | wire.DecodeError:
            try:
                return wire.decode_body(env)
            except wire.DecodeError as e:
                return e

        result = _cached(self._bodies, (env.signed, env.signature), decode)
        if isinstance(result, wire.DecodeError):
            raise result
        return result

    def assign(
        self,
        groups: Sequence[str],
        members: Mapping[str, int],
        roster: Mapping[str, int] | None = None,
    ) -> dict[str, str]:
        """`vipd.placement.assign.assign` (looked up at call time), once per input."""
        key = (
            tuple(groups),
            tuple(sorted(members.items())),
            None if roster is None else tuple(sorted(roster.items())),
        )
        result = _cached(
            self._placements, key, lambda: assign_module.assign(groups, members, roster=roster)
        )
        return dict(result)
