"""`AddressWatcher` against a real kernel: netlink address notifications in a namespace.

The watcher runs in a child `ip netns exec NS python -c ...` (namespaces are per thread; this
pytest process stays in the root one). The child prints one JSON line per delivered event and
obeys one-line commands on stdin; the test changes addresses from outside with `ip -n NS`.
One namespace per test, named with a per-run prefix and deleted in the finalizer even on
failure; the child is stopped by its own handle. Addresses: 203.0.113.0/24, 2001:db8::/32.

The first tests need no root: parsing, and start/close in this process's own namespace.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns.conftest import NETNS_SKIP_REASON, netns_available
from tests.netns.veth import ip, ip_json, namespaces, start_in
from vipd.kernel.address_events import (
    AddressChange,
    AddressEvent,
    AddressWatcher,
    Resync,
    change_from_message,
)

pytestmark = [pytest.mark.netns]
needs_netns = pytest.mark.skipif(not netns_available(), reason=NETNS_SKIP_REASON)

IF = "w0"  # in the namespace, peer of w1 (same namespace)
IFA_F_NODAD = 0x02
THREAD_NAME = "vipd-address-events"


# --- no root needed ---------------------------------------------------------------------------


def test_change_from_message_parses_kernel_messages() -> None:
    new4 = {
        "header": {"type": 20},  # RTM_NEWADDR
        "index": 3,
        "prefixlen": 32,
        "flags": 0x80,
        "IFA_LOCAL": "203.0.113.9",
        "IFA_ADDRESS": "203.0.113.9",
    }
    assert change_from_message(new4) == AddressChange(
        "new", 3, ipaddress.ip_interface("203.0.113.9/32"), 0x80
    )
    # IPv6 has only IFA_ADDRESS; IFA_FLAGS (32 bits) wins over the 8-bit header field.
    del6 = {
        "header": {"type": 21},  # RTM_DELADDR
        "index": 4,
        "prefixlen": 64,
        "flags": 0x48,
        "IFA_FLAGS": 0x248,
        "IFA_ADDRESS": "2001:db8::9",
    }
    change = change_from_message(del6)
    assert change == AddressChange("del", 4, ipaddress.ip_interface("2001:db8::9/64"), 0x248)
    assert change_from_message({**new4, "header": {"type": 16}}) is None  # RTM_NEWLINK
    assert change_from_message({"header": {"type": 20}, "index": 3, "prefixlen": 32}) is None


def test_start_and_close_in_own_namespace() -> None:
    """Subscribing needs no privilege: a watcher starts, says so, and stops at once."""

    async def main() -> tuple[list[AddressEvent], float, bool]:
        loop = asyncio.get_running_loop()
        events: list[AddressEvent] = []
        started = asyncio.Event()

        def on_change(ev: AddressEvent) -> None:
            events.append(ev)
            started.set()

        w = AddressWatcher(loop, on_change)
        w.close()  # before start: fine
        w2 = AddressWatcher(loop, on_change)
        w2.start()
        w2.start()  # idempotent
        await asyncio.wait_for(started.wait(), 5)
        t0 = time.monotonic()
        w2.close()
        elapsed = time.monotonic() - t0
        w2.close()
        with pytest.raises(RuntimeError):
            w2.start()
        return events, elapsed, w2.running

    events, elapsed, running = asyncio.run(main())
    assert events[0] == Resync("started")
    assert elapsed < 1.0
    assert not running
    assert THREAD_NAME not in [t.name for t in threading.enumerate()]


class FakeSocket:
    """Stands in for pyroute2's IPRSocket: a pipe whose bytes script what `get()` does."""

    opened: list[FakeSocket] = []
    open_failures = 0

    def __init__(self, rcvbuf: int, groups: int) -> None:
        if FakeSocket.open_failures:
            FakeSocket.open_failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        self.groups = groups
        self.bound: int | None = None
        self.closed = False
        self.r, self.w = os.pipe()
        self.socket = self  # .socket.setblocking()
        FakeSocket.opened.append(self)

    def setblocking(self, flag: bool) -> None:
        pass

    def bind(self, groups: int) -> None:
        self.bound = groups

    def fileno(self) -> int:
        return self.r

    def get(self) -> list[dict[str, Any]]:
        step = os.read(self.r, 1)
        if step == b"E":
            raise OSError(errno.EIO, "Input/output error")
        if step == b"N":
            raise OSError(errno.ENOBUFS, "No buffer space available")
        return [{"header": {"type": 20}, "index": 7, "prefixlen": 32, "IFA_LOCAL": "203.0.113.7"}]

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.r)
            os.close(self.w)


