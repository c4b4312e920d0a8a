"""An opt-in fast path for very large simulated clusters (the 256-node run), and only there.

At N nodes every heartbeat is received N-1 times; per reception the core spends about 60 us
verifying the Ed25519 signature, about 75 us decoding a 1,000-group bitmap, and O(N) in
`MembershipCore._update_view` (about 200 us at N = 256, mostly `IntFlag` arithmetic and one
hash update per member). At 256 nodes one heartbeat round is 65,280 receptions, ~19 s of CPU.

`fast_path()` patches four things, each equivalent to the original:

- `wire.verify`: memoised on (signed bytes, signature, candidate keys). Ed25519 verification
  is a pure function of those, so the first receiver of a datagram really verifies it and
  every other receiver gets the same answer (a tampered byte is another key: a real check).
- `wire.decode_body`: memoised on the envelope's signed bytes (a pure function of them; the
  result is a frozen dataclass, safe to share).
- `MembershipCore._update_view`: the same computation with plain-int flag tests and one hash
  over the joined entries (SHA-256 of a concatenation equals the incremental updates); and
  when it runs inside `_apply(sender, ...)` (wrapped to say which sender), where only that
  peer's record and our own hold-down can change, it compares just those two against the
  inputs of the last full computation and reuses its view if they are unchanged: O(1)
  instead of O(N) per datagram.
- `vipd.placement.assign.assign` (which `vipd.placement.assign.place` calls): memoised
  across all simulated nodes on (groups, members, roster); placement is a pure,
  deterministic function of those
  (I4), and the 256 controllers compute the same views (about 10 ms each at 1,000 groups
  while the cluster forms).

`test_fastpath_is_equivalent` runs seeded schedules with and without it and requires the
traces to be identical line for line. Every other simulator run uses the real code only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from vipd.membership import wire
from vipd.membership.core import MembershipCore, Peer, View
from vipd.membership.events import ViewChanged
from vipd.membership.states import MONITORED
from vipd.placement import assign as assign_module

_HOLDDOWN = int(wire.Flag.HOLDDOWN)
_ORIGINAL_APPLY = MembershipCore._apply


@dataclass
class _ViewCache:
    """The inputs and result of the last view computation of one core."""

    me: tuple[object, ...]  # our own fields the view depends on
    peers: dict[str, tuple[object, ...]]  # each peer's fields the view depends on
    placed: dict[str, tuple[str, int, int]]  # name -> (name, incarnation, weight), not held down
    held_down: dict[str, tuple[str, int, int]]  # the same for members in hold-down
    drained: dict[str, tuple[str, int, int]]  # the same for members the operator drained
    chosen: tuple[tuple[str, int, int], ...]  # sorted entries the view was built from
    view: View


def _self_key(core: MembershipCore) -> tuple[object, ...]:
    # The operator table decides drains for everyone: a new table means a full rebuild.
    return (
        core.leaving,
        core.overrides.digest,
        core.holddown_until is None,
        core.incarnation,
        core.weight,
    )


def _peer_key(p: Peer) -> tuple[object, ...]:
    return (p.state in MONITORED and p.config_ok, int(p.flags) & _HOLDDOWN, p.incarnation, p.weight)


def _place(cache: _ViewCache, p: Peer, key: tuple[object, ...], drained: bool) -> None:
    cache.peers[p.name] = key
    cache.placed.pop(p.name, None)
    cache.held_down.pop(p.name, None)
    cache.drained.pop(p.name, None)
    eligible, flags = key[0], int(key[1])  # type: ignore[call-overload]
    if eligible:
        entry = (p.name, p.incarnation, p.weight)
        if drained:
            cache.drained[p.name] = entry
        else:
            (cache.held_down if flags & _HOLDDOWN else cache.placed)[p.name] = entry


def _full(self: MembershipCore) -> _ViewCache:
    cache = _ViewCache(_self_key(self), {}, {}, {}, {}, (), View())
    drained = self.overrides.drained
    if not self.leaving:
        me = (self.name, self.incarnation, self.weight)
        if self.name in drained:
            cache.drained[self.name] = me
        else:
            (cache.held_down if self.holddown_until is not None else cache.placed)[self.name] = me
    for p in self.peers.values():
        _place(cache, p, _peer_key(p), p.name in drained)
    return cache


def _update_view(self: MembershipCore) -> None:
    """`MembershipCore._update_view`, incremental (see the module docstring)."""
    old: _ViewCache | None = getattr(self, "_fast_view", None)
    sender: Peer | None = getattr(self, "_fast_sender", None)
    if old is not None and sender is not None and old.me == _self_key(self):
        # Within `_apply(sender, ...)` only the sender's record and our own hold-down can
        # change: update the sender's entry alone.
        key = _peer_key(sender)
        if old.peers.get(sender.name) == key:
            self.view = old.view  # the original would build an equal view: no event
            return
        cache = old
        _place(cache, sender, key, sender.name in self.overrides.drained)
    else:
        cache = _full(self)
    chosen = tuple(sorted((cache.placed or cache.held_down or cache.drained).values()))
    if old is not None and old.chosen == chosen:
        view = old.view
    else:
        blob = b"".join(f"{name}:{inc}\n".encode() for name, inc, _ in chosen)
        view = View(
            members=tuple(e[0] for e in chosen),
            weights=tuple(e[2] for e in chosen),
            digest=hashlib.sha256(b"vipd-view-v2\0" + self.overrides.digest + blob).digest()[
                : wire.DIGEST_LEN
            ],
        )
    cache.chosen, cache.view = chosen, view
    self._fast_view = cache  # type: ignore[attr-defined]
    if view.members != self.view.members:
        self.view = view
        self._events.append(ViewChanged(view.members, view.digest_hex))
    else:
        self.view = view


def _apply(
    self: MembershipCore, peer: Peer, hb: wire.Heartbeat, *, now: float, wall: float
) -> None:
    """`MembershipCore._apply`, telling `_update_view` which peer it is about."""
    self._fast_sender = peer  # type: ignore[attr-defined]
    try:
        _ORIGINAL_APPLY(self, peer, hb, now=now, wall=wall)
    finally:
        self._fast_sender = None  # type: ignore[attr-defined]


def _memo(fn: Callable[..., Any], key: Callable[..., Any]) -> Callable[..., Any]:
    cache: dict[Any, tuple[bool, Any]] = {}

    def wrapper(*args: Any) -> Any:
        k = key(*args)
        hit = cache.get(k)
        if hit is None:
            try:
                hit = (True, fn(*args))
            except wire.DecodeError as e:
                hit = (False, e)
            cache[k] = hit
        ok, value = hit
        if not ok:
            raise value
        return value

    return wrapper


def _memo_assign(fn: Callable[..., dict[str, str]]) -> Callable[..., dict[str, str]]:
    cache: dict[tuple[object, ...], dict[str, str]] = {}

    def assign(
        groups: Sequence[str], members: Mapping[str, int], roster: Mapping[str, int] | None = None
    ) -> dict[str, str]:
        key = (
            tuple(groups),
            tuple(sorted(members.items())),
            None if roster is None else tuple(sorted(roster.items())),
        )
        if key not in cache:
            cache[key] = fn(groups, members, roster=roster)
        return dict(cache[key])

    return assign


@contextmanager
def fast_path(*, incremental_view: bool = True) -> Iterator[None]:
    """Patch the hot spots for the duration of the block (see the module docstring).

    ``incremental_view=False`` keeps the real `_update_view` and only memoises the three pure
    functions: what the bulk random sweep uses, so the membership code it checks is exactly
    the shipped code. The memo tables live as long as the block: one block per seed."""
    saved_assign = assign_module.__dict__["assign"]
    saved = (wire.verify, wire.decode_body, MembershipCore._update_view, MembershipCore._apply)
    wire.verify = _memo(wire.verify, lambda env, keys: (env.signed, env.signature, tuple(keys)))
    wire.decode_body = _memo(wire.decode_body, lambda env: (env.signed, env.signature))
    if incremental_view:
        MembershipCore._update_view = _update_view  # type: ignore[method-assign]
        MembershipCore._apply = _apply  # type: ignore[method-assign]
    assign_module.__dict__["assign"] = _memo_assign(saved_assign)
    try:
        yield
    finally:
        assign_module.__dict__["assign"] = saved_assign
        wire.verify, wire.decode_body = saved[0], saved[1]
        MembershipCore._update_view = saved[2]  # type: ignore[method-assign]
        MembershipCore._apply = saved[3]  # type: ignore[method-assign]
