"""Real vipd daemons in a `Lab`: keys, configs, processes, status and ownership.

One work directory per run (``/tmp/vipd-lab-PREFIX/``, mode 0700) holds, per node, its key
(PKCS#8 PEM, 0600), its TOML config, its state dir, its control socket and its log. Daemons
run as ``ip netns exec NS python -m vipd --config FILE``; they are stopped only by the pids
this module started (kept as Popen objects, or in the lab state file for `vipctl lab`).

Ownership is read from each node namespace's kernel address table, never only from what the
daemons say: the point of the lab is to check the daemons against the kernel.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from vipd.host.control import request
from vipd.lab.topology import MULTICAST_GROUP, MULTICAST_PORT, Lab, addresses_in

T = TypeVar("T")

#: Default pool: six single-address groups, so three nodes hold two each.
DEFAULT_POOL: tuple[tuple[str, tuple[str, ...]], ...] = tuple(
    (f"www{i}", (f"203.0.113.{10 + i}/32",)) for i in range(1, 7)
)
#: The optional IPv6 group (reached by the client through its on-link 2001:db8:1::/64 route).
IPV6_GROUP: tuple[str, tuple[str, ...]] = ("www7", ("2001:db8:1::17/128",))
CLUSTER_NAME = "lab"
WORK_ROOT = Path("/tmp")


class LabTimeout(AssertionError):
    """A wait gave up. The message carries what was awaited, the last value and log tails.

    An AssertionError so pytest reports it as a test failure, not an error in the harness.
    """


class Background:
    """A helper process (prober, arpwatch) in a namespace, writing JSON lines to `path`."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], path: Path) -> None:
        self.name = name
        self.proc = proc
        self.path = path

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM by pid, SIGKILL if it lingers; idempotent. (The prober settles the
        requests in flight before it exits, up to its 1 s timeout.)"""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def bare(address: str) -> str:
    """'203.0.113.11/32' -> '203.0.113.11'."""
    return address.split("/", 1)[0]


def _toml_str(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid TOML basic string for these values


def _toml_list(items: Iterable[str]) -> str:
    return "[" + ", ".join(_toml_str(i) for i in items) + "]"


class LabCluster:
    """vipd daemons on the nodes of `lab`.

    `pool` is a sequence of (group name, addresses with prefix length); `timing` is written
    verbatim into the [timing] table (default: the "lan" profile).
    """

    def __init__(
        self,
        lab: Lab,
        nodes: Sequence[str] | None = None,
        pool: Sequence[tuple[str, Sequence[str]]] | None = None,
        *,
        ipv6: bool = False,
        workdir: Path | None = None,
        timing: dict[str, Any] | None = None,
        log_level: str = "info",
        cluster_name: str = CLUSTER_NAME,
        write: bool = True,
        transport: str = "multicast",
        accept_from: Sequence[str] | None = None,
        extra_toml: str = "",
    ) -> None:
        self.lab = lab
        self.nodes = list(nodes) if nodes is not None else lab.node_names
        groups = [(g, tuple(a)) for g, a in (pool if pool is not None else DEFAULT_POOL)]
        if ipv6:
            groups.append(IPV6_GROUP)
        self.pool: list[tuple[str, tuple[str, ...]]] = groups
        self.workdir = workdir or WORK_ROOT / f"vipd-lab-{lab.prefix}"
        self.timing = timing if timing is not None else {"profile": "lan"}
        self.log_level = log_level
        self.cluster_name = cluster_name
        self.transport = transport
        self.accept_from = list(accept_from) if accept_from is not None else None
        self.extra_toml = extra_toml  # appended verbatim: [hooks], [announce] ...
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.pids: dict[str, int] = {}
        self.public_keys: dict[str, str] = {}
        self.helpers: list[Background] = []
        if write:
            self.write_configs()

    # layout ----------------------------------------------------------------------------
    @property
    def vips(self) -> list[str]:
        """Every pool address, without prefix length, in pool order."""
        return [bare(a) for _, addrs in self.pool for a in addrs]

    @property
    def group_of(self) -> dict[str, str]:
        return {bare(a): g for g, addrs in self.pool for a in addrs}

    def node_dir(self, node: str) -> Path:
        return self.workdir / node

    def config_path(self, node: str) -> Path:
        return self.node_dir(node) / "vipd.toml"

    def key_path(self, node: str) -> Path:
        return self.node_dir(node) / f"{node}.key"

    def socket_path(self, node: str) -> Path:
        return self.node_dir(node) / "control.sock"

    def log_path(self, node: str) -> Path:
        return self.node_dir(node) / "vipd.log"

    # configuration ---------------------------------------------------------------------
    def write_configs(self) -> None:
        """Generate a key per node and one config per node (same roster and pool)."""
        from vipd.host.keys import generate_key_file, public_key_line

        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for node in self.nodes:
            d = self.node_dir(node)
            d.mkdir(mode=0o700, exist_ok=True)
            (d / "state").mkdir(mode=0o700, exist_ok=True)
            key = self.key_path(node)
            if key.exists():
                key.unlink()  # a fresh identity per run; generate_key_file refuses to overwrite
            self.public_keys[node] = public_key_line(generate_key_file(key))
        self.rewrite_configs()

    def rewrite_configs(self) -> None:
        """Write every node's config from the current settings (`pool`...), keys unchanged:
        edit, rewrite, then reload the daemons."""
        for node in self.nodes:
            self.config_path(node).write_text(self.config_text(node))

    def config_text(self, node: str) -> str:
        lines = [
            "# Written by vipd.lab.cluster for one lab run.",
            "[node]",
            f"name = {_toml_str(node)}",
            f"private_key_file = {_toml_str(str(self.key_path(node)))}",
            f"state_dir = {_toml_str(str(self.node_dir(node) / 'state'))}",
            "",
            "[cluster]",
            f"name = {_toml_str(self.cluster_name)}",
            f"multicast_group = {_toml_str(MULTICAST_GROUP)}",
            f"port = {MULTICAST_PORT}",
            'interface = "eth0"',
            f"transport = {_toml_str(self.transport)}",
        ]
        if self.accept_from is not None:
            lines.append(f"accept_from = {_toml_list(self.accept_from)}")
        lines += [
            "",
            "[timing]",
        ]
        for k, v in self.timing.items():
            value = _toml_str(v) if isinstance(v, str) else repr(v)
            lines.append(f"{k} = {value}")
        for member in self.nodes:
            lines += [
                "",
                "[[roster]]",
                f"name = {_toml_str(member)}",
                f"public_keys = {_toml_list([self.public_keys[member]])}",
                f"address = {_toml_str(self.lab.node_ip(member))}",
            ]
        for group, addrs in self.pool:
            lines += [
                "",
                "[[pool]]",
                f"name = {_toml_str(group)}",
                'interface = "eth0"',
                f"addresses = {_toml_list(addrs)}",
            ]
        lines += [
            "",
            "[control]",
            f"socket = {_toml_str(str(self.socket_path(node)))}",
            'mode = "0600"',
            "",
            "[log]",
            f"level = {_toml_str(self.log_level)}",
            # Readable lines: these logs are read by people when a lab run goes wrong.
            'format = "console"',
            "",
            self.extra_toml,
        ]
        return "\n".join(lines)

    # processes -------------------------------------------------------------------------
    def start(self, node: str, wait: bool = True, timeout: float = 15.0) -> int:
        """Start the node's daemon; with `wait`, return once its control socket answers."""
        if self.running(node):
            raise RuntimeError(f"vipd on {node} is already running (pid {self.pids[node]})")
        with contextlib.suppress(FileNotFoundError):
            self.socket_path(node).unlink()  # so "socket exists" means "this daemon is up"
        log = open(self.log_path(node), "ab")  # noqa: SIM115 - handed to the child
        log.write(
            f"==== lab: starting vipd on {node} at monotonic {time.monotonic():.3f}\n".encode()
        )
        log.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.lab.ns(node),
                sys.executable,
                "-m",
                "vipd",
                "--config",
                str(self.config_path(node)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.node_dir(node),
            # Own session: a Ctrl-C meant for `vipctl lab demo` must not hit the daemons
            # before the demo's own orderly teardown does.
            start_new_session=True,
        )
        log.close()
        self.procs[node] = proc
        self.pids[node] = proc.pid
        if wait:
            self.wait_for(
                lambda: self._answers(node),
                timeout,
                f"vipd on {node} to answer on {self.socket_path(node)}",
                nodes=[node],
            )
        return proc.pid

    def _answers(self, node: str) -> bool:
        if not self.running(node):
            raise LabTimeout(
                f"vipd on {node} exited (code {self.exit_code(node)})\n" + self.log_tail(node)
            )
        try:
            self.status(node, timeout=0.5)
        except (OSError, ValueError, RuntimeError):
            return False
        return True

    def start_all(self, timeout: float = 20.0) -> None:
        """Start every daemon at once (as a farm boots), then wait until all answer."""
        for node in self.nodes:
            self.start(node, wait=False)
        self.wait_answering(timeout=timeout)

    def wait_answering(self, nodes: Iterable[str] | None = None, timeout: float = 20.0) -> None:
        for node in self.nodes if nodes is None else nodes:
            self.wait_for(
                functools.partial(self._answers, node),
                timeout,
                f"vipd on {node} to answer",
                nodes=[node],
            )

    def _ours(self, node: str) -> int | None:
        """The pid of the node's daemon if it is still that process (guards pid reuse)."""
        pid = self.pids.get(node)
        if pid is None:
            return None
        proc = self.procs.get(node)
        if proc is not None:
            return pid if proc.poll() is None else None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        if str(self.config_path(node)).encode() not in cmdline:
            return None
        # A zombie (state Z) has exited already.
        return None if stat.rsplit(")", 1)[1].split()[0] == "Z" else pid

    def running(self, node: str) -> bool:
        return self._ours(node) is not None

    def exit_code(self, node: str) -> int | None:
        proc = self.procs.get(node)
        return proc.poll() if proc is not None else None

    def send_signal(self, node: str, sig: int) -> None:
        pid = self._ours(node)
        if pid is None:
            raise RuntimeError(f"vipd on {node} is not running")
        os.kill(pid, sig)

    def stop(self, node: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Send `sig` to the node's daemon. For SIGTERM/SIGINT/SIGKILL wait until it exited
        (SIGKILL after `timeout`); SIGSTOP/SIGCONT return at once."""
        pid = self._ours(node)
        if pid is None:
            return
        self._send(pid, sig)
        if sig not in (signal.SIGSTOP, signal.SIGCONT):
            self._wait_exit(node, pid, timeout)

    @staticmethod
    def _send(pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                os.kill(pid, signal.SIGCONT)  # a stopped daemon cannot act on SIGTERM

    def _wait_exit(self, node: str, pid: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.running(node):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5.0
            time.sleep(0.02)

    def restart(self, node: str, sig: int = signal.SIGTERM, wait: bool = True) -> int:
        self.stop(node, sig)
        return self.start(node, wait=wait)

    def close(self, graceful: bool = False, timeout: float = 5.0) -> None:
        """Stop every daemon this cluster started, all at once: SIGTERM (graceful) or SIGKILL."""
        for helper in self.helpers:
            helper.stop()
        live = {n: pid for n in self.nodes if (pid := self._ours(n)) is not None}
        for pid in live.values():
            self._send(pid, signal.SIGTERM if graceful else signal.SIGKILL)
        for node, pid in live.items():
            self._wait_exit(node, pid, timeout)

    def start_helper(self, ns_node: str, name: str, argv: Sequence[str]) -> Background:
        """Run `python -m vipd.lab.<argv...>`-style helpers in a namespace, output to a file."""
        path = self.workdir / f"{name}.jsonl"
        with open(path, "wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.lab.ns(ns_node), sys.executable, *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.DEVNULL,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
                start_new_session=True,
            )
        bg = Background(name, proc, path)
        self.helpers.append(bg)
        return bg

    def start_probe(
        self,
        targets: Sequence[str] | None = None,
        interval: float = 0.01,
        name: str = "probe",
        wait: bool = True,
    ) -> Background:
        """A 10 ms ICMP prober in the client namespace; with `wait`, returns once every
        target has answered at least once."""
        targets = list(targets if targets is not None else self.vips)
        bg = self.start_helper(
            "client",
            name,
            ["-m", "vipd.lab.probe", "--targets", ",".join(targets), "--interval", str(interval)],
        )
        if wait:
            from vipd.lab.probe import load_records

            def answered() -> bool:
                if not bg.running():
                    raise LabTimeout(f"prober exited with {bg.proc.returncode}")
                ok = {r["target"] for r in load_records(bg.path) if r.get("ok")}
                return ok >= set(targets)

            self.wait_for(answered, 10.0, f"the client's first replies from {targets}")
        return bg

    def start_arpwatch(self, name: str = "arpwatch") -> Background:
        """Capture ARP / NA frames arriving at the client; returns once the socket is bound."""
        from vipd.lab.arpwatch import is_ready

        bg = self.start_helper("client", name, ["-m", "vipd.lab.arpwatch", "--interface", "eth0"])

        def ready() -> bool:
            if not bg.running():
                raise LabTimeout(f"arpwatch exited with {bg.proc.returncode}")
            return is_ready(bg.path)

        self.wait_for(ready, 10.0, "arpwatch to bind its sockets")
        return bg

    def remove_workdir(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LabCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop every daemon and helper (SIGKILL: the namespaces go next) and drop the work
        dir; `with Lab() as lab, LabCluster(lab) as c:` leaves nothing behind."""
        self.close(graceful=False)
        self.remove_workdir()

    # state (for `vipctl lab`) ----------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes,
            "pool": [[g, list(a)] for g, a in self.pool],
            "workdir": str(self.workdir),
            "timing": self.timing,
            "pids": dict(self.pids),
            "log_level": self.log_level,
            "cluster": self.cluster_name,
        }

    @classmethod
    def attach(cls, lab: Lab, state: dict[str, Any]) -> LabCluster:
        """A handle on daemons started by another process (configs are not rewritten)."""
        c = cls(
            lab,
            state["nodes"],
            [(g, tuple(a)) for g, a in state["pool"]],
            workdir=Path(state["workdir"]),
            timing=state.get("timing"),
            log_level=state.get("log_level", "info"),
            cluster_name=state.get("cluster", CLUSTER_NAME),
            write=False,
        )
        c.pids = {k: int(v) for k, v in state.get("pids", {}).items()}
        return c

    # observation -----------------------------------------------------------------------
    def status(self, node: str, timeout: float = 2.0) -> dict[str, Any]:
        """The node's `status` result over its control socket (path-based Unix sockets are
        reachable from any network namespace)."""
        reply = request(self.socket_path(node), {"cmd": "status"}, timeout=timeout)
        if not reply.get("ok"):
            raise RuntimeError(f"status on {node}: {reply.get('error')}")
        result: dict[str, Any] = reply["result"]
        return result

    def status_owners(self, node: str) -> dict[str, str | None]:
        """vip -> owner according to `node`'s daemon."""
        owners: dict[str, str | None] = {}
        for entry in self.status(node)["pool"]:
            for a in entry["addresses"]:
                owners[bare(a)] = entry.get("owner")
        return owners

    def holdings(self, nodes: Iterable[str] | None = None) -> dict[str, set[str]]:
        """node -> pool addresses present in its namespace's kernel table (eth0)."""
        vips = set(self.vips)
        return {
            n: addresses_in(self.lab.ns(n), "eth0") & vips
            for n in (self.nodes if nodes is None else nodes)
        }

    def ownership(self, nodes: Iterable[str] | None = None) -> dict[str, list[str]]:
        """vip -> nodes whose kernel holds it (every pool address is a key)."""
        owners: dict[str, list[str]] = {v: [] for v in self.vips}
        for node, held in self.holdings(nodes).items():
            for v in held:
                owners[v].append(node)
        return {v: sorted(ns) for v, ns in owners.items()}

    def single_owners(self, nodes: Iterable[str] | None = None) -> dict[str, str] | None:
        """vip -> its one holder among `nodes`, or None unless every vip has exactly one."""
        own = self.ownership(nodes)
        if all(len(ns) == 1 for ns in own.values()):
            return {v: ns[0] for v, ns in own.items()}
        return None

    def wait_converged(
        self, nodes: Iterable[str] | None = None, timeout: float = 15.0, balanced: bool = False
    ) -> dict[str, str]:
        """Wait until every vip has exactly one holder among `nodes` (optionally with counts
        differing by at most one); returns vip -> holder."""
        group = list(self.nodes if nodes is None else nodes)

        def check() -> dict[str, str] | None:
            owners = self.single_owners(group)
            if owners is None or not balanced:
                return owners
            counts = [sum(1 for o in owners.values() if o == n) for n in group]
            return owners if max(counts) - min(counts) <= 1 else None

        what = (
            "one holder per address among " + ",".join(group) + (" (balanced)" if balanced else "")
        )
        return self.wait_for(check, timeout, what, last=lambda: self.describe(group))

    def describe(self, nodes: Iterable[str] | None = None) -> dict[str, Any]:
        """Kernel holders and each running daemon's opinion: the state to print on a timeout."""
        opinions: dict[str, Any] = {}
        for n in self.nodes:
            if not self.running(n):
                opinions[n] = "not running"
                continue
            try:
                opinions[n] = self.status_owners(n)
            except (OSError, ValueError, RuntimeError) as e:
                opinions[n] = f"status failed: {e}"
        return {"kernel": self.ownership(nodes), "vipd": opinions}

    def log_tail(self, node: str, lines: int = 25) -> str:
        try:
            text = self.log_path(node).read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return f"--- {node}: no log at {self.log_path(node)}"
        body = "\n".join(text[-lines:])
        return f"--- {node} ({self.log_path(node)}, last {min(lines, len(text))} lines):\n{body}"

    def logs_tail(self, nodes: Iterable[str] | None = None, lines: int = 25) -> str:
        return "\n".join(self.log_tail(n, lines) for n in (self.nodes if nodes is None else nodes))

    def wait_for(
        self,
        predicate: Callable[[], T | None],
        timeout: float,
        what: str,
        interval: float = 0.02,
        nodes: Iterable[str] | None = None,
        last: Callable[[], Any] | None = None,
    ) -> T:
        """Poll `predicate` until it returns a truthy value; return that value.

        On timeout raise LabTimeout naming `what`, the last observation and the daemons' log
        tails: the failure message alone should say why.
        """

        def explain(value: object) -> str:
            seen = last() if last is not None else value
            return f"; last seen: {seen!r}\n" + self.logs_tail(nodes)

        return wait_for(predicate, timeout, what, interval, explain)


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str = "condition",
    interval: float = 0.02,
    explain: Callable[[object], str] | None = None,
) -> T:
    """Poll `predicate` until truthy; return that value. On timeout raise LabTimeout naming
    `what`, plus whatever `explain(last value)` adds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = explain(value) if explain is not None else ""
            raise LabTimeout(f"timed out after {timeout:.1f}s waiting for {what}{detail}")
        time.sleep(interval)
