"""Configs and keys for a simulated cluster: deterministic, cheap, no files.

Keys are derived from the node name (SHA-256 of a fixed prefix and the name), so a seed replays
byte for byte in any process. A config is parsed once per cluster shape through the real
`parse_config` (same validation and digest as a daemon) and copied per node with
`dataclasses.replace`; timing may then be replaced by any `Timing`, including ones the loader
would refuse (e.g. a very long heartbeat interval for the 256-node run), because the core and
the controller only read the dataclass.

Pool addresses are IPv6 documentation addresses (``2001:db8::/32``), one per group, so pools
of up to 4096 groups fit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from functools import cache, lru_cache
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vipd.config import PROFILES, Config, Timing, format_public_key, parse_config
from vipd.host.keys import public_key_bytes


def node_name(i: int) -> str:
    """Names sort like their numbers (n01 < n02 < ... < n10), which keeps traces readable."""
    return f"n{i:02d}" if i < 100 else f"n{i:03d}"


def group_name(i: int) -> str:
    return f"g{i:04d}"


@cache
def node_key(name: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(
        hashlib.sha256(b"vipd-sim-key\0" + name.encode()).digest()
    )


@cache
def node_public_key(name: str) -> bytes:
    return public_key_bytes(node_key(name))


@dataclass(frozen=True)
class ClusterSpec:
    """The shape of a simulated cluster: roster, pool and the shared settings."""

    nodes: int = 3
    groups: int = 6
    timing: Timing = field(default_factory=lambda: PROFILES["lan"])
    policy: str = "all"
    #: Roster weights by node index (missing: 1). Empty: equal weights (I5 applies).
    weights: tuple[tuple[int, int], ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(node_name(i) for i in range(1, self.nodes + 1))

    @property
    def equal_weights(self) -> bool:
        return all(w == 1 for _, w in self.weights)

    def config(self, name: str) -> Config:
        """The config of node `name` (cached: the base is parsed once per spec)."""
        return replace(
            _base_config(self.nodes, self.groups, self.weights),
            node=name,
            timing=self.timing,
            partition_policy=self.policy,
        )


@lru_cache(maxsize=64)
def _base_config(nodes: int, groups: int, weights: tuple[tuple[int, int], ...]) -> Config:
    weight_of = dict(weights)
    names = [node_name(i) for i in range(1, nodes + 1)]
    data = {
        "node": {"name": names[0], "private_key_file": "/nonexistent/sim.key"},
        "cluster": {"name": "sim", "interface": "eth0"},
        "roster": [
            {
                "name": n,
                "public_keys": [format_public_key(node_public_key(n))],
                "weight": weight_of.get(i, 1),
            }
            for i, n in enumerate(names, start=1)
        ],
        "pool": [
            {
                "name": group_name(i),
                "interface": "eth0",
                "addresses": [f"2001:db8::{i + 1:x}/128"],
            }
            for i in range(groups)
        ],
        "control": {"socket": "/nonexistent/sim.sock"},
    }
    return parse_config(data, Path("sim.toml"))


def scaled(base: Timing, factor: float) -> Timing:
    """Every timing field multiplied by `factor` (same ratios, slower clock)."""
    return Timing(**{k: getattr(base, k) * factor for k in Timing.__dataclass_fields__})
