"""Network-namespace topology for the lab and the netns tests.

Layout (nothing is created in the root namespace)::

    PREFIX-sw      switch: bridge PREFIXbr (multicast_snooping 0, no STP), one veth port per host
    PREFIX-n1..nN  nodes:  eth0 198.51.100.1x/24 + 2001:db8::1x/64 (nodad), lo up
    PREFIX-client  client: eth0 198.51.100.100/24 + 2001:db8::100/64, on-link routes to the pool

Every namespace and link name starts with the per-run prefix so that a crashed run can be
cleaned up by prefix (`remove_namespaces`). No namespace gets a default route: the only routes
are the connected ones plus the client's on-link routes to 203.0.113.0/24 and 2001:db8:1::/64.

All changes go through iproute2 (`ip`, `bridge`) and nftables (`nft`, random loss) so what
the lab does is what an operator would type; the kernel's own tables (`ip -j addr`,
`ip -j neigh`) are the source of truth. Fault state lives in the switch namespace only (port
state, the loss table), so deleting that namespace removes every fault with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

NODE_NET4 = "198.51.100"
NODE_NET6 = "2001:db8:"
CLIENT_IP4 = "198.51.100.100"
CLIENT_IP6 = "2001:db8::100"
POOL_NET4 = "203.0.113.0/24"
POOL_NET6 = "2001:db8:1::/64"
MULTICAST_GROUP = "239.192.77.1"
MULTICAST_PORT = 7710
NETNS_DIR = Path("/run/netns")
IFNAME_MAX = 15
MAX_NODES = 80  # 198.51.100.11 .. .90; .100 is the client
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{1,10}$")
CLONE_NEWNET = 0x40000000
#: nftables table (family bridge, in the switch namespace) that holds the random-loss rule.
LOSS_TABLE = "vipd_lab_loss"
#: Loss is drawn from numgen mod this, so percentages have 0.01 % resolution.
_LOSS_SCALE = 10000


class LabError(RuntimeError):
    """A lab command failed; the message carries the command and its stderr."""


def new_prefix() -> str:
    """A fresh per-run prefix: 'vl' + 6 hex digits (8 chars, leaves room in 15-char ifnames)."""
    return "vl" + secrets.token_hex(3)


def check_prefix(prefix: str) -> str:
    # Port names are PREFIX + "p" + up to 2 digits and must fit IFNAMSIZ-1 = 15 chars.
    if not _PREFIX_RE.match(prefix):
        raise ValueError(
            f"lab prefix {prefix!r} must be 2-11 lowercase letters/digits starting with a letter"
        )
    return prefix


# --- running commands ---------------------------------------------------------------------


def run(
    argv: Sequence[str], *, check: bool = True, input: str | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output; raise LabError with stderr when check fails."""
    proc = subprocess.run(
        list(argv), input=input, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise LabError(
            f"command failed (exit {proc.returncode}): {' '.join(argv)}\n{proc.stderr.strip()}"
        )
    return proc


def netns_exec(
    ns: str,
    argv: Sequence[str],
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """Run `argv` inside namespace `ns` and wait for it."""
    return run(["ip", "netns", "exec", ns, *argv], check=check, input=input, timeout=timeout)


def ns_popen(ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start `argv` inside namespace `ns`.

    `ip netns exec` execs the command in place (no fork), so the returned Popen's pid is the
    command's own pid: signals sent to it reach the program, not a wrapper.
    """
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kwargs)


def ip_json(ns: str, args: Sequence[str]) -> list[dict[str, Any]]:
    out = run(["ip", "-n", ns, "-j", *args]).stdout.strip()
    if not out:
        return []
    data = json.loads(out)
    return data if isinstance(data, list) else []


def addresses_in(ns: str, ifname: str | None = None) -> set[str]:
    """Addresses (without prefix length) configured in `ns`, from the kernel's table."""
    args = ["addr", "show"] + (["dev", ifname] if ifname else [])
    found: set[str] = set()
    for link in ip_json(ns, args):
        for info in link.get("addr_info", []):
            local = info.get("local")
            if isinstance(local, str):
                found.add(local)
    return found


_DEAD_NEIGH_STATES = {"FAILED", "INCOMPLETE", "NOARP", "NONE"}


def neigh(ns: str, ip: str) -> str | None:
    """The MAC `ns` would currently send to for `ip`, or None if unresolved."""
    for entry in ip_json(ns, ["neigh", "show", "to", ip]):
        states = set(entry.get("state", []))
        mac = entry.get("lladdr")
        if isinstance(mac, str) and not states <= _DEAD_NEIGH_STATES:
            return mac.lower()
    return None


def mac_of(ns: str, ifname: str) -> str:
    links = ip_json(ns, ["link", "show", "dev", ifname])
    if not links or "address" not in links[0]:
        raise LabError(f"no link {ifname} in namespace {ns}")
    return str(links[0]["address"]).lower()


def nft_binary() -> str:
    """Path of `nft`; /usr/sbin is searched too because a non-root PATH may lack it."""
    found = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    if found is None:
        raise LabError(
            "nft not found: random loss needs nftables (run scripts/bootstrap as root, or "
            "apt-get install nftables)"
        )
    return found


def list_namespaces() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def namespace_pids(ns: str) -> list[int]:
    proc = run(["ip", "netns", "pids", ns], check=False)
    return [int(tok) for tok in proc.stdout.split() if tok.isdigit()]


def remove_namespaces(prefix: str) -> list[str]:
    """Delete every namespace whose name starts with `prefix` (stale-run cleanup).

    Processes still running inside those namespaces can only have been started by a lab run
    (the namespaces are ours), and they would keep the network stack alive after the name is
    gone, so they are killed first, by pid.
    """
    if not re.match(r"^[a-z][a-z0-9-]{2,}$", prefix):
        raise ValueError(f"refusing to remove namespaces by the prefix {prefix!r}")
    removed: list[str] = []
    for ns in list_namespaces():
        if not ns.startswith(prefix):
            continue
        for pid in namespace_pids(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # Deleting the switch namespace destroys the bridge and every veth pair with it.
        if run(["ip", "netns", "delete", ns], check=False).returncode == 0:
            removed.append(ns)
    return removed


# --- sockets inside a namespace ------------------------------------------------------------


def ns_socket(ns: str, family: int, type: int, proto: int = 0) -> socket.socket:
    """Create a socket that lives in namespace `ns`.

    setns() only switches the calling thread, so a short-lived helper thread enters the
    namespace and creates the socket; the socket keeps its namespace for its whole life and
    the caller's thread never leaves the root namespace.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    result: list[socket.socket] = []
    errors: list[BaseException] = []

    def enter() -> None:
        try:
            with open(NETNS_DIR / ns, "rb") as f:
                if libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            result.append(socket.socket(family, type, proto))
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=enter, name=f"setns-{ns}")
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return result[0]


# --- the lab ------------------------------------------------------------------------------


@dataclass
class Lab:
    """A switch, N nodes and a client, each in its own namespace.

    Use as a context manager or call `build()` / `teardown()`; teardown is idempotent and
    removes everything with this lab's prefix even if `build()` failed half-way.
    """

    nodes: int = 3
    prefix: str = field(default_factory=new_prefix)
    client: bool = True
    built: bool = False

    def __post_init__(self) -> None:
        check_prefix(self.prefix)
        if not 1 <= self.nodes <= MAX_NODES:
            raise ValueError(f"a lab has 1-{MAX_NODES} nodes, not {self.nodes}")

    # names ------------------------------------------------------------------------------
    @property
    def node_names(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.nodes + 1)]

    @property
    def switch_ns(self) -> str:
        return f"{self.prefix}-sw"

    @property
    def client_ns(self) -> str:
        return f"{self.prefix}-client"

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br"

    def ns(self, node: str) -> str:
        """Namespace of a node ('n1'...) or of the client ('client')."""
        if node == "client":
            return self.client_ns
        self._index(node)
        return f"{self.prefix}-{node}"

    def port(self, node: str) -> str:
        """The switch-side bridge port of a node or of the client."""
        name = f"{self.prefix}pc" if node == "client" else f"{self.prefix}p{self._index(node)}"
        assert len(name) <= IFNAME_MAX
        return name

    def node_ip(self, node: str) -> str:
        return f"{NODE_NET4}.{10 + self._index(node)}"

    def node_ip6(self, node: str) -> str:
        return f"{NODE_NET6}:{10 + self._index(node)}"

    def _index(self, node: str) -> int:
        if node in self.node_names:
            return int(node[1:])
        raise ValueError(f"no node {node!r} in this lab (nodes: {', '.join(self.node_names)})")

    @property
    def namespaces(self) -> list[str]:
        names = [self.switch_ns, *(self.ns(n) for n in self.node_names)]
        return [*names, self.client_ns] if self.client else names

    # state (for `vipctl lab` subcommands run in later processes) ---------------------------
    def to_state(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "nodes": self.nodes, "client": self.client}

    @classmethod
    def attach(cls, state: dict[str, Any]) -> Lab:
        """A handle on a lab built by another process (no commands are run)."""
        return cls(
            nodes=int(state["nodes"]),
            prefix=str(state["prefix"]),
            client=bool(state.get("client", True)),
            built=True,
        )

    # building --------------------------------------------------------------------------
    def build(self) -> Lab:
        existing = [ns for ns in list_namespaces() if ns.startswith(self.prefix + "-")]
        if existing:
            raise LabError(
                f"namespaces with prefix {self.prefix} already exist: {', '.join(existing)}"
            )
        self.built = True  # from here on, teardown has something to remove
        try:
            for ns in self.namespaces:
                run(["ip", "netns", "add", ns])
            sw = self.switch_ns
            # The switch carries no addresses: no IPv6 on it means no RS/MLD chatter of its own.
            self._sysctl(
                sw,
                {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"},
            )
            # No IGMP querier exists in the lab, so snooping would drop the heartbeats after
            # the membership timer; flooding multicast is what a dumb switch does anyway.
            self._batch(
                sw,
                [
                    f"link add {self.bridge} type bridge mcast_snooping 0 stp_state 0",
                    f"link set {self.bridge} up",
                ],
            )
            for node in self.node_names:
                self._add_host(node, [f"{self.node_ip(node)}/24", f"{self.node_ip6(node)}/64"])
            if self.client:
                self._add_host("client", [f"{CLIENT_IP4}/24", f"{CLIENT_IP6}/64"])
                # On-link routes: the client reaches the pool by ARP/ND on its segment, like a
                # router on the web farm's LAN would.
                self._batch(
                    self.client_ns,
                    [
                        f"route add {POOL_NET4} dev eth0",
                        f"route add {POOL_NET6} dev eth0",
                    ],
                )
        except BaseException:
            self.teardown()
            raise
        return self

    def _add_host(self, node: str, addrs: Sequence[str]) -> None:
        ns, port = self.ns(node), self.port(node)
        # Create the pair inside the switch namespace with the peer born in the host namespace,
        # so no interface ever exists in the root namespace, even for a moment.
        self._batch(
            self.switch_ns,
            [
                f"link add {port} type veth peer name eth0 netns {ns}",
                f"link set {port} master {self.bridge}",
                f"link set {port} up",
            ],
        )
        # No DAD anywhere: tentative addresses would make the first seconds of a test flaky.
        self._sysctl(
            ns, {"net.ipv6.conf.eth0.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0"}
        )
        cmds = ["link set lo up"]
        for a in addrs:
            cmds.append(f"addr add {a} dev eth0" + (" nodad" if ":" in a else ""))
        cmds.append("link set eth0 up")
        self._batch(ns, cmds)

    @staticmethod
    def _batch(ns: str, commands: Sequence[str]) -> None:
        run(["ip", "-n", ns, "-batch", "-"], input="\n".join(commands) + "\n")

    @staticmethod
    def _sysctl(ns: str, values: dict[str, str]) -> None:
        netns_exec(ns, ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in values.items())])

    # faults ----------------------------------------------------------------------------
    def cut_link(self, node: str) -> None:
        """The machine is gone: its switch port goes down and it sees NO-CARRIER."""
        run(["ip", "-n", self.switch_ns, "link", "set", self.port(node), "down"])

    def restore_link(self, node: str) -> None:
        run(["ip", "-n", self.switch_ns, "link", "set", self.port(node), "up"])

    def block_port(self, node: str) -> None:
        """A partition the node cannot see: carrier stays up, the bridge forwards nothing."""
        run(["bridge", "-n", self.switch_ns, "link", "set", "dev", self.port(node), "state", "0"])

    def unblock_port(self, node: str) -> None:
        run(["bridge", "-n", self.switch_ns, "link", "set", "dev", self.port(node), "state", "3"])

    def port_state(self, node: str) -> str:
        """'forwarding', 'disabled' (blocked), or 'down' (link cut)."""
        links = ip_json(self.switch_ns, ["link", "show", "dev", self.port(node)])
        if links and "UP" not in links[0].get("flags", []):
            return "down"
        out = run(["bridge", "-n", self.switch_ns, "-j", "link", "show", "dev", self.port(node)])
        data = json.loads(out.stdout or "[]")
        return str(data[0].get("state", "unknown")) if data else "unknown"

    def set_loss(self, percent: float, nodes: Iterable[str] | None = None) -> None:
        """Drop `percent` % of the frames the switch forwards to or from the ports of `nodes`
        (node names and/or "client"; None: every port), at random, until `clear_loss`.

        Each forwarded frame gets exactly one random draw even when both of its ports are
        chosen, so a heartbeat from one node to another is lost with probability `percent`
        (two per-port draws would make it 1-(1-p)^2). A flooded frame (multicast, broadcast)
        is forwarded once per output port, so every receiver loses its copy independently,
        like separate cables. An ICMP echo needs two frames: it fails with 1-(1-p)^2.

        The kernel has no netem; this is an nftables `bridge` table in the switch namespace
        (`numgen random`), replaced atomically on every call and gone with the namespace.
        """
        if not 0 <= percent <= 100:
            raise ValueError(f"loss must be 0-100 %, not {percent}")
        chosen = list(self.node_names) + (["client"] if self.client else [])
        if nodes is not None:
            chosen = list(nodes)
        if not chosen or percent == 0:
            self.clear_loss()
            return
        ports = "{ " + ", ".join(json.dumps(self.port(n)) for n in chosen) + " }"
        draw = f"numgen random mod {_LOSS_SCALE} < {round(percent * _LOSS_SCALE / 100)}"
        ruleset = f"""
table bridge {LOSS_TABLE}
delete table bridge {LOSS_TABLE}
table bridge {LOSS_TABLE} {{
    chain forward {{
        type filter hook forward priority 0; policy accept;
        iifname {ports} {draw} counter drop
        # A frame from a chosen port has had its draw: one draw per frame, whatever its way.
        iifname {ports} accept
        oifname {ports} {draw} counter drop
    }}
}}
"""
        # "table; delete table; table {...}" in one nft transaction: atomic and idempotent.
        netns_exec(self.switch_ns, [nft_binary(), "-f", "-"], input=ruleset)

    def clear_loss(self) -> None:
        """Remove the random loss (a no-op when there is none)."""
        script = f"table bridge {LOSS_TABLE}\ndelete table bridge {LOSS_TABLE}\n"
        netns_exec(self.switch_ns, [nft_binary(), "-f", "-"], input=script)

    def loss_drops(self) -> int:
        """Frames dropped by the random-loss rules since the last `set_loss` (0 without)."""
        proc = netns_exec(
            self.switch_ns,
            [nft_binary(), "-j", "list", "table", "bridge", LOSS_TABLE],
            check=False,
        )
        if proc.returncode != 0:
            return 0  # no table: no loss configured
        total = 0
        for item in json.loads(proc.stdout).get("nftables", []):
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    total += int(expr["counter"]["packets"])
        return total

    # queries ---------------------------------------------------------------------------
    def addresses(self, node: str) -> set[str]:
        return addresses_in(self.ns(node), "eth0")

    def mac(self, node: str) -> str:
        return mac_of(self.ns(node), "eth0")

    def client_neigh(self, ip: str) -> str | None:
        return neigh(self.client_ns, ip)

    def exec(
        self, node: str, argv: Sequence[str], **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        return netns_exec(self.ns(node), argv, **kwargs)

    def popen(self, node: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        return ns_popen(self.ns(node), argv, **kwargs)

    def socket(self, node: str, family: int, type: int, proto: int = 0) -> socket.socket:
        return ns_socket(self.ns(node), family, type, proto)

    # teardown --------------------------------------------------------------------------
    def teardown(self) -> list[str]:
        """Remove every namespace with this lab's prefix. Safe to call any number of times."""
        if not self.built:
            return []
        # The "-" keeps a lab from removing another lab whose prefix merely extends ours.
        removed = remove_namespaces(self.prefix + "-")
        self.built = False
        return removed

    def __enter__(self) -> Lab:
        if not self.built:
            self.build()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()


@contextlib.contextmanager
def lab(nodes: int = 3, prefix: str | None = None, client: bool = True) -> Iterator[Lab]:
    """`with lab() as l:` builds a lab and always removes it."""
    with Lab(nodes=nodes, prefix=prefix or new_prefix(), client=client) as built:
        yield built
