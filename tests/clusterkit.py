"""Build in-memory configs and keys for a cluster of N nodes (no files, no root)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vipd.config import Config, format_public_key, parse_config
from vipd.host.keys import public_key_bytes
from vipd.membership.core import MembershipCore

WALL0 = 1_800_000_000.0  # a fixed Unix time for hand-stepped clocks


@dataclass
class Node:
    config: Config
    key: Ed25519PrivateKey

    @property
    def public_key(self) -> bytes:
        return public_key_bytes(self.key)

    def core(self, *, now: float = 0.0, incarnation: int = 1, seed: int = 0) -> MembershipCore:
        return MembershipCore(
            self.config,
            self.key,
            self.public_key,
            incarnation=incarnation,
            now=now,
            rng=random.Random(seed),
        )


def config_dict(
    name: str, keys: dict[str, Ed25519PrivateKey], groups: int, **timing: Any
) -> dict[str, Any]:
    return {
        "node": {"name": name, "private_key_file": f"/nonexistent/{name}.key"},
        "cluster": {"name": "web", "interface": "eth0"},
        "timing": dict(timing),
        "roster": [
            {"name": n, "public_keys": [format_public_key(public_key_bytes(k))]}
            for n, k in keys.items()
        ],
        "pool": [
            {"name": f"www{i}", "interface": "eth0", "addresses": [f"203.0.113.{10 + i}/32"]}
            for i in range(1, groups + 1)
        ],
        "control": {"socket": f"/nonexistent/{name}.sock"},
    }


def make_cluster(n: int = 3, groups: int = 6, **timing: Any) -> dict[str, Node]:
    keys = {f"n{i}": Ed25519PrivateKey.generate() for i in range(1, n + 1)}
    return {
        name: Node(parse_config(config_dict(name, keys, groups, **timing), Path("test.toml")), key)
        for name, key in keys.items()
    }