def test_socket_errors_reopen_with_backoff_then_resync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vipd.kernel.address_events.IPRSocket", FakeSocket)
    monkeypatch.setattr(FakeSocket, "opened", [])
    monkeypatch.setattr(FakeSocket, "open_failures", 2)

    async def main() -> tuple[list[tuple[float, AddressEvent]], AddressWatcher]:
        loop = asyncio.get_running_loop()
        events: list[tuple[float, AddressEvent]] = []
        arrived = asyncio.Event()

        def on_change(ev: AddressEvent) -> None:
            events.append((time.monotonic(), ev))
            arrived.set()

        async def wait_for(n: int) -> None:
            while len(events) < n:
                arrived.clear()
                await asyncio.wait_for(arrived.wait(), 5)

        w = AddressWatcher(loop, on_change)
        t0 = time.monotonic()
        w.start()
        await wait_for(1)  # two failed opens (retry at once, then after 0.1 s), then up
        first = FakeSocket.opened[0]
        assert first.bound == 0x110
        os.write(first.w, b"A")  # an address event
        await wait_for(2)
        os.write(first.w, b"N")  # ENOBUFS: same socket, resync
        await wait_for(3)
        os.write(first.w, b"E")  # any other error: closed, reopened at once, resync
        await wait_for(4)
        os.write(FakeSocket.opened[1].w, b"A")  # the new socket is the one being read
        await wait_for(5)
        w.close()
        return [(t - t0, ev) for t, ev in events], w

    events, w = asyncio.run(main())
    change = AddressChange("new", 7, ipaddress.ip_interface("203.0.113.7/32"), 0)
    assert [ev for _, ev in events] == [
        Resync("started"),
        change,
        Resync("overflow"),
        Resync("reopened"),
        change,
    ]
    assert 0.1 <= events[0][0] < 1.0  # the backoff was waited, and not more
    assert len(FakeSocket.opened) == 2
    assert all(sock.closed for sock in FakeSocket.opened)  # the failed one and, on close, ours
    assert (w.overflows, w.reopens, w.received) == (1, 1, 2)
    assert not w.running


