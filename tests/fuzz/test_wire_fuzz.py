"""Fuzzing the heartbeat decoder and the core that feeds it.

The properties: whatever arrives, the decoder raises only DecodeError; a datagram accepted
without being re-signed is byte-identical to one a member signed; the core never raises,
counts every datagram exactly once (accepted, or under one reason), is unchanged by what it
rejects, and keeps nothing per rejected datagram once its events are drained. The operator
table (TLV SIGNED_OVERRIDES, and the daemon's overrides.json) decodes only to its one canonical
form, or raises OverridesError.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import random
import subprocess
import sys
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.clusterkit import WALL0
from tests.fuzz import kit, make_corpus
from tests.fuzz.kit import (
    KEYS,
    NOW,
    ROSTER_KEYS,
    Flood,
    Parts,
    Receiver,
    check_decoder,
    check_heartbeat,
    check_overrides,
    feed,
    fuzz_settings,
    mutate,
    mutate_body,
    mutate_overrides,
    random_heartbeat,
    random_overrides,
    receiver,
    seal,
    sign,
)
from vipd.host.keys import public_key_bytes
from vipd.kernel.heartbeats import MAX_READS_PER_WAKEUP
from vipd.membership import wire
from vipd.membership.core import MembershipCore
from vipd.membership.wire import TLV, DecodeError, Flag, Reject
from vipd.placement.overrides import Overrides, OverridesError

CORPUS = kit.corpus("wire")
INDEX = kit.corpus_index("wire")
#: Genuine datagrams from the corpus, as mutation bases next to freshly built ones.
GENUINE = tuple(data for name, data in CORPUS.items() if INDEX[name]["core"] == "accepted")
#: Reasons the decoder and the core's envelope checks give (admission-level reasons such as
#: source filtering need a configuration this cluster does not have).
DECODE_REASONS = frozenset(r.value for r in Reject) - {"source_not_allowed", "rate_limited"}


def with_corpus(test: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """Every corpus file as an explicit example: always run, before the generated ones."""
    for data in CORPUS.values():
        test = example(data)(test)
    return test


def base_datagram(rng: random.Random) -> bytes:
    if rng.random() < 0.3:
        return rng.choice(GENUINE)
    return sign(random_heartbeat(rng, rng.choice(kit.SENDERS), rng.randint(1, 10**6)))


# --- (a) arbitrary bytes -------------------------------------------------------------------


@given(data=st.binary(max_size=1500))
@fuzz_settings(1500)
@with_corpus
def test_arbitrary_bytes_raise_only_decode_error(data: bytes) -> None:
    check_decoder(data)


@given(rng=st.randoms(use_true_random=False))
@fuzz_settings(600)
def test_envelope_shaped_bytes_raise_only_decode_error(rng: random.Random) -> None:
    data = kit.envelope_shaped(rng)
    # The shape passes size, magic, version and lengths; names may not be UTF-8.
    assert check_decoder(data) in {"bad_signature", "unknown_key", "malformed"}


# --- (b) mutations of genuine heartbeats ---------------------------------------------------


@given(rng=st.randoms(use_true_random=False))
@fuzz_settings(600)
def test_mutated_heartbeats_decode_only_if_unchanged(rng: random.Random) -> None:
    """Flip, truncate, extend, splice, rewrite lengths: without a new signature nothing but
    a datagram some member signed gets through (the signature covers every byte)."""
    original, other = base_datagram(rng), base_datagram(rng)
    data = mutate(rng, original, other)
    if check_decoder(data) == "decoded":  # signed by some roster key
        assert data in (original, other)
    if feed(receiver(), data) == "accepted":  # signed by its sender's key, and fresh
        assert data in (original, other)


@given(rng=st.randoms(use_true_random=False))
@fuzz_settings(600)
def test_resigned_body_mutations_reach_decode_body(rng: random.Random) -> None:
    """Bodies mutated TLV by TLV and signed with the right key: parse and verify pass, so
    decode_body itself sees the weird structure. It refuses with MALFORMED or returns a
    heartbeat that re-encodes to itself."""
    parts = Parts.of(base_datagram(rng))
    parts.body = mutate_body(rng, parts.body)
    data = parts.seal(KEYS[parts.sender.decode()])
    if len(data) > wire.MAX_DATAGRAM:
        assert check_decoder(data) == "oversized"
        return
    env = wire.parse_envelope(data)
    wire.verify(env, ROSTER_KEYS)
    try:
        hb = wire.decode_body(env)
    except DecodeError as e:
        assert e.reason is Reject.MALFORMED
        return
    check_heartbeat(hb)
    key = KEYS[hb.sender]
    again = wire.decode_body(wire.parse_envelope(wire.encode(hb, key, public_key_bytes(key))))
    assert again == hb


@given(rng=st.randoms(use_true_random=False))
@fuzz_settings(500)
def test_resigned_raw_mutations_raise_only_decode_error(rng: random.Random) -> None:
    """Byte-level mutations, then the last 64 bytes replaced by a valid signature over the
    rest: lengths, names and bodies all weird, and still signed."""
    data = mutate(rng, base_datagram(rng), base_datagram(rng))
    if len(data) > wire.SIGNATURE_LEN:
        data = seal(data[: -wire.SIGNATURE_LEN], KEYS[rng.choice(kit.SENDERS)])
    check_decoder(data)


def test_mutation_engine_reaches_every_refusal_of_decode_body() -> None:
    """The body mutations are worth something only if they reach every check decode_body
    makes; this fails if the engine (or the decoder's checks) drift apart."""
    rng = random.Random(4)
    seen: Counter[str] = Counter()
    flood = Flood(rng)
    for _ in range(3000):
        parts = Parts.of(flood.genuine())
        parts.body = mutate_body(rng, parts.body)
        data = parts.seal(KEYS[parts.sender.decode()])
        if len(data) > wire.MAX_DATAGRAM:
            continue
        env = wire.parse_envelope(data)
        try:
            wire.decode_body(env)
            seen["decoded"] += 1
        except DecodeError as e:
            seen[e.detail] += 1
    fragments = [
        "decoded",
        "truncated TLV header",
        "overruns the body",
        "repeated",
        "VIEW_DIGEST has",
        "CONFIG_DIGEST has",
        "STATS has",
        "POOL_DIGEST has",
        "NONCE has",
        "digest missing",
        "HELD too short",
        "HELD bitmap does not match",
        "HELD has bits set past",
        "SIGNED_OVERRIDES: truncated",
        "SIGNED_OVERRIDES: truncated name",
        "SIGNED_OVERRIDES: name length",
        "SIGNED_OVERRIDES: name is not UTF-8",
        "SIGNED_OVERRIDES: unknown move reason",
        "entries, at most 512",
        "SIGNED_OVERRIDES: entries not sorted or repeated",
        "SIGNED_OVERRIDES: trailing bytes",
        "SIGNED_OVERRIDES: version 0 is the empty table",
        "SIGNED_OVERRIDES: the empty table (version 0) is not signed",
        "SIGNED_OVERRIDES: shorter than a signature",
        "RELEASED too short",
        "RELEASED does not hold",
        "RELEASED index past",
    ]
    missed = [f for f in fragments if not any(f in detail for detail in seen)]
    assert not missed, f"never reached: {missed}"


# --- (c) the core under a flood ------------------------------------------------------------


def test_core_counts_every_datagram_of_a_flood() -> None:
    """5,000 datagrams of every kind: receive never raises, each one is accepted or counted
    under exactly one reason, rejected ones leave view and peers alone (checked per datagram
    by `feed`), and the flood reaches every reason the decoder and envelope checks have."""
    rx = Receiver()
    flood = Flood(random.Random(7))
    for _ in range(5000):
        rx(flood.next())
    core = rx.core
    assert rx.fed == 5000
    assert sum(core.rejected.values()) + core.counters["rx_accepted"] == rx.fed
    assert core.counters["rx_accepted"] == rx.outcomes["accepted"] > 100
    missing = DECODE_REASONS - set(rx.outcomes)
    assert not missing, f"the flood never produced {sorted(missing)}"


@given(rng=st.randoms(use_true_random=False), n=st.integers(1, 60))
@fuzz_settings(100)
def test_core_accounting_property(rng: random.Random, n: int) -> None:
    rx = Receiver()
    flood = Flood(rng)
    for _ in range(n):
        rx(flood.next())
    assert sum(rx.core.rejected.values()) + rx.core.counters["rx_accepted"] == n


def test_garbage_leaves_the_core_as_it_was() -> None:
    """Nothing but garbage (mutations of heartbeats that were never delivered, random bytes,
    envelope-shaped junk): after 3,000 of them the core's view, peers and held groups are
    those of a core that heard nothing, and nothing was accepted."""
    rng = random.Random(11)
    rx = Receiver()
    fresh = kit.snapshot(receiver())
    flood = Flood(rng)
    for i in range(3000):
        original = flood.genuine()
        kind = i % 3
        if kind == 0:
            data = mutate(rng, original, flood.other())
            if data in flood.sent:
                continue  # a mutation that undid itself is genuine, not garbage
        elif kind == 1:
            data = rng.randbytes(rng.randint(0, 1500))
        else:
            data = kit.envelope_shaped(rng)
        assert rx(data) != "accepted"
    assert kit.snapshot(rx.core) == fresh
    assert rx.core.counters["rx_accepted"] == 0


# --- the corpus ----------------------------------------------------------------------------


def _corpus_params() -> list[Any]:
    return [
        pytest.param(
            name,
            marks=[pytest.mark.xfail(strict=True, reason=f"BUG: {INDEX[name]['bug']}")]
            if "bug" in INDEX[name]
            else [],
            id=name,
        )
        for name in sorted(INDEX)
    ]


@pytest.mark.parametrize("name", _corpus_params())
def test_corpus_entry(name: str) -> None:
    """Each saved input has the outcome its index entry records, in the decoder alone and in
    a fresh receiver; entries with a "bug" are strict xfails that record the correct one."""
    entry, data = INDEX[name], CORPUS[name]
    assert check_decoder(data) == entry["wire"]
    assert feed(receiver(), data) == entry["core"]


def test_corpus_is_what_the_generator_writes() -> None:
    assert make_corpus.verify_seeds() == []
    assert make_corpus.differences() == [], "run: python -m tests.fuzz.make_corpus"


def test_a_malleated_signature_is_refused() -> None:
    """S + L verifies under a lax Ed25519 verifier; ours must refuse it, or a replayed
    heartbeat could be made to look new to anything keyed on its bytes."""
    data = sign(kit.heartbeat())
    signed, sig = data[: -wire.SIGNATURE_LEN], data[-wire.SIGNATURE_LEN :]
    s = int.from_bytes(sig[32:], "little") + (2**252 + 27742317777372353535851937790883648493)
    assert check_decoder(signed + sig[:32] + s.to_bytes(32, "little")) == "bad_signature"


# --- (d) the operator table on its own -----------------------------------------------------


def _tables_in_corpus() -> list[bytes]:
    out = []
    for data in CORPUS.values():
        try:
            body = Parts.of(data).body
        except DecodeError:
            continue
        out += [value for kind, value in kit.split_tlvs(body) if kind == TLV.SIGNED_OVERRIDES]
    return out


def _table_bytes(rng: random.Random) -> bytes:
    """A valid table's wire value, broken a rule at a time and mutated byte by byte."""
    raw = kit.signed_value(random_overrides(rng))
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        raw = mutate_overrides(rng, raw) if rng.random() < 0.7 else mutate(rng, raw)
    return raw


def with_tables(test: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """Every SIGNED_OVERRIDES value of the corpus as an explicit example."""
    for raw in _tables_in_corpus():
        test = example(raw)(test)
    return test


@given(data=st.binary(max_size=300) | st.randoms(use_true_random=False).map(_table_bytes))
@fuzz_settings(800)
@with_tables
def test_overrides_decode_is_canonical_or_refuses(data: bytes) -> None:
    """Overrides.decode_signed on anything: a table whose encoding (content, then the
    signature) is exactly the input (one encoding per table, so two nodes holding the same
    table hold the same bytes and the same digest), or OverridesError. Nothing else may
    come out."""
    try:
        table = Overrides.decode_signed(data)
    except OverridesError:
        return
    assert table.encode() + table.signature == data
    check_overrides(table)


JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from((-1, 0, 2**32 - 1, 2**32, 2**64 - 1, 2**64))
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=70)
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


@st.composite
def table_documents(draw: st.DrawFn) -> str:
    """overrides.json as the daemon writes it, with a few values replaced by arbitrary JSON
    (wrong types, huge or negative numbers, infinities, long or odd strings) or removed."""
    doc = json.loads(random_overrides(draw(st.randoms(use_true_random=False))).to_json())
    slots = [(doc, key) for key in doc] + [(m, key) for m in doc["moves"] for key in m]
    for _ in range(draw(st.integers(1, 3))):
        obj, key = draw(st.sampled_from(slots))
        if draw(st.integers(0, 5)) == 0:
            obj.pop(key, None)
        else:
            obj[key] = draw(JSON_VALUES)
    return json.dumps(doc, ensure_ascii=draw(st.booleans()))


@given(
    text=st.text(max_size=300)
    | JSON_VALUES.map(json.dumps)
    | table_documents()
    | st.randoms(use_true_random=False).map(lambda rng: random_overrides(rng).to_json())
)
@fuzz_settings(500)
@example(Overrides().to_json())
@example("")
@example("{}")
@example('{"version": 1, "issuer": "n1", "moves": [], "drained": "n2"}')
def test_overrides_from_json_raises_only_overrides_error(text: str) -> None:
    """state_dir/overrides.json, whatever it holds: a canonical table that survives a round
    trip through the file, or OverridesError (the daemon starts with the empty table)."""
    try:
        table = Overrides.from_json(text)
    except OverridesError:
        return
    check_overrides(table)
    assert Overrides.from_json(table.to_json()) == table


@pytest.mark.parametrize(
    "text",
    [
        pytest.param('{"version":1,"issuer":"n1","moves":[],"drained":[1]}', id="drained-int"),
        pytest.param(
            '{"version":1,"issuer":"n1","moves":[],"drained":[["n2"]]}', id="drained-list"
        ),
        pytest.param('{"version":-1,"issuer":"n1","moves":[],"drained":[]}', id="version-negative"),
        pytest.param(
            '{"version":18446744073709551616,"issuer":"n1","moves":[],"drained":[]}',
            id="version-2**64",
        ),
        pytest.param('{"version":1e999,"issuer":"n1","moves":[],"drained":[]}', id="version-inf"),
        pytest.param(
            '{"version":1,"issuer":"n1","moves":[],"drained":["n"]}'.replace(
                '["n"]', json.dumps([f"n{i:05d}" for i in range(65_536)])
            ),
            id="65536-drained",
        ),
        pytest.param("[" * 100_000, id="nested-100000"),
    ],
)
def test_from_json_refuses_what_the_fuzzer_found(text: str) -> None:
    """Found by the property above (fixed): each escaped as another exception, which would
    have stopped the daemon at start instead of starting it with an empty table."""
    with pytest.raises(OverridesError):
        Overrides.from_json(text)


def test_decode_refuses_an_empty_issuer_above_version_0() -> None:
    with pytest.raises(OverridesError):
        Overrides.decode(kit.raw_overrides(1, b""))


# --- (e) memory ----------------------------------------------------------------------------

#: Growth allowed while a warmed-up core takes 20,000 datagrams with its events drained:
#: 128 KiB is 6.5 bytes a datagram, less than the cheapest thing Python can keep per datagram
#: (8 bytes: one more reference in a list; a float in a list is 32, a dict entry ~100, a
#: PacketRejected event ~220). Measured: about 2 KB (allocator and free-list noise), so the
#: margin is ~50x. Caches that fill up within the 2,000-datagram warm-up are not counted.
FLOOD = 20_000
BOUND = 128 << 10
#: Junk from spoofed sources: per-source state may exist but must stop growing. The
#: admission table swings between half and all of its entries (~300 KB); an unbounded one
#: would add ~150 bytes a source, 3 MB over the measured 20,000.
SOURCES_BOUND = 1 << 20


@functools.cache
def _flood(seed: int, n: int) -> tuple[bytes, ...]:
    flood = Flood(random.Random(seed))
    return tuple(flood.next() for _ in range(n))


def _warm_receiver() -> Receiver:
    """A receiver that has seen 2,000 datagrams of every kind (first-time allocations done),
    in a process whose Flag pseudo-member cache is full: that cache is a known leak, measured
    on its own by test_unknown_flag_bits_are_not_retained; here it would only add noise."""
    for value in range(1 << 16):
        Flag(value)
    rx = Receiver()
    for data in _flood(22, 2000):
        rx(data)
    kit.drain(rx.core)
    return rx


def _pour(rx: Receiver, datagrams: tuple[bytes, ...], *, drain: bool) -> None:
    """core.receive as the node calls it, without the per-datagram checks of Receiver
    (their snapshots would be measured too)."""
    core, sources, now = rx.core, kit.SOURCES, rx.now
    for i, data in enumerate(datagrams):
        now += 0.01
        core.receive(data, sources[i % len(sources)], now=now, wall=WALL0)
        if drain and i % MAX_READS_PER_WAKEUP == MAX_READS_PER_WAKEUP - 1:
            kit.drain(core)  # as the node does after each batch of reads
    rx.now = now


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def _advertised(core: MembershipCore) -> int:
    """About what the peers' current held and released sets take (up to 4,096 groups each,
    ~130 KB at most): legitimate state of the last genuine heartbeat per peer, which the
    flood may leave larger or smaller than it found it. Growth is measured beyond it."""
    sets = [s for p in core.peers.values() for s in (p.held, p.released)]
    return sum(sys.getsizeof(s) + 32 * len(s) for s in sets)


def test_memory_stays_bounded_when_events_are_drained() -> None:
    datagrams = _flood(21, FLOOD)
    rx = _warm_receiver()
    tracemalloc.start()
    try:
        before, sets_before = _traced(), _advertised(rx.core)
        _pour(rx, datagrams, drain=True)
        kit.drain(rx.core)
        growth = _traced() - before - (_advertised(rx.core) - sets_before)
    finally:
        tracemalloc.stop()
    assert sum(rx.core.rejected.values()) > FLOOD // 2
    assert growth < BOUND, f"{growth} bytes kept after {FLOOD} datagrams"


def test_undrained_events_are_what_would_grow() -> None:
    """The same flood without draining: every rejection queues an event until someone calls
    next_event. This proves the bound above can fail, and that draining is what holds it."""
    datagrams = _flood(21, FLOOD)
    rx = _warm_receiver()
    accepted = rx.core.counters["rx_accepted"]
    tracemalloc.start()
    try:
        before, sets_before = _traced(), _advertised(rx.core)
        _pour(rx, datagrams, drain=False)
        queued, events = _traced() - before, len(rx.core._events)
        kit.drain(rx.core)
        drained = _traced() - before - (_advertised(rx.core) - sets_before)
    finally:
        tracemalloc.stop()
    rejected = FLOOD - (rx.core.counters["rx_accepted"] - accepted)
    assert events >= rejected  # one PacketRejected each (accepted ones may add state events)
    assert queued > 16 * BOUND, f"{queued} bytes for {events} queued events"
    assert drained < BOUND


def test_memory_stays_bounded_under_spoofed_sources() -> None:
    """Junk from 40,000 different source addresses (what a spoofing flood looks like): any
    per-source state must stop growing. A table bounded below 20,000 entries has reached its
    size by the half-way mark; an unbounded one would add ~150 bytes a source after it."""
    rng = random.Random(3)
    junk = [rng.randbytes(rng.randint(0, 300)) for _ in range(1000)]
    core = receiver()
    tracemalloc.start()
    try:
        marks = [_traced()]
        for i in range(40_000):
            source = f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}"
            core.receive(junk[i % len(junk)], source, now=NOW, wall=WALL0)
            if i % MAX_READS_PER_WAKEUP == MAX_READS_PER_WAKEUP - 1:
                kit.drain(core)
            if i in (19_999, 39_999):
                kit.drain(core)
                marks.append(_traced())
    finally:
        tracemalloc.stop()
    assert sum(core.rejected.values()) == 40_000
    growth = marks[2] - marks[1]
    assert growth < SOURCES_BOUND, f"grew {growth} bytes over 20,000 sources"


FLAG_LEAK = """
import gc, tracemalloc
from tests.clusterkit import WALL0
from tests.fuzz import kit
base = kit.sign(kit.heartbeat())
core = kit.receiver()
gc.collect()
tracemalloc.start()
before = tracemalloc.get_traced_memory()[0]
for flags in range(20_000):  # the same datagram, a different (unknown) flags value
    data = base[:6] + flags.to_bytes(2, "big") + base[8:]
    core.receive(data, "198.51.100.12", now=1.0 + flags, wall=WALL0)
    kit.drain(core)
gc.collect()
print(tracemalloc.get_traced_memory()[0] - before)
"""


def test_unknown_flag_bits_are_not_retained() -> None:
    # A fresh interpreter: the cache is process-wide, other tests may have filled it.
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", FLAG_LEAK],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        check=True,
    )
    growth = int(out.stdout.split()[-1])
    assert growth < BOUND, f"{growth} bytes kept after 20,000 datagrams differing in flags"
