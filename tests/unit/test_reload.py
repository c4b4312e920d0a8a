"""Reload: what an edited config may change live (keys, log level), what it may not, and a key
rotation step by step on cores exchanging real signed heartbeats."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.clusterkit import WALL0, config_dict, make_cluster
from tests.unit.test_core import Net
from tests.unit.test_wire import genuine
from vipd.config import Config, parse_config
from vipd.host.keys import public_key_bytes
from vipd.membership.wire import key_id
from vipd.node.reload import ReloadRefused, reload_changes


def with_keys(config: Config, name: str, keys: tuple[bytes, ...]) -> Config:
    roster = tuple(
        dataclasses.replace(m, public_keys=keys) if m.name == name else m for m in config.roster
    )
    return dataclasses.replace(config, roster=roster)


def test_key_changes_are_listed_and_keep_the_config_digest() -> None:
    old = make_cluster(2)["n1"].config
    new_key = public_key_bytes(Ed25519PrivateKey.generate())
    (n2_key,) = old.member("n2").public_keys  # type: ignore[union-attr]
    new = with_keys(old, "n2", (n2_key, new_key))
    new = dataclasses.replace(new, private_key_file=Path("/etc/vipd/n1-2026.key"))
    assert new.digest == old.digest  # a rotation in progress is not a config mismatch
    changes = reload_changes(old, new)
    assert changes == [
        f"roster n2: keys added ['{key_id(new_key).hex()}'], removed []",
        f"node.private_key_file: {old.private_key_file} -> /etc/vipd/n1-2026.key",
    ]
    assert reload_changes(old, old) == []


@pytest.mark.parametrize(
    ("edit", "setting"),
    [
        (lambda d: d["timing"].update(profile="fast"), "timing"),
        (lambda d: d["announce"].update(defend_interval=5), "announce"),
        (lambda d: d["roster"][1].update(weight=3), "roster (names, weights or addresses)"),
        (lambda d: d["cluster"].update(partition_policy="majority"), "partition_policy"),
    ],
)
def test_anything_else_is_refused_with_the_settings_named(edit: object, setting: str) -> None:
    nodes = make_cluster(2)
    keys = {n: x.key for n, x in nodes.items()}
    data = config_dict("n1", keys, 4)
    data["announce"] = {}
    old = parse_config(data, Path("t.toml"))
    edit(data)  # type: ignore[operator]
    new = parse_config(data, Path("t.toml"))
    with pytest.raises(ReloadRefused) as refused:
        reload_changes(old, new)
    assert setting in refused.value.settings
    assert "need a restart" in str(refused.value)


def test_pool_and_hook_edits_are_taken_and_listed_by_group() -> None:
    nodes = make_cluster(2)
    keys = {n: x.key for n, x in nodes.items()}
    data = config_dict("n1", keys, 4)
    old = parse_config(data, Path("t.toml"))
    data["pool"].pop(0)  # www1 removed
    data["pool"][0]["addresses"].append("2001:db8::2/128")  # www2 changed
    data["pool"].append({"name": "www9", "interface": "eth0", "addresses": ["203.0.113.99/32"]})
    data["hooks"] = {"up": "/usr/local/sbin/vip-up"}
    new = parse_config(data, Path("t.toml"))
    assert new.digest == old.digest and new.pool_digest != old.pool_digest
    assert reload_changes(old, new) == [
        "pool: group www9 added",
        "pool: group www1 removed",
        "pool: group www2 changed",
        "hooks changed",
    ]


def test_rotating_one_nodes_key_on_running_cores_changes_nothing_else() -> None:
    """The runbook in docs/security.md, on three cores: add n2's new key everywhere, switch
    n2 to it, remove the old one. No member is lost, no datagram is rejected."""
    nodes = make_cluster(3)
    net = Net(nodes)
    net.run(0.5)
    views = {n: c.view.members for n, c in net.cores.items()}
    old_key = nodes["n2"].public_key
    new_private = Ed25519PrivateKey.generate()
    new_key = public_key_bytes(new_private)

    def reload_all(keys: tuple[bytes, ...]) -> None:
        for name, core in net.cores.items():
            config = with_keys(core.config, "n2", keys)
            key = new_private if name == "n2" and new_key in keys and old_key not in keys else None
            own = key or core._key
            core.rekey(config, own, public_key_bytes(own))
        net.run(0.3)

    reload_all((old_key, new_key))  # 1. everyone accepts both keys; n2 still signs with old
    n2 = net.cores["n2"]
    n2.rekey(n2.config, new_private, new_key)  # 2. n2 signs with the new key
    net.run(0.3)
    reload_all((new_key,))  # 3. the old key is gone everywhere
    for name, core in net.cores.items():
        assert core.view.members == views[name]
        assert sum(core.rejected.values()) == 0, core.rejected
        assert core.counters["members_lost"] == 0
    # A heartbeat signed with the retired key is now refused, by reason.
    n1 = net.cores["n1"]
    n1.receive(genuine(nodes["n2"], seq=1, incarnation=2), "n2", now=net.now, wall=WALL0)
    assert n1.rejected["unknown_key"] == 1


def test_rekey_refuses_a_config_that_changes_more_than_keys() -> None:
    nodes = make_cluster(2)
    core = nodes["n1"].core()
    other = make_cluster(2, groups=7)["n1"].config
    with pytest.raises(ValueError, match="more than keys"):
        core.rekey(other, nodes["n1"].key, nodes["n1"].public_key)
