"""The operator table: edits, ordering, wire and file round trips, persistence."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vipd.host.keys import public_key_bytes
from vipd.host.state import load_overrides, save_overrides
from vipd.placement.overrides import MAX_VERSION, Move, Overrides, OverridesError


def test_each_edit_is_a_new_version_stamped_with_its_issuer() -> None:
    t = Overrides().with_move("www-b", "n2", by="n1").with_drain("n3", True, by="n2")
    assert (t.version, t.issuer) == (2, "n2")
    assert t.moves == (Move("www-b", "n2", "move"),) and t.drained == ("n3",)
    t = t.with_move("www-a", "n1", by="n1").with_move("www-b", None, by="n1")
    assert t.pins() == {"www-a": "n1"} and t.move_of("www-b") is None
    t = t.with_moves({"www-c": "n3", "www-a": "n2"}, by="n3", reason="reload")
    assert [(m.group, m.target, m.reason) for m in t.moves] == [
        ("www-a", "n2", "reload"),
        ("www-c", "n3", "reload"),
    ]
    assert t.without_reason("reload", by="n1").moves == ()
    assert t.with_drain("n3", False, by="n1").drained == ()


def test_latest_wins_by_version_then_issuer() -> None:
    base = Overrides()
    a, b = base.with_drain("n1", True, by="n1"), base.with_drain("n2", True, by="n2")
    assert b.newer_than(a) and not a.newer_than(b)  # same version: the issuer decides
    assert a.with_move("g", "n1", by="n1").newer_than(b)
    assert not a.newer_than(a)


def test_wire_and_json_round_trip_and_reject_non_canonical_tables() -> None:
    t = Overrides(7, "n1", (Move("a", "n2"), Move("é", "n3", "reload")), ("n2", "n4"))
    assert Overrides.decode(t.encode()) == t
    assert Overrides.from_json(t.to_json()) == t
    unsorted = Overrides(7, "n1", (Move("b", "n2"), Move("a", "n2")))
    with pytest.raises(OverridesError, match="sorted"):
        Overrides.decode(unsorted.encode())
    with pytest.raises(OverridesError):
        Overrides.decode(t.encode() + b"\0")
    with pytest.raises(OverridesError):
        Overrides.from_json('{"version": 1}')


def test_the_table_survives_a_restart_and_a_damaged_file_is_reported(tmp_path: Path) -> None:
    assert load_overrides(None) is None
    assert load_overrides(tmp_path) is None
    t = Overrides().with_move("www-a", "n2", by="n1")
    save_overrides(tmp_path, t)
    assert load_overrides(tmp_path) == t
    (tmp_path / "overrides.json").write_text("{not json")
    with pytest.raises(OverridesError, match=r"overrides\.json"):
        load_overrides(tmp_path)


def test_a_table_carries_its_issuers_signature_and_any_edit_breaks_it() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    public = public_key_bytes(key)
    t = Overrides().with_drain("n2", True, by="n1").signed(key, "web")
    assert t.verifies([public], "web")
    assert not t.verifies([public_key_bytes(other)], "web"), "another member's key"
    assert not t.verifies([public], "shop"), "the same table in another cluster"
    assert not replace(t, drained=("n3",)).verifies([public], "web"), "edited on the way"
    assert not replace(t, signature=b"").verifies([public], "web")
    assert t.verifies([public_key_bytes(other), public], "web"), "any of the issuer's keys"
    # The signature survives the wire and the state file.
    assert Overrides.decode_signed(t.encode_signed()).verifies([public], "web")
    assert Overrides.from_json(t.to_json()).verifies([public], "web")
    with pytest.raises(OverridesError, match="unsigned"):
        Overrides(1, "n1").encode_signed()


def test_versions_are_u64_and_a_file_from_before_signatures_still_loads() -> None:
    assert Overrides.decode(Overrides(2**40, "n1").encode()).version == 2**40
    with pytest.raises(OverridesError):
        Overrides(2**64, "n1").encode()
    with pytest.raises(OverridesError, match="last version"):
        Overrides(MAX_VERSION, "n1").with_drain("n2", True, by="n1")
    legacy = '{"version": 3, "issuer": "n1", "moves": [], "drained": ["n2"]}'
    assert Overrides.from_json(legacy) == Overrides(3, "n1", (), ("n2",))
    with pytest.raises(OverridesError, match="signature"):
        Overrides.from_json(legacy[:-1] + ', "signature": "abcd"}')
