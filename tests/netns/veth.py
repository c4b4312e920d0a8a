"""Throwaway network namespaces for the real-kernel tests, and the commands that drive them.

`veth_pair()` builds the common topology: two namespaces joined by a veth pair, both ends
and `lo` up, optional addresses; `namespaces()` is its first half, for tests that need a
namespace without the pair. Names are TAG + 6 random hex digits + "-" + a suffix, so runs
(and a concurrent run of the whole suite) never collide. On exit, even when the body
failed, whatever is still running inside the namespaces is killed by its PID and the
namespaces are deleted (which deletes their links). Only the callers choose addresses:
documentation ranges only (198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32).

Code under test runs in a namespace as a child `ip netns exec NS python -c SNIPPET ARGS`
(namespaces are per thread: switching the pytest process would leak into everything else
it does); `start_in()` starts one.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vipd.lab.topology import list_namespaces, namespace_pids

REPO = Path(__file__).resolve().parents[2]


def ip(*args: str) -> str:
    """`ip ARGS`; its stdout, or RuntimeError with its stderr."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def ip_json(ns: str, *args: str) -> Any:
    """`ip -n NS -j ARGS`, decoded ([] when it prints nothing)."""
    return json.loads(ip("-n", ns, "-j", *args) or "[]")


def snippet_argv(ns: str, code: str, args: dict[str, Any]) -> list[str]:
    """The command that runs the Python `code` in `ns` with `args` as JSON in sys.argv[1]."""
    return [
        *("ip", "netns", "exec", ns, sys.executable, "-c"),
        textwrap.dedent(code),
        json.dumps(args),
    ]


def start_in(
    ns: str, code: str, args: dict[str, Any], *, stdin: bool = False, stderr: Any = subprocess.PIPE
) -> subprocess.Popen[str]:
    """Start a snippet in `ns` (text mode, stdout piped, run from the repository root).

    `ip netns exec` execs in place, so the Popen's pid is the snippet's own: stop it by that.
    """
    return subprocess.Popen(
        snippet_argv(ns, code, args),
        stdin=subprocess.PIPE if stdin else None,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        cwd=REPO,
    )


@contextlib.contextmanager
def namespaces(tag: str, *suffixes: str, sysctls: Sequence[str] = ()) -> Iterator[list[str]]:
    """Namespaces TAG+hex-SUFFIX, one per suffix, with `sysctls` (KEY=VALUE) set in each
    before anything else is created there; always removed on exit."""
    prefix = tag + secrets.token_hex(3)
    names = [f"{prefix}-{suffix}" for suffix in suffixes]
    created: list[str] = []
    try:
        for ns in names:
            ip("netns", "add", ns)
            created.append(ns)
            if sysctls:
                ip("netns", "exec", ns, "sysctl", "-q", "-w", *sysctls)
        yield names
    finally:
        for ns in reversed(created):
            # Only our tests' children can be in a namespace we just made up: killed by PID,
            # they would otherwise keep its network stack alive after the name is gone.
            for pid in namespace_pids(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        left = set(created) & set(list_namespaces())
        assert not left, f"namespaces left behind: {sorted(left)}"


@dataclass(frozen=True)
class VethPair:
    a: str  # namespace of if_a
    b: str  # namespace of if_b
    mac_a: str
    mac_b: str


@contextlib.contextmanager
def veth_pair(
    tag: str,
    if_a: str,
    if_b: str,
    *,
    names: tuple[str, str] = ("a", "b"),
    addrs_a: Sequence[str] = (),
    addrs_b: Sequence[str] = (),
    sysctls: Sequence[str] = (),
) -> Iterator[VethPair]:
    """Two namespaces (see `namespaces`, suffixes `names`) joined by a veth pair `if_a` -
    `if_b`, `lo` and both ends up, `addrs_a` on `if_a` and `addrs_b` on `if_b` in that
    order (IPv6 ones with nodad: usable at once). Yields the namespaces and the ends' MACs."""
    with namespaces(tag, *names, sysctls=sysctls) as (a, b):
        # Created directly inside the namespaces: the names never exist in the root one.
        ip("link", "add", if_a, "netns", a, "type", "veth", "peer", "name", if_b, "netns", b)
        for ns, dev, addrs in ((a, if_a, addrs_a), (b, if_b, addrs_b)):
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", dev, "up")
            for addr in addrs:
                ip("-n", ns, "addr", "add", addr, "dev", dev, *(["nodad"] if ":" in addr else []))
        yield VethPair(a, b, mac_of(a, if_a), mac_of(b, if_b))


def mac_of(ns: str, dev: str) -> str:
    return str(ip_json(ns, "link", "show", "dev", dev)[0]["address"]).lower()