def test_a_bug_in_the_reader_starts_over_instead_of_going_deaf(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("vipd.kernel.address_events.IPRSocket", FakeSocket)
    monkeypatch.setattr(FakeSocket, "opened", [])
    monkeypatch.setattr(FakeSocket, "open_failures", 0)
    real = change_from_message
    calls = []

    def buggy(msg: Any) -> AddressChange | None:
        calls.append(msg)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return real(msg)

    monkeypatch.setattr("vipd.kernel.address_events.change_from_message", buggy)

    async def main() -> list[AddressEvent]:
        events: list[AddressEvent] = []
        w = AddressWatcher(asyncio.get_running_loop(), events.append)
        w.start()

        async def wait_for(n: int) -> None:
            deadline = time.monotonic() + 5
            while len(events) < n and time.monotonic() < deadline:
                await asyncio.sleep(0.01)

        await wait_for(1)
        os.write(FakeSocket.opened[0].w, b"A")  # the parse raises: socket dropped, reopened
        await wait_for(2)
        os.write(FakeSocket.opened[-1].w, b"A")
        await wait_for(3)
        w.close()
        return events

    events = asyncio.run(main())
    change = AddressChange("new", 7, ipaddress.ip_interface("203.0.113.7/32"), 0)
    assert events == [Resync("started"), Resync("reopened"), change]


# --- in a namespace ----------------------------------------------------------------------------


@pytest.fixture
def ns() -> Iterator[str]:
    # No DAD: link-local addresses appear at once, not as a late RTM_NEWADDR mid-test.
    no_dad = "net.ipv6.conf.default.accept_dad=0"
    with namespaces(f"vt-{os.getpid()}-", "w", sysctls=(no_dad,)) as (name,):
        ip("-n", name, "link", "add", IF, "type", "veth", "peer", "name", "w1")
        for link in ("lo", IF, "w1"):
            ip("-n", name, "link", "set", link, "up")
        yield name


WATCH_SNIPPET = """
import asyncio, json, subprocess, sys, threading, time
import structlog
from vipd.kernel.address_events import AddressWatcher, Resync

args = json.loads(sys.argv[1])
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))

def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\\n")
    sys.stdout.flush()

async def main():
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    closed = [False]

    def on_change(ev):
        if closed[0]:
            emit({"ev": "after_close", "event": repr(ev)})
        if isinstance(ev, Resync):
            emit({"ev": "resync", "reason": ev.reason})
            return
        if ev.kind == "new" and str(ev.address) == args.get("raise_on"):
            emit({"ev": "raising"})
            raise RuntimeError("a handler bug")
        emit({"ev": ev.kind, "ifindex": ev.ifindex, "address": str(ev.address),
              "flags": ev.flags})

    w = AddressWatcher(loop, on_change, **args.get("kwargs", {}))

    def stats():
        # Multicast groups of the rtnetlink sockets in this namespace (only the watcher's
        # subscribes to any), as the kernel lists them.
        with open("/proc/net/netlink") as f:
            rows = [line.split() for line in f.readlines()[1:]]
        groups = sorted({int(r[3], 16) for r in rows if r[1] == "0" and int(r[3], 16)})
        return {"received": w.received, "delivered": w.delivered, "dropped": w.dropped,
                "overflows": w.overflows, "reopens": w.reopens, "groups": groups}

    def command():
        cmd = sys.stdin.readline().strip() or "close"  # EOF: the test is done with us
        if cmd == "stats":
            emit({"ev": "stats", **stats()})
        elif cmd == "block":
            # Stall the loop (as a slow handler would) until the thread starts dropping.
            emit({"ev": "blocked"})
            deadline = time.monotonic() + 10
            while w.dropped == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)
            emit({"ev": "unblocked", **stats()})
        elif cmd == "close":
            loop.remove_reader(sys.stdin.fileno())
            received = None
            if "pending" in args:
                # An event queued for the loop, not delivered yet, when close() is called.
                subprocess.run(["ip", "addr", "add", args["pending"], "dev", args["if"]],
                               check=True)
                deadline = time.monotonic() + 5
                while w.received == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                received = w.received
            t0 = time.monotonic()
            w.close()
            elapsed = time.monotonic() - t0
            closed[0] = True
            w.close()
            try:
                w.start()
                restart = None
            except RuntimeError as exc:
                restart = str(exc)
            loop.call_later(0.3, done.set)  # let queued callbacks run: they must be silent
            emit({"ev": "closed", "elapsed": elapsed, "running": w.running,
                  "received_before_close": received, "restart": restart,
                  "threads": [t.name for t in threading.enumerate()
                              if t is not threading.main_thread()]})

    loop.add_reader(sys.stdin.fileno(), command)
    w.start()
    await done.wait()
    emit({"ev": "exit"})

asyncio.run(main())
"""


class Child:
    """The watcher process in the namespace: JSON lines out, commands in."""

    def __init__(self, ns: str, args: dict[str, Any], stderr_path: Path) -> None:
        self._stderr = stderr_path.open("w")
        self.proc = start_in(ns, WATCH_SNIPPET, {"if": IF, **args}, stdin=True, stderr=self._stderr)
        self._stderr_path = stderr_path
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def next(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next line that is not about a link-local address."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(self._report("timed out")) from None
            if item is None:
                raise AssertionError(self._report("child exited"))
            self.seen.append(item)
            if str(item.get("address", "")).startswith("fe80:"):
                continue
            return item

    def expect(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> list[Any]:
        """Lines up to and including the first that matches `pred`."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            item = self.next(max(0.0, deadline - time.monotonic()))
            got.append(item)
            if pred(item):
                return got

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def stderr_text(self) -> str:
        self._stderr.flush()
        return self._stderr_path.read_text()

    def _report(self, what: str) -> str:
        return f"{what}; lines so far: {self.seen}\nstderr:\n{self.stderr_text()}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)  # in case a test left it stopped
                if self.proc.stdin is not None:
                    self.proc.stdin.close()  # EOF: the child closes the watcher and exits
                self.proc.wait(timeout=5)
            except (subprocess.TimeoutExpired, OSError):
                self.proc.kill()  # only the child we started, by its handle
                self.proc.wait()
        self._stderr.close()


@pytest.fixture
def child_factory(ns: str, tmp_path: Path) -> Iterator[Callable[..., Child]]:
    children: list[Child] = []

    def make(**args: Any) -> Child:
        c = Child(ns, args, tmp_path / f"child{len(children)}.stderr")
        children.append(c)
        c.expect(lambda e: e == {"ev": "resync", "reason": "started"})
        return c

    try:
        yield make
    finally:
        for c in children:
            c.stop()


def is_event(kind: str, address: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("ev") == kind and e.get("address") == address


@needs_netns
def test_adds_and_deletes_reported_other_changes_not(
    ns: str, child_factory: Callable[..., Child]
) -> None:
    child = child_factory(raise_on="203.0.113.66/32")
    ifindex = ip_json(ns, "link", "show", "dev", IF)[0]["ifindex"]

    ip("-n", ns, "addr", "add", "203.0.113.5/32", "dev", IF)
    new4 = child.next()
    assert new4["ev"] == "new" and new4["address"] == "203.0.113.5/32", new4
    assert new4["ifindex"] == ifindex

    ip("-n", ns, "addr", "add", "2001:db8:0:1::5/128", "dev", IF, "nodad")
    new6 = child.next()
    assert new6["ev"] == "new" and new6["address"] == "2001:db8:0:1::5/128", new6
    assert new6["flags"] & IFA_F_NODAD

    # Link, route and neighbour changes are not address events: the next line is the del.
    ip("-n", ns, "link", "set", IF, "mtu", "1400")
    ip("-n", ns, "route", "add", "203.0.113.128/25", "dev", IF)
    ip("-n", ns, "neigh", "add", "203.0.113.129", "lladdr", "02:00:00:00:00:01", "dev", IF)
    ip("-n", ns, "addr", "del", "203.0.113.5/32", "dev", IF)  # "deleted by hand"
    gone = child.next()
    assert gone["ev"] == "del" and gone["address"] == "203.0.113.5/32", gone
    assert gone["ifindex"] == ifindex

    # Subscribed to the address groups only: RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR.
    child.send("stats")
    assert child.expect(lambda e: e["ev"] == "stats")[-1]["groups"] == [0x10 | 0x100]

    # A handler that raises is logged; the next event still arrives.
    ip("-n", ns, "addr", "add", "203.0.113.66/32", "dev", IF)
    assert child.next() == {"ev": "raising"}
    ip("-n", ns, "addr", "add", "203.0.113.67/32", "dev", IF)
    assert child.next()["address"] == "203.0.113.67/32"
    stderr = child.stderr_text()
    assert "address_event_handler_failed" in stderr and "a handler bug" in stderr
    assert "Exception in callback" not in stderr  # caught by us, not by asyncio

    # A link deleted with its addresses: one del per address.
    ip("-n", ns, "link", "del", IF)
    dels = {child.next()["address"] for _ in range(3)}
    assert dels == {"203.0.113.66/32", "203.0.113.67/32", "2001:db8:0:1::5/128"}


@needs_netns
def test_close_is_prompt_idempotent_and_final(ns: str, child_factory: Callable[..., Child]) -> None:
    child = child_factory(pending="203.0.113.250/32")
    child.send("close")
    closed = child.expect(lambda e: e["ev"] == "closed")[-1]
    assert closed["received_before_close"] == 1  # the pending event reached the loop ...
    assert closed["elapsed"] < 1.0
    assert closed["running"] is False
    assert closed["threads"] == []  # no thread left behind
    assert closed["restart"] == "address watcher is closed"
    rest = child.expect(lambda e: e["ev"] == "exit")
    assert rest == [{"ev": "exit"}]  # ... and was never delivered after close()
    assert child.proc.wait(timeout=5) == 0


@needs_netns
def test_overflow_sends_resync_and_events_keep_flowing(
    ns: str, child_factory: Callable[..., Child]
) -> None:
    # The smallest receive buffer the kernel allows holds only a few notifications.
    child = child_factory(kwargs={"rcvbuf": 1024})
    os.kill(child.proc.pid, signal.SIGSTOP)  # the reader cannot read: the buffer fills
    try:
        batch = "".join(f"addr add 203.0.113.{i}/32 dev {IF}\n" for i in range(1, 201))
        subprocess.run(
            ["ip", "-n", ns, "-batch", "-"], input=batch, text=True, check=True, timeout=20
        )
    finally:
        os.kill(child.proc.pid, signal.SIGCONT)
    got = child.expect(lambda e: e == {"ev": "resync", "reason": "overflow"})
    assert all(e["ev"] == "new" for e in got[:-1])
    assert len(got) - 1 < 200  # events really were lost

    # Same subscription, still alive: a change after the overflow is reported.
    ip("-n", ns, "addr", "del", "203.0.113.200/32", "dev", IF)
    child.expect(is_event("del", "203.0.113.200/32"))
    child.send("stats")
    stats = child.expect(lambda e: e["ev"] == "stats")[-1]
    assert stats["overflows"] >= 1
    assert stats["received"] < 201
    assert stats["reopens"] == 0  # ENOBUFS does not need a new socket


@needs_netns
def test_stalled_loop_bounds_backlog_with_resync(
    ns: str, child_factory: Callable[..., Child]
) -> None:
    child = child_factory(kwargs={"max_backlog": 50})
    child.send("block")
    child.expect(lambda e: e["ev"] == "blocked")
    batch = "".join(f"addr add 203.0.113.{i}/32 dev {IF}\n" for i in range(1, 201))
    subprocess.run(["ip", "-n", ns, "-batch", "-"], input=batch, text=True, check=True, timeout=20)
    unblocked = child.expect(lambda e: e["ev"] == "unblocked")[-1]
    assert unblocked["dropped"] > 0
    got = child.expect(lambda e: e == {"ev": "resync", "reason": "backlog"})
    news = [e for e in got[:-1] if e["ev"] == "new"]
    assert len(news) == 50  # exactly the bound, in kernel order, then the resync
    assert [e["address"] for e in news] == [f"203.0.113.{i}/32" for i in range(1, 51)]

    # Once the resync was delivered, events flow again.
    ip("-n", ns, "addr", "del", "203.0.113.7/32", "dev", IF)
    child.expect(is_event("del", "203.0.113.7/32"))
