"""The membership core: sans-IO, driven by `receive`, `handle_timer` and `datagrams_to_send`.

Nothing here opens a socket, reads a clock or draws global randomness: time comes in as
``now=`` (monotonic seconds) and ``wall=`` (Unix seconds, for send times and freshness), and
jitter from an injected ``random.Random``. The asyncio shell (`vipd.daemon`) feeds it.

Remote input never raises out of `receive`: a bad datagram becomes a `PacketRejected` event
and a counter named by its reason. Checks run cheapest first (size, structure, cluster,
sender, replay window, freshness) so that a flood of junk never costs a signature check.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vipd.config import Config
from vipd.counters import Counters
from vipd.membership import wire
from vipd.membership.admission import Admission
from vipd.membership.events import (
    BecameMature,
    BecameReady,
    ClockSkew,
    ConfigMismatch,
    DuplicateGone,
    DuplicateNode,
    Event,
    HolddownStarted,
    IncarnationWentBack,
    LoopStalled,
    MemberJoined,
    MemberLost,
    MemberRestarted,
    MemberStateChanged,
    OverridesAdopted,
    OverridesRefused,
    PacketRejected,
    PoolDiffers,
    SelfDisrupted,
    ViewChanged,
)
from vipd.membership.states import MONITORED, MemberState, Signal, next_state
from vipd.membership.wire import DecodeError, Flag, Heartbeat, Reject, Stats
from vipd.placement.overrides import (
    MAX_VERSION_STEP,
    SIGNATURE_LEN,
    Overrides,
    OverridesError,
)

if TYPE_CHECKING:
    from vipd.memo import Memo

#: How many heartbeats a leaving node sends at once: one lost datagram must not hide it.
LEAVE_BURST = 3
#: Hold-down doubles with each further flap, up to this factor.
HOLDDOWN_MAX_FACTOR = 8
#: How many of a peer's latest datagrams a copy is recognised for (a late duplicate).
RECENT = 8


@dataclass
class Peer:
    """What we know about one other roster member."""

    name: str
    public_keys: tuple[bytes, ...]
    weight: int
    state: MemberState = MemberState.UNKNOWN
    incarnation: int = 0
    seq: int = 0
    last_heard: float | None = None
    deadline: float | None = None
    flags: Flag = Flag.NONE
    view_digest: bytes = b""
    config_digest: bytes = b""
    config_ok: bool = True
    # As advertised: indices into the pool named by `pool_digest` (see `_advertised`).
    held: frozenset[int] = frozenset()
    released: frozenset[int] = frozenset()  # groups it says it let go of lately
    pool_digest: bytes | None = None
    stats: Stats | None = None
    skew: float = 0.0
    skew_warned: bool = False
    sent_ms: int = 0  # send time of the newest datagram taken from it


@dataclass(frozen=True)
class View:
    """The members that take part in placement (joining or ready), with their weights."""

    members: tuple[str, ...] = ()
    weights: tuple[int, ...] = ()
    digest: bytes = field(default=b"\0" * wire.DIGEST_LEN)

    @property
    def digest_hex(self) -> str:
        return self.digest.hex()

    def as_weights(self) -> dict[str, int]:
        return dict(zip(self.members, self.weights, strict=True))


class MembershipCore:
    def __init__(
        self,
        config: Config,
        key: Ed25519PrivateKey,
        public_key: bytes,
        *,
        incarnation: int,
        now: float,
        rng: random.Random,
        nonce: bytes | None = None,
        seen: Mapping[str, tuple[int, int]] | None = None,
        counters: Counters | None = None,
        memo: Memo | None = None,
    ) -> None:
        self.config = config
        self.timing = config.timing
        self.name = config.node
        self.incarnation = incarnation
        # Random per run (the daemon passes os.urandom): a verified datagram under our name
        # with another nonce is a second instance of this node, not our own echo. The
        # default, from the incarnation, only tells apart runs that started at different ms.
        self.nonce = nonce if nonce is not None else incarnation.to_bytes(wire.NONCE_LEN)
        # The other instance's (incarnation, nonce) and when we last heard it; while set we
        # hold nothing (flag DUPLICATE) so that at most one of the two serves.
        self._other: tuple[int, bytes] | None = None
        self._other_heard: float | None = None
        # (incarnation, send time in ms) of the newest datagram an earlier run of ours took
        # from each peer (state_dir): until we hear a peer anew, anything not after that is a
        # replay, so a restarted receiver is not fooled by captures (see `seen`).
        self._seen_before: dict[str, tuple[int, int]] = dict(seen or {})
        self._key = key
        self._public_key = public_key
        self._rng = rng
        self._config_digest = config.digest
        self._group_count = len(config.pool)
        self._pool_digest = config.pool_digest
        # Pools whose indices we can read: ours (identity) and, after a pool reload, the one
        # before it (its index -> ours, None for a group it no longer has).
        self._pools: dict[bytes, tuple[int | None, ...] | None] = {self._pool_digest: None}
        self.overrides = Overrides()
        # Tables refused lately, by (digest, signature): a forged table relayed with every
        # heartbeat costs one signature check and one report, not one per datagram.
        self._refused_tables: deque[tuple[bytes, bytes]] = deque(maxlen=8)
        # Per peer, the signatures of its last RECENT accepted datagrams -> whether a copy was
        # seen: one copy of each is the network duplicating a frame, not a replay (`_admit`).
        # Admission bookkeeping like the rejection budget, so kept apart from the peer record.
        self._recent: dict[str, dict[bytes, bool]] = {}
        me = config.member(config.node)
        self.weight = me.weight if me is not None else 1
        self.peers: dict[str, Peer] = {
            m.name: Peer(name=m.name, public_keys=m.public_keys, weight=m.weight)
            for m in config.roster
            if m.name != config.node
        }
        self.started = now
        self.ready = False
        self.mature = False
        self.leaving = False
        self.holddown_until: float | None = None
        self._disruptions: deque[float] = deque()
        self._isolated = False  # every peer we had was lost: we may be the one cut off
        self._admission = Admission(config.accept_from)
        self._holders_version = 0
        self._holders_cache: (
            tuple[int, dict[int, frozenset[str]], dict[int, frozenset[str]]] | None
        ) = None
        self.held: frozenset[int] = frozenset()
        self._released: dict[int, float] = {}  # group index -> when we let go of it
        self.stats: Stats | None = None
        self.counters = counters if counters is not None else Counters()
        # Pure checks, shared between nodes when a memo is given (the simulator).
        self._verify = memo.verify if memo is not None else wire.verify
        self._decode_body = memo.decode_body if memo is not None else wire.decode_body
        self.view = View()
        self._seq = 0
        self._events: deque[Event] = deque()
        self._next_heartbeat = now
        self._pending_burst = 0
        self._armed: float | None = None
        self._update_view()

    @property
    def rejected(self) -> Mapping[str, int]:
        """Rejected datagrams by reason (read-only; `Counters` owns them)."""
        return self.counters.rejections

    # --- inputs --------------------------------------------------------------------------

    def receive(self, data: bytes, source: str, *, now: float, wall: float) -> None:
        """Take one datagram from the network. Never raises for remote input.

        Cheapest checks first: source allowed, the source's rejection budget (neither parses
        the datagram), then size and structure, cluster, sender, replay window and send time,
        and only then the signature."""
        if not self._admission.source_allowed(source):
            self._reject(Reject.SOURCE_NOT_ALLOWED, source, None, "not in cluster.accept_from")
            return
        drop, first = self._admission.limited(source, now)
        if drop:
            self.counters.reject(Reject.RATE_LIMITED)
            if first:  # one event per dry spell: a flood must not queue one per datagram
                self._events.append(
                    PacketRejected(Reject.RATE_LIMITED.value, source, None, "too many rejects")
                )
            return
        sender: str | None = None
        try:
            env = wire.parse_envelope(data)
            sender = env.sender
            if sender == self.name and env.cluster == self.config.cluster:
                self._own_name(env, source, now=now, wall=wall)  # always raises
            peer = self._admit(env, wall)
            self._verify(env, peer.public_keys)
            hb = self._decode_body(env)
        except DecodeError as e:
            # Neither a copy of a genuine datagram nor the other instance of this node may
            # run a source dry: one would cost a genuine peer, the other hide the clone.
            if e.reason not in (Reject.DUPLICATE, Reject.DUPLICATE_NODE):
                self._admission.charge(source, now)
            self._reject(e.reason, source, sender, e.detail)
            return
        self.counters.inc("rx_accepted")
        self._seen_before.pop(peer.name, None)
        recent = self._recent.setdefault(peer.name, {})
        recent[env.signature] = False
        if len(recent) > RECENT:
            del recent[next(iter(recent))]
        self._apply(peer, hb, now=now, wall=wall)

    def _reject(self, reason: Reject, source: str, sender: str | None, detail: str) -> None:
        self.counters.reject(reason)
        self._events.append(PacketRejected(reason.value, source, sender, detail))

    def _own_name(self, env: wire.Envelope, source: str, *, now: float, wall: float) -> None:
        """A datagram under our own name. Signed with our key, fresh, and with another
        nonce, it comes from a second instance of this node (a cloned machine or config):
        hold nothing while we hear it (DuplicateNode). Anything else is a spoof or our own
        echo (OWN_NAME, charged). Raises DecodeError either way."""
        if abs(env.send_time_ms / 1000.0 - wall) > self.timing.freshness_window:
            raise DecodeError(Reject.OWN_NAME, "a stale datagram in this node's name")
        try:
            self._verify(env, (self._public_key,))
            nonce = wire.decode_body(env).nonce
        except DecodeError:
            raise DecodeError(Reject.OWN_NAME, "a datagram claims to be from this node") from None
        if not nonce or nonce == self.nonce:
            raise DecodeError(Reject.OWN_NAME, "this node's own datagram, heard back")
        other = (env.incarnation, nonce)
        if other != self._other:
            self.counters.inc("duplicate_nodes")
            self._events.append(DuplicateNode(env.incarnation, nonce.hex(), source))
        started = self._other_heard is None
        self._other, self._other_heard = other, now
        if started:  # the flag and our own view change: once, not per datagram
            self._pending_burst = max(self._pending_burst, 1)
            self._update_view()
        raise DecodeError(Reject.DUPLICATE_NODE, f"incarnation {env.incarnation} from {source}")

    def seen(self) -> dict[str, tuple[int, int]]:
        """Per peer, (incarnation, send time in ms) of the newest datagram taken from it,
        by this run or (not heard since) an earlier one: for `state_dir`, so that the
        next run refuses captures of these (the `seen` argument)."""
        out = dict(self._seen_before)
        for p in self.peers.values():
            if p.incarnation:
                out[p.name] = (p.incarnation, p.sent_ms)
        return out

    @property
    def duplicate(self) -> bool:
        """Whether another instance of this node was heard within dead_after."""
        return self._other_heard is not None

    def _duplicate_expired(self, now: float) -> None:
        """The other instance went quiet: take part again, above its incarnation, because
        our peers accepted its heartbeats last and would take ours for replays."""
        if self._other_heard is None or now < self._other_heard + self.timing.dead_after:
            return
        assert self._other is not None
        old = self.incarnation
        if self._other[0] >= self.incarnation:
            self.incarnation, self._seq = self._other[0] + 1, 0
        self._other_heard = None
        self._pending_burst = max(self._pending_burst, 1)
        self._events.append(DuplicateGone(old, self.incarnation))

    def _admit(self, env: wire.Envelope, wall: float) -> Peer:
        """Cheap checks on an unverified envelope; returns the sender's peer record."""
        if env.cluster != self.config.cluster:
            raise DecodeError(Reject.WRONG_CLUSTER, f"cluster {env.cluster!r}")
        if env.sender == self.name:
            raise DecodeError(Reject.OWN_NAME, "a datagram claims to be from this node")
        peer = self.peers.get(env.sender)
        if peer is None:
            raise DecodeError(Reject.UNKNOWN_SENDER, f"{env.sender!r} is not in the roster")
        monitored = peer.state in MONITORED
        if (env.incarnation, env.seq) <= (peer.incarnation, peer.seq) and not _rolled_back(
            env, peer.incarnation, monitored=monitored
        ):
            # Ed25519 signatures are deterministic: the signature of a datagram we accepted
            # lately names it. The first copy of each is the network duplicating a frame, and
            # a genuine peer must not pay for it; any further copy is a replay.
            recent = self._recent.get(peer.name, {})
            if recent.get(env.signature) is False:
                recent[env.signature] = True
                raise DecodeError(Reject.DUPLICATE, f"a copy of ({env.incarnation}, {env.seq})")
            raise DecodeError(
                Reject.REPLAY,
                f"({env.incarnation}, {env.seq}) not after ({peer.incarnation}, {peer.seq})",
            )
        before = self._seen_before.get(env.sender)
        if (
            before is not None
            and (env.incarnation, env.send_time_ms) <= before
            and not _rolled_back(env, before[0], monitored=monitored)
        ):
            raise DecodeError(
                Reject.REPLAY,
                f"({env.incarnation}, sent {env.send_time_ms} ms) not after"
                f" {before} taken before this node restarted",
            )
        skew = env.send_time_ms / 1000.0 - wall
        if abs(skew) > self.timing.freshness_window:
            raise DecodeError(Reject.STALE, f"send time {skew:+.1f} s from ours")
        return peer

    def _apply(self, peer: Peer, hb: Heartbeat, *, now: float, wall: float) -> None:
        # Almost every heartbeat changes nothing the view depends on: the O(N) view rebuild
        # runs only when this peer's part of it, or our own hold-down, changed.
        view_inputs: tuple[object, ...] | None = (_view_entry(peer), self.holddown_until is None)
        if peer.incarnation and hb.incarnation > peer.incarnation and peer.state in MONITORED:
            self._events.append(MemberRestarted(peer.name, peer.incarnation, hb.incarnation))
        elif hb.incarnation < peer.incarnation:  # let through by _rolled_back
            self._events.append(IncarnationWentBack(peer.name, peer.incarnation, hb.incarnation))
        if self._isolated and peer.state == MemberState.DEAD:
            self._isolated = False
            if hb.incarnation == peer.incarnation:
                # A peer we had lost is back unchanged (no restart): the cut was on our side,
                # or a partition; either way we were out of the cluster.
                self._disrupted("rejoined after losing every peer", now)
        peer.incarnation, peer.seq = hb.incarnation, hb.seq
        peer.sent_ms = hb.send_time_ms
        peer.last_heard = now
        peer.deadline = now + self.timing.dead_after
        peer.flags = hb.flags
        peer.view_digest = hb.view_digest
        peer.stats = hb.stats
        peer.skew = hb.send_time_ms / 1000.0 - wall
        if abs(peer.skew) > self.timing.freshness_window / 2 and not peer.skew_warned:
            peer.skew_warned = True
            self._events.append(ClockSkew(peer.name, round(peer.skew, 3)))

        config_ok = hb.config_digest == self._config_digest
        if not config_ok and peer.config_ok:
            self.counters.inc("config_mismatch")
            self._events.append(
                ConfigMismatch(peer.name, hb.config_digest.hex(), self._config_digest.hex())
            )
        peer.config_ok = config_ok
        peer.config_digest = hb.config_digest
        if hb.pool_digest != peer.pool_digest and hb.pool_digest != self._pool_digest:
            self._events.append(
                PoolDiffers(
                    peer.name, (hb.pool_digest or b"").hex() or "-", self._pool_digest.hex()
                )
            )
        held = hb.held if config_ok else frozenset()
        released = hb.released if config_ok else frozenset()
        if (held, released, hb.pool_digest) != (peer.held, peer.released, peer.pool_digest):
            peer.held, peer.released, peer.pool_digest = held, released, hb.pool_digest
            self._holders_version += 1
        newer = config_ok and hb.overrides.newer_than(self.overrides)
        if newer and self._table_accepted(hb.overrides, peer.name):
            self._adopt(hb.overrides, peer.name)
            view_inputs = None  # drains may have changed: rebuild the view
        if not self.mature and hb.flags & Flag.READY:
            # Joining a running cluster: someone is already serving, no reason to wait.
            self._become_mature("heard a ready member")

        if hb.flags & Flag.LEAVING:
            signal = Signal.HEARD_LEAVING
        elif hb.flags & Flag.READY:
            signal = Signal.HEARD_READY
        else:
            signal = Signal.HEARD_JOINING
        self._transition(peer, signal)
        self._maybe_ready_early(now)
        if view_inputs is None or (_view_entry(peer), self.holddown_until is None) != view_inputs:
            self._update_view()

    def handle_timer(self, *, now: float) -> None:
        """Run whatever is due: stall detection, peer expiry, the end of the startup wait."""
        if self._armed is not None and now - self._armed > self.timing.heartbeat_interval:
            # Our own loop ran late (GC, CPU starvation, suspended VM). Peers' heartbeats may
            # be sitting unread in the socket: give them a fresh chance instead of failing them.
            lag = now - self._armed
            self.counters.inc("loop_stalls")
            self._events.append(LoopStalled(round(lag, 3)))
            if lag >= self.timing.dead_after:
                self._disrupted("loop stalled longer than dead_after", now)
            grace = now + 2 * self.timing.heartbeat_interval
            for peer in self.peers.values():
                if peer.state in MONITORED and peer.deadline is not None:
                    peer.deadline = max(peer.deadline, grace)
        had_peers = any(p.state in MONITORED for p in self.peers.values())
        for peer in self.peers.values():
            if peer.deadline is None or peer.deadline > now:
                continue
            if peer.state in MONITORED:
                self._transition(peer, Signal.SILENT)
            elif _advertises(peer):
                # It said goodbye and went quiet: like a dead peer, it holds nothing we can
                # count on (its "held nothing" may simply have been lost).
                peer.held = peer.released = frozenset()
                self._holders_version += 1
        if had_peers and not any(p.state in MONITORED for p in self.peers.values()):
            self._isolated = True
        if not self.ready and now >= self.started + self.timing.startup_wait:
            self._become_ready(now)
        if not self.mature and now >= self.started + self.timing.mature_after:
            self._become_mature("mature_after passed with no ready member heard")
        if self.holddown_until is not None and now >= self.holddown_until:
            self.holddown_until = None
            self._pending_burst = max(self._pending_burst, 1)  # the flag changed
        self._duplicate_expired(now)
        self._update_view()

    def leave(self) -> None:
        """Graceful stop: announce LEAVING at once and drop out of placement."""
        if not self.leaving:
            self.leaving = True
            self._pending_burst = LEAVE_BURST
            self._update_view()

    def set_held(self, groups: frozenset[int], *, now: float) -> None:
        """Tell the core what this node actually holds; a change is announced at once, so a
        make-before-break handover completes in one datagram instead of one interval.

        Groups let go of are advertised as RELEASED for 2 x dead_after: clients may still
        point here (a claim's frames, then a release between two heartbeats that nobody
        saw), so their owner announces them again."""
        if groups != self.held:
            for index in self.held - groups:
                self._released[index] = now
            for index in groups:
                self._released.pop(index, None)
            self.held = groups
            # A leaving node's releases are its last word: one lost datagram must not
            # leave the others believing it still holds the group.
            self._pending_burst = max(self._pending_burst, LEAVE_BURST if self.leaving else 1)

    def set_overrides(self, table: Overrides, source: str = "local") -> bool:
        """A new operator table made here (vipctl, a reload: source "local", issued by this
        node and signed here) or loaded from `state_dir` ("state": kept only if its signature
        is still its issuer's); kept only if newer than ours. Sent at once, and with every
        heartbeat after."""
        if not table.newer_than(self.overrides):
            return False
        if source == "local":
            if table.issuer != self.name:
                raise ValueError(f"a table made here is issued by {self.name}, not {table.issuer}")
            table = table.signed(self._key, self.config.cluster)
        elif not table.signature and table.issuer == self.name:
            # Saved by a version that did not sign tables: it is our own, sign it now.
            table = table.signed(self._key, self.config.cluster)
        elif not self._table_accepted(table, source, from_peer=False):
            return False
        self._adopt(table, source)
        self._update_view()
        return True

    def _table_accepted(self, table: Overrides, source: str, *, from_peer: bool = True) -> bool:
        """Whether a table not made here may be adopted: its issuer is in the roster, it
        verifies under the issuer's keys, and (from a peer) it is at most MAX_VERSION_STEP
        ahead of ours. A refusal is counted each time and reported once per table."""
        member = self.config.member(table.issuer)
        if member is None:
            reason = f"issuer {table.issuer!r} is not in the roster"
        elif from_peer and table.version - self.overrides.version > MAX_VERSION_STEP:
            reason = (
                f"version {table.version} is more than {MAX_VERSION_STEP} ahead of ours"
                f" ({self.overrides.version})"
            )
        elif (table.digest, table.signature) in self._refused_tables:
            reason = ""  # known bad: no second signature check, no second report
        elif not table.verifies(member.public_keys, self.config.cluster):
            reason = f"signature is not {table.issuer}'s"
        else:
            return True
        self.counters.inc("overrides_refused")
        if reason and (table.digest, table.signature) not in self._refused_tables:
            self._refused_tables.append((table.digest, table.signature))
            self._events.append(OverridesRefused(table.version, table.issuer, source, reason))
        return False

    def _adopt(self, table: Overrides, source: str) -> None:
        self.overrides = table
        self._pending_burst = max(self._pending_burst, 1)
        self._events.append(
            OverridesAdopted(table.version, table.issuer, source, len(table.moves), table.drained)
        )

    @property
    def draining(self) -> bool:
        return self.name in self.overrides.drained

    def reload_pool(self, config: Config) -> None:
        """A reload changed the pool (and maybe what `rekey` takes). Group indices are
        renumbered by name: what we hold and let go of keeps its meaning, and peers still on
        the old pool stay readable until they reload too."""
        if config.digest != self._config_digest or config.node != self.name:
            raise ValueError("reload_pool with a config that changes the cluster or roster")
        new_index = {g.name: i for i, g in enumerate(config.pool)}
        old_to_new = tuple(new_index.get(g.name) for g in self.config.pool)

        def renumber(indices: frozenset[int]) -> frozenset[int]:
            return frozenset(j for i in indices if (j := old_to_new[i]) is not None)

        self.held = renumber(self.held)
        self._released = {
            j: when for i, when in self._released.items() if (j := old_to_new[i]) is not None
        }
        self._pools = {self._pool_digest: old_to_new, config.pool_digest: None}
        self._pool_digest = config.pool_digest
        self._group_count = len(config.pool)
        self.config = config
        self._holders_version += 1
        self._pending_burst = max(self._pending_burst, 1)

    def rekey(self, config: Config, key: Ed25519PrivateKey, public_key: bytes) -> None:
        """A reload changed keys only (`vipd.node.reload`): peers' accepted public keys, and the
        key we sign with. Everything else, including the config digest, is unchanged."""
        if (config.digest, config.pool_digest, config.node) != (
            self._config_digest,
            self._pool_digest,
            self.name,
        ):
            raise ValueError("rekey with a config that changes more than keys")
        self.config = config
        changed = public_key != self._public_key
        self._key, self._public_key = key, public_key
        for m in config.roster:
            if m.name in self.peers:
                self.peers[m.name].public_keys = m.public_keys
        if changed and self.overrides.issuer == self.name:
            # The table in force carries our old key's signature: re-issue it under the new
            # one, so no table depends on a key the operator is about to remove.
            with contextlib.suppress(OverridesError):  # at the last version: keep it
                self.set_overrides(self.overrides.reissued(by=self.name))

    def set_stats(self, stats: Stats) -> None:
        self.stats = stats

    # --- outputs -------------------------------------------------------------------------

    def get_timer(self) -> float:
        """The next instant at which `handle_timer` or `datagrams_to_send` has work.

        The shell arms its timer with this value; the core remembers it, so a late
        `handle_timer` reveals how long the loop itself stalled."""
        due = [self._next_heartbeat]
        if not self.ready:
            due.append(self.started + self.timing.startup_wait)
        if not self.mature:
            due.append(self.started + self.timing.mature_after)
        if self.holddown_until is not None:
            due.append(self.holddown_until)
        if self._other_heard is not None:
            due.append(self._other_heard + self.timing.dead_after)
        due.extend(
            p.deadline
            for p in self.peers.values()
            if p.deadline is not None and (p.state in MONITORED or _advertises(p))
        )
        self._armed = min(due)
        return self._armed

    def datagrams_to_send(self, *, now: float, wall: float) -> list[bytes]:
        count = self._pending_burst
        if now >= self._next_heartbeat:
            count = max(count, 1)
        self._pending_burst = 0
        if not count:
            return []
        # Jitter only shortens the period, so dead_after keeps its margin.
        interval = self.timing.heartbeat_interval
        self._next_heartbeat = now + interval * (1.0 - 0.1 * self._rng.random())
        self.counters.inc("tx_heartbeats", count)
        horizon = now - 2 * self.timing.dead_after
        for index, when in list(self._released.items()):
            if when < horizon:
                del self._released[index]
        return [self._heartbeat(wall) for _ in range(count)]

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    @property
    def flags(self) -> Flag:
        # Without state_dir our incarnation is the start time in ms: say so, so that a peer
        # that lost us accepts a lower one after the clock went back (`_rolled_back`).
        ephemeral = Flag.EPHEMERAL if self.config.state_dir is None else Flag.NONE
        if self.leaving:
            return Flag.LEAVING | ephemeral
        flags = (Flag.READY if self.ready else Flag.JOINING) | ephemeral
        if self.duplicate:
            flags |= Flag.DUPLICATE
        if self.draining:
            flags |= Flag.DRAINING
        if self.holddown_until is not None:
            flags |= Flag.HOLDDOWN
        return flags

    @property
    def config_digest(self) -> bytes:
        return self._config_digest

    def holders(self, group: int) -> frozenset[str]:
        """Peers that currently advertise holding `group` (and are still heard)."""
        return self.holders_map().get(group, frozenset())

    def holders_map(self) -> dict[int, frozenset[str]]:
        """group index -> peers advertising it; recomputed only when a held set changed."""
        return self._advertised()[0]

    def released_map(self) -> dict[int, frozenset[str]]:
        """group index -> peers advertising they let go of it lately (see `set_held`)."""
        return self._advertised()[1]

    def _advertised(self) -> tuple[dict[int, frozenset[str]], dict[int, frozenset[str]]]:
        if self._holders_cache is None or self._holders_cache[0] != self._holders_version:
            held: dict[int, set[str]] = {}
            released: dict[int, set[str]] = {}
            for p in self.peers.values():
                if p.state in (*MONITORED, MemberState.LEFT) and p.pool_digest in self._pools:
                    index = self._pools[p.pool_digest]
                    for g in p.held if index is None else _renumber(p.held, index):
                        held.setdefault(g, set()).add(p.name)
                    for g in p.released if index is None else _renumber(p.released, index):
                        released.setdefault(g, set()).add(p.name)
            self._holders_cache = (
                self._holders_version,
                {g: frozenset(names) for g, names in held.items()},
                {g: frozenset(names) for g, names in released.items()},
            )
        return self._holders_cache[1], self._holders_cache[2]

    def ready_members(self) -> frozenset[str]:
        """View members that have finished their startup wait (can claim right now)."""
        return frozenset(
            name
            for name in self.view.members
            if (self.ready if name == self.name else bool(self.peers[name].flags & Flag.READY))
        )

    def connected(self) -> frozenset[str]:
        """Members we hear (and ourselves, unless leaving), whether placed or not: what a
        partition policy counts. Hold-down and draining members are connected."""
        names = {p.name for p in self.peers.values() if p.state in MONITORED and p.config_ok}
        if not self.leaving:
            names.add(self.name)
        return frozenset(names)

    def view_agreed(self) -> bool:
        """Every other member of our view advertises the same view digest as ours."""
        return all(
            self.peers[name].view_digest == self.view.digest
            for name in self.view.members
            if name != self.name
        )

    @property
    def config_passive(self) -> bool:
        """True if another config digest wins among the live members: we then hold nothing,
        so a config typo on some nodes can never produce two owners.

        The digest shared by the most live members wins; on a tie, the one whose member
        started first (lowest incarnation) wins, then the smaller digest. Every node computes
        the same winner from the same heartbeats."""
        camps: dict[bytes, list[int]] = {self._config_digest: [self.incarnation]}
        for p in self.peers.values():
            if p.state in MONITORED and p.config_digest:
                camps.setdefault(p.config_digest, []).append(p.incarnation)
        if len(camps) == 1:
            return False
        winner = max(camps, key=lambda d: (len(camps[d]), -min(camps[d]), d))
        return winner != self._config_digest

    def observable_peers(self) -> frozenset[str]:
        """Peers whose advertised holdings we can read (heard, same roster, and a pool we
        know: ours, or the one before our last reload)."""
        return frozenset(
            p.name
            for p in self.peers.values()
            if p.state in (*MONITORED, MemberState.LEFT)
            and p.config_ok
            and p.pool_digest in self._pools
        )

    # --- internals -----------------------------------------------------------------------

    def _heartbeat(self, wall: float) -> bytes:
        self._seq += 1
        released = sorted(self._released, key=self._released.__getitem__)[-wire.MAX_RELEASED :]
        hb = self._message(wall, frozenset(released), self.overrides)
        return wire.encode(hb, self._key, self._public_key)

    def _message(self, wall: float, released: frozenset[int], table: Overrides) -> Heartbeat:
        return Heartbeat(
            cluster=self.config.cluster,
            sender=self.name,
            incarnation=self.incarnation,
            seq=self._seq,
            send_time_ms=int(wall * 1000),
            flags=self.flags,
            view_digest=self.view.digest,
            config_digest=self._config_digest,
            group_count=self._group_count,
            held=self.held,
            released=released,
            stats=self.stats,
            overrides=table,
            pool_digest=self._pool_digest,
            nonce=self.nonce,
        )

    def table_fits(self, table: Overrides) -> bool:
        """Whether heartbeats can carry `table` whatever else they carry (the longest
        RELEASED list included): an operator command that would not fit is refused."""
        worst = frozenset(range(min(self._group_count, wire.MAX_RELEASED)))
        sized = replace(table, signature=bytes(SIGNATURE_LEN))  # signed once adopted
        try:
            wire.encode(self._message(0.0, worst, sized), self._key, self._public_key)
        except ValueError:
            return False
        return True

    def _transition(self, peer: Peer, signal: Signal) -> None:
        old = peer.state
        new = next_state(old, signal)
        if new == old:
            return
        peer.state = new
        self._events.append(MemberStateChanged(peer.name, old, new))
        if new in MONITORED and old not in MONITORED:
            self._events.append(MemberJoined(peer.name, peer.incarnation))
        elif new == MemberState.DEAD:
            self.counters.inc("members_lost")
            self._events.append(MemberLost(peer.name, "timeout"))
        elif new == MemberState.LEFT and old in MONITORED:
            self._events.append(MemberLost(peer.name, "left"))
        self._holders_version += 1  # holders only count peers in some states
        if new not in MONITORED and new != MemberState.LEFT:
            peer.held = peer.released = frozenset()

    def _maybe_ready_early(self, now: float) -> None:
        """Everyone in the roster has been heard: nothing is left to learn by waiting."""
        if not self.ready and all(p.state != MemberState.UNKNOWN for p in self.peers.values()):
            self._become_ready(now)

    def _become_ready(self, now: float) -> None:
        self.ready = True
        self._pending_burst = max(self._pending_burst, 1)
        self._events.append(BecameReady(round(now - self.started, 3)))

    def _become_mature(self, reason: str) -> None:
        self.mature = True
        self._events.append(BecameMature(reason))

    def _disrupted(self, reason: str, now: float) -> None:
        window = self.timing.flap_window
        self._disruptions.append(now)
        while self._disruptions and self._disruptions[0] < now - window:
            self._disruptions.popleft()
        recent = len(self._disruptions)
        self.counters.inc("self_disruptions")
        self._events.append(SelfDisrupted(reason, recent))
        if recent >= 2:
            seconds = self.timing.holddown * min(HOLDDOWN_MAX_FACTOR, 2 ** (recent - 2))
            self.holddown_until = now + seconds
            self._pending_burst = max(self._pending_burst, 1)
            self.counters.inc("holddowns")
            self._events.append(HolddownStarted(recent, seconds))

    def _update_view(self) -> None:
        # Joining members are placed too (they claim only once ready): a cold-started cluster
        # then splits the pool once instead of every early node grabbing all of it, and a
        # joiner's groups stay with their holders until it can take them (make-before-break).
        # Members in hold-down are placed only if nobody else can be: a flapping node must not
        # drag addresses around, but nor may hold-down ever leave the pool unserved.
        # Drained members (the operator table) likewise: placed only if every member is.
        entries: list[tuple[str, int, int]] = []
        held_down: list[tuple[str, int, int]] = []
        drained: list[tuple[str, int, int]] = []
        drained_names = self.overrides.drained
        if not self.leaving and not self.duplicate:
            me = (self.name, self.incarnation, self.weight)
            if self.name in drained_names:
                drained.append(me)
            else:
                (held_down if self.holddown_until is not None else entries).append(me)
        for p in self.peers.values():
            # A member with a second instance running is never placed, not even as a last
            # resort: of two machines under one name, neither may serve.
            if p.state in MONITORED and p.config_ok and not p.flags & Flag.DUPLICATE:
                entry = (p.name, p.incarnation, p.weight)
                if p.name in drained_names:
                    drained.append(entry)
                else:
                    (held_down if p.flags & Flag.HOLDDOWN else entries).append(entry)
        entries = sorted(entries or held_down or drained)
        # The table is part of the view: "every member advertises our view digest" then
        # also means every member places with the same moves and drains.
        h = hashlib.sha256(b"vipd-view-v2\0" + self.overrides.digest)
        for name, inc, _ in entries:
            h.update(f"{name}:{inc}\n".encode())
        view = View(
            members=tuple(e[0] for e in entries),
            weights=tuple(e[2] for e in entries),
            digest=h.digest()[: wire.DIGEST_LEN],
        )
        if view.members != self.view.members:
            self.view = view
            self._events.append(ViewChanged(view.members, view.digest_hex))
        else:
            self.view = view


