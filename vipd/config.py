"""The one `Config`: loaded from a TOML file, validated, frozen.

Every local mistake stops the start with one line that names the file, the key and the fix
(`ConfigError.__str__`). Remote input never comes through here.

Timing fields (seconds; see docs/configuration.md for the trade-offs):

- ``heartbeat_interval``: how often a node multicasts its signed heartbeat. Lower detects
  failure sooner and costs N*N/interval datagrams per second across the cluster.
- ``dead_after``: a peer with no valid heartbeat for this long is lost and its addresses move.
  Failover outage ~= dead_after + one heartbeat_interval/2 + claim time. Keep it >= 7 heartbeat
  intervals so that 20% random loss almost never loses a live peer (0.2**7 ~ 1.3e-5 per window).
- ``startup_wait``: a starting node listens this long before it takes any address, so it learns
  the running members first instead of grabbing the whole pool. Default: dead_after.
- ``handover_timeout``: make-before-break bound. When a group moves away from a live node
  (graceful stop, join, rebalance) the old holder keeps it until the new owner's heartbeat
  shows it holds the group, or this long at most.
- ``reconcile_interval``: how often the kernel's addresses are compared with the desired set.
- ``freshness_window``: a heartbeat whose send time differs from ours by more than this is
  rejected as stale (replay defence across restarts). Needs clocks synchronised (NTP).
- ``settle_time``: a planned move (taking a group a live peer holds) waits until every member
  of the new view advertises the same view digest, or this long at most. Failover claims
  (the holder is dead) never wait.
- ``mature_after``: on a cold start, a node that hears no ready peer waits this long before
  taking the whole pool (Wackamole's Mature); hearing a ready peer makes it mature at once.
- ``flap_window`` / ``holddown``: a node that was cut off from the cluster twice within the
  window (loop stalls longer than dead_after, losing every peer) stays out of placement for
  ``holddown`` seconds (doubling per further flap, at most 8x), so it stops dragging addresses
  back and forth.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeGuard

from vipd.errors import ConfigError as ConfigError  # re-exported: callers import it here

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

#: Wire limits: the heartbeat's held-groups bitmap must fit one datagram.
MAX_POOL_GROUPS = 4096
MAX_ROSTER = 1024
# Used with fullmatch: a `$` would also match before a trailing newline ("web1\n").
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
IFNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,14}")
PUBLIC_KEY_PREFIX = "ed25519:"
#: Bump whenever vipd.placement.assign can place the same input differently (hash, ties,
#: phases).
PLACEMENT_VERSION = 1


@dataclass(frozen=True)
class Timing:
    """Failure-detection and housekeeping timing, in seconds (see module docstring)."""

    heartbeat_interval: float
    dead_after: float
    startup_wait: float
    handover_timeout: float
    reconcile_interval: float
    freshness_window: float
    settle_time: float
    mature_after: float
    flap_window: float
    holddown: float


#: The timing fields every node must share, because nodes judge each other by them: how
#: often a peer sends against how long we wait for it, how long a planned move waits for
#: agreement against how long the old holder keeps the group, and the replay window. The
#: others (startup_wait, reconcile_interval, mature_after, flap_window, holddown) only pace
#: the node itself and may differ. These are in `Config.digest`.
CLUSTER_TIMING = (
    "heartbeat_interval",
    "dead_after",
    "settle_time",
    "handover_timeout",
    "freshness_window",
)

#: Named timing profiles. ``lan``: failover ~0.7 s, survives 20% loss; ``fast``: ~0.15 s on a
#: quiet, uncongested segment, at 67 heartbeats/s per node. Both set dead_after to 10
#: heartbeat intervals: at 20% loss a live peer is falsely lost with probability 0.2**10 (1e-7)
#: per window; at 7.5 intervals it was 25x likelier.
PROFILES: dict[str, Timing] = {
    "lan": Timing(
        heartbeat_interval=0.075,
        dead_after=0.75,
        startup_wait=0.75,
        handover_timeout=2.0,
        reconcile_interval=2.0,
        freshness_window=30.0,
        settle_time=0.75,
        mature_after=3.0,
        flap_window=60.0,
        holddown=5.0,
    ),
    "fast": Timing(
        heartbeat_interval=0.015,
        dead_after=0.15,
        startup_wait=0.3,
        handover_timeout=1.0,
        reconcile_interval=1.0,
        freshness_window=30.0,
        settle_time=0.15,
        mature_after=1.0,
        flap_window=60.0,
        holddown=2.0,
    ),
}


@dataclass(frozen=True)
class Member:
    """A roster entry: a node that may ever be a member. Identity is the name."""

    name: str
    public_keys: tuple[bytes, ...]
    weight: int = 1
    #: Where unicast heartbeats go (transport = "unicast"); not used for identity.
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None


@dataclass(frozen=True)
class PoolGroup:
    """Addresses that always move together (Wackamole's virtual interface)."""

    name: str
    interface: str
    addresses: tuple[IPInterface, ...]
    #: Wackamole's Prefer: roster members that should hold this group, first choice first;
    #: honoured while one of them is placeable (alive, not drained), else placement decides.
    prefer: tuple[str, ...] = ()


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Announce:
    """Gratuitous ARP / unsolicited NA: when, how often, and to whom besides the broadcast."""

    #: Offsets (seconds) after a claim: a burst at 0, then repeats.
    schedule: tuple[float, ...] = (0.0, 0.05, 1.0, 2.0, 5.0)
    #: Announce every held address again this often (seconds); 0 turns it off.
    refresh_interval: float = 0.0
    #: Another MAC seen announcing or answering for an address we own is answered at once,
    #: then at most once per this many seconds (the last word is ours: a conflict inside the
    #: interval is answered when it ends).
    defend_interval: float = 1.0
    #: Router flag of unsolicited neighbour advertisements (set it if this node routes).
    na_router: bool = False
    #: Extra targets (hosts or netblocks: routers, load balancers) told by a directed ARP
    #: reply / neighbour advertisement on every claim (Wackamole's Notify).
    notify: tuple[IPNetwork, ...] = ()
    #: At most this many notify frames per second (a /24 is 254 frames per address).
    notify_rate: float = 500.0


#: A hook command: argv, run without a shell.
HookCommand = tuple[str, ...]
HOOK_EVENTS = ("up", "post_up", "down", "post_down")


@dataclass(frozen=True)
class Hooks:
    """Operator commands per group event (see docs/configuration.md, "Hooks")."""

    up: HookCommand | None = None
    post_up: HookCommand | None = None
    down: HookCommand | None = None
    post_down: HookCommand | None = None
    timeout: float = 10.0

    def command(self, event: str) -> HookCommand | None:
        value: HookCommand | None = getattr(self, event)
        return value


@dataclass(frozen=True)
class Config:
    path: Path
    node: str
    private_key_file: Path
    state_dir: Path | None
    cluster: str
    multicast_group: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    interface: str
    timing: Timing
    roster: tuple[Member, ...]
    #: Sorted by group name: a group's index here is its index on the wire.
    pool: tuple[PoolGroup, ...]
    control_socket: Path
    control_mode: int
    control_group: str | None
    log_level: str
    log_format: str
    announce: Announce = field(default_factory=Announce)
    #: "all": every side of a partition serves every address (Wackamole); "majority": a side
    #: with fewer than half of the roster releases everything (ties: the side with the first
    #: roster name in sorted order keeps serving).
    partition_policy: str = "all"
    #: "multicast" (one datagram per heartbeat to the group) or "unicast" (one per peer, to
    #: the roster addresses: for networks that filter multicast).
    transport: str = "multicast"
    #: Prometheus exporter address ("host:port"), or None to disable it.
    metrics_listen: str | None = "127.0.0.1:9477"
    #: Networks heartbeats may come from (mod_backhand's AcceptStats); None: any source.
    #: Datagrams from elsewhere are dropped before they are parsed.
    accept_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None
    hooks: Hooks = field(default_factory=Hooks)

    def member(self, name: str) -> Member | None:
        for m in self.roster:
            if m.name == name:
                return m
        return None

    @property
    def digest(self) -> bytes:
        """8-byte digest of what must match across nodes: cluster, roster, placement rules,
        partition policy and the timing the nodes judge each other by (CLUSTER_TIMING).

        Interface names are left out on purpose: they may differ between machines; so are
        public keys, which differ between nodes during a key rotation (a wrong key shows as
        rejected heartbeats, counted by reason, not as a config mismatch). So is the pool:
        it has its own digest (`pool_digest`), because a pool edit is rolled out node by
        node with reloads, and nodes on the old and the new pool must keep serving together.
        """
        # The placement algorithm's version is part of the digest: nodes that would place the
        # same pool differently must be reported as mismatched, never silently disagree.
        h = hashlib.sha256(f"vipd-config-v3 placement-v{PLACEMENT_VERSION}\0".encode())
        h.update(self.cluster.encode() + b"\0")
        for m in sorted(self.roster, key=lambda m: m.name):
            h.update(f"member {m.name} {m.weight}\n".encode())
        # A `fast` node among `lan` ones falsely loses them over and over, and one node on
        # `all` among `majority` ones serves a minority side: these must agree. float.hex
        # is exact, so 0.075 written two ways is one value.
        h.update(f"partition {self.partition_policy}\n".encode())
        for name in CLUSTER_TIMING:
            h.update(f"timing {name} {float(getattr(self.timing, name)).hex()}\n".encode())
        return h.digest()[:8]

    @property
    def pool_digest(self) -> bytes:
        """8-byte digest of the pool: group names, addresses and preferences. Heartbeats
        carry it so a peer knows which pool the held-groups bitmap indexes."""
        return pool_digest(self.pool)


def pool_digest(pool: tuple[PoolGroup, ...]) -> bytes:
    h = hashlib.sha256(b"vipd-pool-v1\0")
    for g in pool:
        addrs = " ".join(sorted(str(a) for a in g.addresses))
        h.update(f"group {g.name} {addrs} prefer {','.join(g.prefer)}\n".encode())
    return h.digest()[:8]


# --- loading -----------------------------------------------------------------------------

_SECTIONS: dict[str, frozenset[str]] = {
    "node": frozenset({"name", "private_key_file", "state_dir"}),
    "cluster": frozenset(
        {
            "name",
            "multicast_group",
            "port",
            "interface",
            "partition_policy",
            "transport",
            "accept_from",
        }
    ),
    "timing": frozenset({"profile", *Timing.__dataclass_fields__}),
    "control": frozenset({"socket", "mode", "group"}),
    "log": frozenset({"level", "format"}),
    "announce": frozenset(
        {"schedule", "refresh_interval", "defend_interval", "na_router", "notify", "notify_rate"}
    ),
    "metrics": frozenset({"listen"}),
    "hooks": frozenset({*HOOK_EVENTS, "timeout"}),
}
_ROSTER_KEYS = frozenset({"name", "public_keys", "weight", "address"})
_POOL_KEYS = frozenset({"name", "interface", "addresses", "prefer"})
_TOP_KEYS = frozenset({*_SECTIONS, "roster", "pool"})
_LOG_LEVELS = ("debug", "info", "warning", "error")
PARTITION_POLICIES = ("all", "majority")
TRANSPORTS = ("multicast", "unicast")
_LOG_FORMATS = ("auto", "json", "console")


class _Reader:
    """Typed access to the parsed TOML that turns every mistake into a ConfigError."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, problem: str, fix: str) -> ConfigError:
        return ConfigError(self.path, key, problem, fix)

    def table(self, data: Mapping[str, Any], key: str, allowed: frozenset[str]) -> dict[str, Any]:
        value = data.get(key.rsplit(".", 1)[-1].split("[")[0], {})
        if not isinstance(value, dict):
            raise self.fail(key, "must be a table", f"write it as [{key}]")
        self.no_unknown(value, key, allowed)
        return value

    def no_unknown(self, value: Mapping[str, Any], where: str, allowed: frozenset[str]) -> None:
        for k in value:
            if k not in allowed:
                raise self.fail(
                    f"{where}.{k}" if where else k,
                    "unknown key",
                    f"remove it or use one of: {', '.join(sorted(allowed))}",
                )

    def string(
        self, value: Mapping[str, Any], key: str, where: str, default: str | None = None
    ) -> str:
        v = value.get(key, default)
        if v is None:
            raise self.fail(f"{where}.{key}", "is missing", f'add {key} = "..." to [{where}]')
        if not isinstance(v, str) or not v:
            raise self.fail(f"{where}.{key}", f"must be a non-empty string, not {v!r}", "quote it")
        return v

    def name(self, value: Mapping[str, Any], key: str, where: str) -> str:
        v = self.string(value, key, where)
        if not NAME_RE.fullmatch(v):
            raise self.fail(
                f"{where}.{key}",
                f"{v!r} is not a valid name",
                "use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit",
            )
        return v

    def ifname(self, value: Mapping[str, Any], key: str, where: str) -> str:
        v = self.string(value, key, where)
        if not IFNAME_RE.fullmatch(v):
            raise self.fail(
                f"{where}.{key}",
                f"{v!r} is not a valid interface name",
                "use at most 15 characters",
            )
        return v

    def networks(self, value: Any, key: str, fix: str, *, empty_ok: bool) -> tuple[IPNetwork, ...]:
        """A list of networks (a bare address is its /32 or /128), each checked strictly."""
        if not isinstance(value, list) or not (value or empty_ok):
            raise self.fail(key, f"{value!r} is not a{'' if empty_ok else ' non-empty'} list", fix)
        networks = []
        for i, text in enumerate(value):
            try:
                networks.append(ipaddress.ip_network(str(text), strict=True))
            except ValueError as e:
                raise self.fail(f"{key}[{i}]", f"{text!r}: {e}", fix) from None
        return tuple(networks)

    def number(self, value: Mapping[str, Any], key: str, where: str, default: float) -> float:
        v = value.get(key, default)
        if not _finite(v) or v <= 0:
            raise self.fail(f"{where}.{key}", f"must be a positive number, not {v!r}", "e.g. 0.5")
        return float(v)


def _finite(v: object) -> TypeGuard[int | float]:
    """A real number: TOML also has nan and inf, which compare false with everything and
    would slip through any range check."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def load_config(path: str | Path) -> Config:
    """Read and validate a config file. Raises ConfigError (one line) on any mistake."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(path, "-", f"cannot read file ({e.strerror})", "check the path") from e
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(path, "-", f"not valid TOML ({e})", "fix the syntax") from e
    return parse_config(data, path)


def parse_config(data: Mapping[str, Any], path: Path) -> Config:
    r = _Reader(path)
    r.no_unknown(data, "", _TOP_KEYS)

    node = r.table(data, "node", _SECTIONS["node"])
    node_name = r.name(node, "name", "node")
    key_file = Path(r.string(node, "private_key_file", "node"))
    if not key_file.is_absolute():
        key_file = path.parent / key_file
    state_dir = Path(r.string(node, "state_dir", "node")) if "state_dir" in node else None
    if state_dir is not None and not state_dir.is_absolute():
        state_dir = path.parent / state_dir

    cluster = r.table(data, "cluster", _SECTIONS["cluster"])
    cluster_name = r.name(cluster, "name", "cluster")
    group_text = r.string(cluster, "multicast_group", "cluster", "239.192.77.1")
    try:
        group = ipaddress.ip_address(group_text)
    except ValueError as e:
        raise r.fail(
            "cluster.multicast_group", f"{group_text!r} is not an address", "e.g. 239.192.77.1"
        ) from e
    if not group.is_multicast:
        raise r.fail(
            "cluster.multicast_group",
            f"{group} is not a multicast address",
            "use an administratively scoped group such as 239.192.77.1",
        )
    port = cluster.get("port", 7710)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise r.fail("cluster.port", f"{port!r} is not a UDP port", "use 1-65535, e.g. 7710")
    interface = r.ifname(cluster, "interface", "cluster")
    partition_policy = r.string(cluster, "partition_policy", "cluster", "all")
    if partition_policy not in PARTITION_POLICIES:
        raise r.fail(
            "cluster.partition_policy",
            f"unknown policy {partition_policy!r}",
            f"use one of {', '.join(PARTITION_POLICIES)}",
        )

    transport = r.string(cluster, "transport", "cluster", "multicast")
    if transport not in TRANSPORTS:
        raise r.fail(
            "cluster.transport",
            f"unknown transport {transport!r}",
            f"use one of {', '.join(TRANSPORTS)}",
        )
    timing = _parse_timing(r, r.table(data, "timing", _SECTIONS["timing"]))
    roster = _parse_roster(r, data.get("roster"))
    if transport == "unicast":
        for i, m in enumerate(roster):
            if m.address is None:
                raise r.fail(
                    f"roster[{i}].address",
                    f"is missing for {m.name!r}, and cluster.transport is unicast",
                    'add address = "198.51.100.11" (the node\'s address on cluster.interface)',
                )
    accept_from = _parse_accept_from(r, cluster.get("accept_from"))
    if accept_from is None and transport == "unicast":
        # Unicast peers are known by address: nothing else may talk to us.
        accept_from = tuple(
            ipaddress.ip_network(m.address) for m in roster if m.address is not None
        )
    if not any(m.name == node_name for m in roster):
        raise r.fail(
            "node.name",
            f"this node {node_name!r} is not in the roster",
            "add a [[roster]] entry for it (vipctl keygen prints one)",
        )
    pool = _parse_pool(r, data.get("pool", []), {m.name for m in roster})

    control = r.table(data, "control", _SECTIONS["control"])
    socket_path = Path(r.string(control, "socket", "control", "/run/vipd/vipd.sock"))
    mode_text = control.get("mode", "0660")
    try:
        mode = int(mode_text, 8) if isinstance(mode_text, str) else -1
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777 or mode & 0o007:
        raise r.fail(
            "control.mode",
            f"{mode_text!r} is not an octal mode closed to others",
            'use a quoted octal string such as "0660" or "0600"',
        )
    control_group = r.string(control, "group", "control") if "group" in control else None

    log = r.table(data, "log", _SECTIONS["log"])
    level = r.string(log, "level", "log", "info")
    if level not in _LOG_LEVELS:
        raise r.fail(
            "log.level", f"{level!r} is not a level", f"use one of {', '.join(_LOG_LEVELS)}"
        )
    fmt = r.string(log, "format", "log", "auto")
    if fmt not in _LOG_FORMATS:
        raise r.fail(
            "log.format", f"{fmt!r} is not a format", f"use one of {', '.join(_LOG_FORMATS)}"
        )

    announce = _parse_announce(r, r.table(data, "announce", _SECTIONS["announce"]))
    hooks = _parse_hooks(r, r.table(data, "hooks", _SECTIONS["hooks"]))
    metrics = r.table(data, "metrics", _SECTIONS["metrics"])
    listen = metrics.get("listen", "127.0.0.1:9477")
    host, _, port_text = listen.rpartition(":") if isinstance(listen, str) else ("", "", "")
    if listen != "" and not (host and port_text.isdigit() and 0 < int(port_text) < 65536):
        raise r.fail(
            "metrics.listen",
            f"{listen!r} is not host:port",
            'use e.g. "127.0.0.1:9477", or "" to turn the exporter off',
        )

    return Config(
        path=path,
        node=node_name,
        private_key_file=key_file,
        state_dir=state_dir,
        cluster=cluster_name,
        multicast_group=group,
        port=port,
        interface=interface,
        timing=timing,
        roster=roster,
        pool=pool,
        control_socket=socket_path,
        control_mode=mode,
        control_group=control_group,
        log_level=level,
        log_format=fmt,
        announce=announce,
        partition_policy=partition_policy,
        transport=transport,
        metrics_listen=listen or None,
        accept_from=accept_from,
        hooks=hooks,
    )


def _parse_timing(r: _Reader, t: Mapping[str, Any]) -> Timing:
    profile = r.string(t, "profile", "timing", "lan")
    if profile not in PROFILES:
        raise r.fail(
            "timing.profile", f"unknown profile {profile!r}", f"use one of {', '.join(PROFILES)}"
        )
    base = PROFILES[profile]
    values = {f: r.number(t, f, "timing", getattr(base, f)) for f in Timing.__dataclass_fields__}
    # startup_wait follows dead_after unless set: a newcomer must hear the members first.
    # (So does settle_time: agreement needs about one failure-detection window.)
    for follower in ("startup_wait", "settle_time"):
        if follower not in t and "dead_after" in t:
            values[follower] = values["dead_after"]
    timing = replace(base, **values)
    if timing.dead_after < 3 * timing.heartbeat_interval:
        raise r.fail(
            "timing.dead_after",
            f"{timing.dead_after} s is under 3 heartbeat intervals ({timing.heartbeat_interval} s):"
            " one lost datagram would fail a live peer",
            "use at least 7 x heartbeat_interval",
        )
    if timing.freshness_window < 2 * timing.dead_after:
        raise r.fail(
            "timing.freshness_window",
            "is shorter than 2 x dead_after",
            "use at least 30 s (clocks must agree within half of it)",
        )
    return timing


def parse_public_key(text: str) -> bytes:
    """`ed25519:<base64 of the 32 raw bytes>` -> raw bytes. Raises ValueError."""
    if not text.startswith(PUBLIC_KEY_PREFIX):
        raise ValueError(f"must start with {PUBLIC_KEY_PREFIX!r}")
    try:
        raw = base64.b64decode(text[len(PUBLIC_KEY_PREFIX) :], validate=True)
    except ValueError as e:
        raise ValueError("is not valid base64") from e
    if len(raw) != 32:
        raise ValueError(f"decodes to {len(raw)} bytes, an Ed25519 key has 32")
    return raw


def format_public_key(raw: bytes) -> str:
    return PUBLIC_KEY_PREFIX + base64.b64encode(raw).decode()


def _parse_roster(r: _Reader, roster: Any) -> tuple[Member, ...]:
    if not isinstance(roster, list) or not roster:
        raise r.fail("roster", "is missing or empty", "add one [[roster]] table per node")
    if len(roster) > MAX_ROSTER:
        raise r.fail("roster", f"has {len(roster)} entries", f"at most {MAX_ROSTER} are supported")
    members: list[Member] = []
    seen_keys: dict[bytes, str] = {}
    for i, entry in enumerate(roster):
        where = f"roster[{i}]"
        if not isinstance(entry, dict):
            raise r.fail(where, "must be a table", "write it as [[roster]]")
        r.no_unknown(entry, where, _ROSTER_KEYS)
        name = r.name(entry, "name", where)
        if any(m.name == name for m in members):
            raise r.fail(
                f"{where}.name", f"duplicate node name {name!r}", "give every node its own name"
            )
        keys_text = entry.get("public_keys")
        if not isinstance(keys_text, list) or not keys_text:
            raise r.fail(
                f"{where}.public_keys", "is missing or empty", 'add public_keys = ["ed25519:..."]'
            )
        keys: list[bytes] = []
        for j, k in enumerate(keys_text):
            try:
                if not isinstance(k, str):
                    raise ValueError("must be a string")
                raw = parse_public_key(k)
            except ValueError as e:
                raise r.fail(
                    f"{where}.public_keys[{j}]", str(e), "paste the line printed by vipctl keygen"
                ) from e
            if raw in seen_keys:
                raise r.fail(
                    f"{where}.public_keys[{j}]",
                    f"key also listed for {seen_keys[raw]!r}",
                    "every node needs its own key pair",
                )
            seen_keys[raw] = name
            keys.append(raw)
        weight = entry.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= 1000:
            raise r.fail(f"{where}.weight", f"{weight!r} is not a weight", "use an integer 1-1000")
        address = None
        if "address" in entry:
            text = entry["address"]
            try:
                address = ipaddress.ip_address(text) if isinstance(text, str) else None
            except ValueError:
                address = None
            if address is None or address.is_multicast or address.is_unspecified:
                raise r.fail(
                    f"{where}.address", f"{text!r} is not a unicast address", 'e.g. "198.51.100.11"'
                )
            if any(m.address == address for m in members):
                raise r.fail(
                    f"{where}.address", f"{address} is listed twice", "give each node its own"
                )
        members.append(Member(name=name, public_keys=tuple(keys), weight=weight, address=address))
    return tuple(members)


def _parse_pool(r: _Reader, pool: Any, roster: set[str]) -> tuple[PoolGroup, ...]:
    if not isinstance(pool, list):
        raise r.fail("pool", "must be an array of tables", "write each entry as [[pool]]")
    if len(pool) > MAX_POOL_GROUPS:
        raise r.fail(
            "pool", f"has {len(pool)} groups", f"at most {MAX_POOL_GROUPS} fit a heartbeat"
        )
    groups: list[PoolGroup] = []
    owner_of: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}
    for i, entry in enumerate(pool):
        where = f"pool[{i}]"
        if not isinstance(entry, dict):
            raise r.fail(where, "must be a table", "write it as [[pool]]")
        r.no_unknown(entry, where, _POOL_KEYS)
        name = r.name(entry, "name", where)
        if any(g.name == name for g in groups):
            raise r.fail(f"{where}.name", f"duplicate group name {name!r}", "name every group once")
        iface = r.ifname(entry, "interface", where)
        addrs_text = entry.get("addresses")
        if not isinstance(addrs_text, list) or not addrs_text:
            raise r.fail(
                f"{where}.addresses", "is missing or empty", 'add addresses = ["203.0.113.10/32"]'
            )
        addrs: list[IPInterface] = []
        for j, a in enumerate(addrs_text):
            key = f"{where}.addresses[{j}]"
            if not isinstance(a, str) or "/" not in a:
                raise r.fail(key, f"{a!r} has no prefix length", 'write it as "203.0.113.10/32"')
            try:
                iface_addr = ipaddress.ip_interface(a)
            except ValueError as e:
                raise r.fail(key, f"{a!r} is not an address", 'e.g. "203.0.113.10/32"') from e
            ip = iface_addr.ip
            if ip.is_multicast or ip.is_loopback or ip.is_unspecified or ip.is_link_local:
                raise r.fail(key, f"{ip} cannot be a service address", "use a unicast address")
            if ip in owner_of:
                raise r.fail(key, f"{ip} is already in group {owner_of[ip]!r}", "list it once")
            owner_of[ip] = name
            addrs.append(iface_addr)
        prefer = entry.get("prefer", [])
        if not isinstance(prefer, list) or not all(isinstance(p, str) for p in prefer):
            raise r.fail(f"{where}.prefer", f"{prefer!r} is not a list of names", 'e.g. ["web1"]')
        for j, p in enumerate(prefer):
            if p not in roster:
                raise r.fail(
                    f"{where}.prefer[{j}]", f"{p!r} is not in the roster", "name a roster member"
                )
        if len(set(prefer)) != len(prefer):
            raise r.fail(f"{where}.prefer", "names a member twice", "list each member once")
        groups.append(
            PoolGroup(name=name, interface=iface, addresses=tuple(addrs), prefer=tuple(prefer))
        )
    return tuple(sorted(groups, key=lambda g: g.name))


def _parse_announce(r: _Reader, a: Mapping[str, Any]) -> Announce:
    schedule = a.get("schedule", list(Announce().schedule))
    if (
        not isinstance(schedule, list)
        or not schedule
        or len(schedule) > 20
        or any(not _finite(s) or s < 0 for s in schedule)
    ):
        raise r.fail(
            "announce.schedule",
            f"{schedule!r} is not a list of offsets",
            "use up to 20 non-negative seconds, e.g. [0, 0.05, 1, 2, 5]",
        )
    defaults = Announce()
    refresh = a.get("refresh_interval", defaults.refresh_interval)
    if not _finite(refresh) or refresh < 0:
        raise r.fail(
            "announce.refresh_interval",
            f"{refresh!r} is not a number of seconds",
            "use 0 (off) or a period such as 60",
        )
    if 0 < refresh < 1:
        raise r.fail(
            "announce.refresh_interval", f"{refresh} s is too often", "use 0 (off) or >= 1 s"
        )
    defend = r.number(a, "defend_interval", "announce", defaults.defend_interval)
    router = a.get("na_router", False)
    if not isinstance(router, bool):
        raise r.fail("announce.na_router", f"{router!r} is not true or false", "use true/false")
    notify = r.networks(
        a.get("notify", []),
        "announce.notify",
        'write hosts or networks, e.g. ["198.51.100.1"]',
        empty_ok=True,
    )
    for i, net in enumerate(notify):
        if net.is_multicast or net.num_addresses > 4096:
            raise r.fail(
                f"announce.notify[{i}]",
                f"{net} is multicast or larger than 4096 hosts",
                "use a /20 or less",
            )
    rate = r.number(a, "notify_rate", "announce", defaults.notify_rate)
    return Announce(
        schedule=tuple(sorted(float(s) for s in schedule)),
        refresh_interval=float(refresh),
        defend_interval=defend,
        na_router=router,
        notify=notify,
        notify_rate=rate,
    )


def _parse_hooks(r: _Reader, h: Mapping[str, Any]) -> Hooks:
    commands: dict[str, HookCommand] = {}
    for event in HOOK_EVENTS:
        if event not in h:
            continue
        value = h[event]
        argv = [value] if isinstance(value, str) else value
        if (
            not isinstance(argv, list)
            or not argv
            or not all(isinstance(x, str) and x for x in argv)
            or not argv[0].startswith("/")
        ):
            raise r.fail(
                f"hooks.{event}",
                f"{value!r} is not a command",
                'give an absolute path, or an argv list such as ["/usr/local/sbin/vip-hook", "-v"]'
                " (run without a shell)",
            )
        commands[event] = tuple(argv)
    timeout = r.number(h, "timeout", "hooks", Hooks().timeout)
    return Hooks(**commands, timeout=timeout)


def _parse_accept_from(
    r: _Reader, value: Any
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None:
    if value is None:
        return None
    fix = 'write networks, e.g. ["198.51.100.0/24"]'
    return r.networks(value, "cluster.accept_from", fix, empty_ok=False)