def _rolled_back(env: wire.Envelope, last: int, *, monitored: bool) -> bool:
    """Whether a datagram with an older incarnation than the `last` one taken from its
    sender (this run, or an earlier run of ours) may still be genuine: the sender runs
    without state_dir (EPHEMERAL, checked with the signature next), so its incarnation went
    back with its clock, and we do not monitor it, so no run of it is alive that a replay
    could roll back. Such a replay needs a capture from an earlier run still within
    freshness_window: the peer must have run twice in that window and then died
    (docs/security.md)."""
    return bool(env.flags & Flag.EPHEMERAL) and env.incarnation < last and not monitored


def _view_entry(p: Peer) -> tuple[int, int, bool, bool] | None:
    """What a peer contributes to the view (`MembershipCore._update_view`): None if it is
    left out, else (incarnation, weight, in hold-down, duplicated). (Drains come from the
    operator table, whose adoption rebuilds the view by itself.)"""
    if p.state in MONITORED and p.config_ok:
        flags = p.flags
        return (p.incarnation, p.weight, bool(flags & Flag.HOLDDOWN), bool(flags & Flag.DUPLICATE))
    return None


def _renumber(indices: frozenset[int], index: tuple[int | None, ...]) -> frozenset[int]:
    """A peer's indices in the pool we ran before our last reload, as indices into ours."""
    return frozenset(j for i in indices if i < len(index) and (j := index[i]) is not None)


def _advertises(peer: Peer) -> bool:
    """A LEFT peer whose last heartbeat still named groups: it expires at its deadline."""
    return peer.state == MemberState.LEFT and bool(peer.held or peer.released)
