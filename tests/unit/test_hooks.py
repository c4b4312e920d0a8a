"""HookRunner with real processes: small /bin/sh scripts written into tmp_path.

Every scenario runs under `run_clean`, which fails the test on what a careless subprocess
runner leaves behind: tasks still pending after close(), "Task was destroyed but it is
pending" / "Event loop is closed" (asyncio's logger, unraisable exceptions in __del__) and
ResourceWarnings about unclosed transports.

Orphans: the grandchildren of a killed hook are re-parented to init. Where init does not reap
(some containers), such a dead orphan stays a zombie; `gone()` accepts that for grandchildren
only. The hooks themselves are the runner's children and must be gone for good (`reaped()`).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Coroutine, Mapping, Sequence
from ipaddress import IPv4Interface, IPv6Interface
from pathlib import Path
from typing import Any, TypeVar

import pytest
from structlog.testing import capture_logs

from vipd.config import Hooks
from vipd.host.hooks import OUTPUT_TAIL, HookRunner

T = TypeVar("T")
ADDRS: list[IPv4Interface | IPv6Interface] = [
    IPv4Interface("203.0.113.10/32"),
    IPv6Interface("2001:db8::10/128"),
]


# --- helpers -----------------------------------------------------------------------------


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def run_clean(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(coro), failing on leftover tasks and asyncio/transport complaints."""

    async def main() -> tuple[T, set[asyncio.Task[Any]]]:
        result = await coro
        return result, asyncio.all_tasks() - {asyncio.current_task()}

    unraisable: list[Any] = []
    handler = _Records()
    asyncio_log = logging.getLogger("asyncio")
    old_hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    asyncio_log.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result, leftovers = asyncio.run(main())
            gc.collect()  # transports left unclosed complain in __del__
    finally:
        sys.unraisablehook = old_hook
        asyncio_log.removeHandler(handler)
    problems = [f"task left pending: {t!r}" for t in leftovers]
    problems += [f"unraisable {u.exc_type.__name__}: {u.exc_value}" for u in unraisable]
    problems += [f"asyncio: {r.getMessage()}" for r in handler.records]
    problems += [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not problems
    return result


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, session...)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return text.rsplit(")", 1)[1].split()


def reaped(pid: int) -> bool:
    """Neither running nor a zombie: for our own children (the hooks)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def gone(pid: int) -> bool:
    """Not running; a zombie is accepted only if it is not ours (an orphan init must reap)."""
    if reaped(pid):
        return True
    fields = _stat(pid)
    return fields is not None and fields[0] == "Z" and int(fields[1]) != os.getpid()


def read_pids(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()]


async def wait_for_file(path: Path, lines: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and len(path.read_text().splitlines()) >= lines):
        assert time.monotonic() < deadline, f"{path} never got {lines} lines"
        await asyncio.sleep(0.01)


def events(logs: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


#: Appends "GROUP EVENT start|end WALLCLOCK" to $1 around a sleep of $2 seconds.
STAMP = """echo "$VIPD_GROUP $VIPD_EVENT start $(date +%s.%N)" >> "$1"
sleep "$2"
echo "$VIPD_GROUP $VIPD_EVENT end $(date +%s.%N)" >> "$1"
"""


def read_stamps(path: Path) -> tuple[dict[tuple[str, str], tuple[float, float]], list[str]]:
    """{(group, event): (start, end)} and the order of the lines."""
    starts: dict[tuple[str, str], float] = {}
    spans: dict[tuple[str, str], tuple[float, float]] = {}
    order: list[str] = []
    for line in path.read_text().splitlines():
        group, event, what, when = line.split()
        order.append(f"{group} {event} {what}")
        if what == "start":
            starts[group, event] = float(when)
        else:
            spans[group, event] = (starts[group, event], float(when))
    return spans, order


# --- environment ---------------------------------------------------------------------------


def test_environment_is_exactly_the_documented_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VIPD_TEST_SECRET", "must-not-leak")
    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin:/bin:/opt/vip-test/bin")
    out = tmp_path / "env"
    dump = script(
        tmp_path,
        "dump.sh",
        'env > "$1"\nreadlink /proc/$$/fd/0 > "$1.stdin"\ncat /proc/$$/stat > "$1.stat"\n'
        'echo $$ > "$1.pid"\n',
    )
    hooks = Hooks(post_up=(dump, str(out)), timeout=5)

    async def scenario() -> HookRunner:
        runner = HookRunner(hooks, "web1")
        runner.fire("post_up", "grp-a", ADDRS, "eth0", "failover")
        await runner.close(grace=5)
        return runner

    with capture_logs() as logs:
        runner = run_clean(scenario())

    env = dict(line.split("=", 1) for line in out.read_text().splitlines())
    assert env.pop("PWD") == "/"  # set by sh itself; the hook runs in /
    assert env == {
        "PATH": "/usr/local/bin:/usr/bin:/bin:/opt/vip-test/bin",
        "LANG": "C",
        "VIPD_EVENT": "post_up",
        "VIPD_GROUP": "grp-a",
        "VIPD_ADDRESSES": "203.0.113.10/32 2001:db8::10/128",
        "VIPD_INTERFACE": "eth0",
        "VIPD_REASON": "failover",
        "VIPD_NODE": "web1",
    }
    assert Path(f"{out}.stdin").read_text().strip() == "/dev/null"
    pid = int(Path(f"{out}.pid").read_text())
    _state, _ppid, pgrp, session = Path(f"{out}.stat").read_text().rsplit(")", 1)[1].split()[:4]
    assert int(pgrp) == int(session) == pid  # its own session and process group
    assert reaped(pid)
    assert runner.counters == {"run": 1, "failed": 0, "timed_out": 0, "dropped": 0}
    [done] = events(logs, "hook_done")
    assert (done["hook"], done["group"], done["rc"], done["log_level"]) == (
        "post_up",
        "grp-a",
        0,
        "info",
    )
    assert done["duration"] >= 0


def test_default_path_when_the_daemon_has_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PATH")
    out = tmp_path / "path"
    hook = script(tmp_path, "path.sh", 'echo "$PATH" > "$1"\n')

    async def scenario() -> None:
        runner = HookRunner(Hooks(up=(hook, str(out))), "web1")
        runner.fire("up", "g", ADDRS, "eth0", "placement")
        await runner.close(grace=5)

    run_clean(scenario())
    assert out.read_text().split() == [
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    ]


# --- ordering and concurrency ------------------------------------------------------------


def test_events_of_a_group_run_in_order_and_groups_run_concurrently(tmp_path: Path) -> None:
    stamps = tmp_path / "stamps"
    hook = script(tmp_path, "stamp.sh", STAMP)
    hooks = Hooks(
        up=(hook, str(stamps), "0.6"),  # slow up...
        post_up=(hook, str(stamps), "0"),  # ...fast post_up: must still wait for it
        down=(hook, str(stamps), "0.1"),
        post_down=(hook, str(stamps), "0"),
        timeout=10,
    )
    groups = [f"g{i}" for i in range(6)]
    sequence = ("up", "post_up", "down", "post_down")

    async def scenario() -> HookRunner:
        runner = HookRunner(hooks, "web1", max_concurrent=8)
        for event in sequence:
            for g in groups:
                runner.fire(event, g, ADDRS, "eth0", "placement")
        assert runner.pending == 4 * len(groups)
        await runner.close(grace=10)
        assert runner.pending == 0
        return runner

    runner = run_clean(scenario())
    spans, order = read_stamps(stamps)
    for g in groups:
        mine = [line.split(" ", 1)[1] for line in order if line.startswith(f"{g} ")]
        assert mine == [f"{e} {what}" for e in sequence for what in ("start", "end")]
        for before, after in itertools.pairwise(sequence):
            assert spans[g, before][1] <= spans[g, after][0], (g, before, after)
    # All six slow `up`s were running at the same moment.
    ups = [spans[g, "up"] for g in groups]
    assert max(start for start, _ in ups) < min(end for _, end in ups)
    assert runner.counters["run"] == 24
    assert runner.counters["failed"] == runner.counters["dropped"] == 0


def test_at_most_max_concurrent_processes_run_at_once(tmp_path: Path) -> None:
    stamps = tmp_path / "stamps"
    hook = script(tmp_path, "stamp.sh", STAMP)

    async def scenario() -> None:
        runner = HookRunner(Hooks(up=(hook, str(stamps), "0.3")), "web1", max_concurrent=2)
        for i in range(5):
            runner.fire("up", f"g{i}", ADDRS, "eth0", "placement")
        await runner.close(grace=10)

    run_clean(scenario())
    spans, _ = read_stamps(stamps)
    assert len(spans) == 5
    edges = sorted([(s, 1) for s, _ in spans.values()] + [(e, -1) for _, e in spans.values()])
    running = peak = 0
    for _, step in edges:  # at equal times an end (-1) sorts before a start (+1)
        running += step
        peak = max(peak, running)
    assert peak == 2


# --- timeouts ------------------------------------------------------------------------------


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    # The hook starts a background child (which notes a SIGTERM and starts a `sleep 60` of
    # its own), records the PIDs, says something and hangs.
    child = script(
        tmp_path,
        "child.sh",
        'trap \'echo got-TERM > "$1.sig"; exit 0\' TERM\nsleep 60 &\necho $! > "$1.sleep"\nwait\n',
    )
    body = f'{child} "$1" &\necho $! > "$1"\necho $$ >> "$1"\necho "about to hang"\nwait\n'
    obedient = script(tmp_path, "obedient.sh", body)
    # Ignores SIGTERM, and so does everything it starts (ignored signals are inherited and a
    # shell cannot trap a signal ignored on entry): only the SIGKILL 1 s later ends them.
    stubborn = script(tmp_path, "stubborn.sh", "trap '' TERM\n" + body)
    pids_a, pids_b = tmp_path / "a", tmp_path / "b"
    hooks = Hooks(up=(obedient, str(pids_a)), down=(stubborn, str(pids_b)), timeout=0.5)

    async def scenario() -> tuple[HookRunner, float]:
        runner = HookRunner(hooks, "web1")
        start = time.monotonic()
        runner.fire("up", "ga", ADDRS, "eth0", "placement")
        runner.fire("down", "gb", ADDRS, "eth0", "leaving")
        for path in (pids_a, pids_b):
            await wait_for_file(path, 2)
            await wait_for_file(Path(f"{path}.sleep"), 1)
        await runner.close(grace=10)
        return runner, time.monotonic() - start

    with capture_logs() as logs:
        runner, elapsed = run_clean(scenario())

    for path in (pids_a, pids_b):
        child_pid, hook_pid = read_pids(path)
        [sleep_pid] = read_pids(Path(f"{path}.sleep"))
        assert reaped(hook_pid), f"hook {hook_pid} still exists"
        assert gone(child_pid), f"background child {child_pid} of the hook survived"
        assert gone(sleep_pid), f"grandchild {sleep_pid} of the hook survived"
    # SIGTERM went to the whole group first: the child had its chance to clean up.
    assert Path(f"{pids_a}.sig").read_text() == "got-TERM\n"
    assert not Path(f"{pids_b}.sig").exists()
    assert runner.counters["timed_out"] == 2
    assert runner.counters["failed"] == 0
    timeouts = {e["group"]: e for e in events(logs, "hook_timeout")}
    assert set(timeouts) == {"ga", "gb"}
    assert timeouts["ga"]["hook"] == "up" and obedient in timeouts["ga"]["command"]
    assert timeouts["gb"]["hook"] == "down" and stubborn in timeouts["gb"]["command"]
    for e in timeouts.values():
        assert e["log_level"] == "error" and e["output"] == "about to hang"
    assert timeouts["ga"]["rc"] == -signal.SIGTERM
    assert timeouts["gb"]["rc"] == -signal.SIGKILL  # SIGTERM ignored: SIGKILL after 1 s
    assert 1.4 <= timeouts["gb"]["duration"] < 3.0
    assert elapsed < 4.0


def test_a_background_child_of_a_successful_hook_does_not_hold_it(tmp_path: Path) -> None:
    # The hook exits 0 at once but leaves a process that keeps its stdout open.
    pidfile = tmp_path / "pid"
    hook = script(tmp_path, "starts.sh", 'sleep 30 &\necho $! > "$1"\necho started\n')

    async def scenario() -> HookRunner:
        runner = HookRunner(Hooks(post_up=(hook, str(pidfile)), timeout=5), "web1")
        runner.fire("post_up", "g", ADDRS, "eth0", "placement")
        await runner.close(grace=5)
        return runner

    with capture_logs() as logs:
        try:
            runner = run_clean(scenario())
        finally:
            if pidfile.exists():
                os.kill(read_pids(pidfile)[0], signal.SIGKILL)
    [done] = events(logs, "hook_done")
    assert done["duration"] < 1.0  # not the 30 s of the leftover, nor the 5 s timeout
    assert runner.counters == {"run": 1, "failed": 0, "timed_out": 0, "dropped": 0}


# --- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["exit3", "missing", "not-executable", "bad-format"])
def test_a_failing_hook_is_counted_and_logged_and_later_hooks_run(
    tmp_path: Path, kind: str
) -> None:
    if kind == "exit3":
        bad = script(tmp_path, "fails.sh", "seq 1 5000\necho oops >&2\nexit 3\n")
    elif kind == "missing":
        bad = str(tmp_path / "no-such-hook")
    elif kind == "not-executable":
        bad = script(tmp_path, "noexec.sh", "exit 0\n")
        Path(bad).chmod(0o644)
    else:
        Path(bad := str(tmp_path / "garbage")).write_bytes(b"\x00\x01garbage")
        Path(bad).chmod(0o755)
    marker = tmp_path / "marker"
    good = script(tmp_path, "good.sh", 'echo "$VIPD_EVENT" >> "$1"\n')
    hooks = Hooks(up=(bad, "arg"), post_up=(good, str(marker)), timeout=5)

    async def scenario() -> HookRunner:
        runner = HookRunner(hooks, "web1")
        runner.fire("up", "g", ADDRS, "eth0", "failover")
        runner.fire("post_up", "g", ADDRS, "eth0", "failover")
        await runner.close(grace=5)
        return runner

    with capture_logs() as logs:
        runner = run_clean(scenario())

    assert marker.read_text() == "post_up\n"
    assert runner.counters == {"run": 2, "failed": 1, "timed_out": 0, "dropped": 0}
    [failed] = events(logs, "hook_failed")
    assert (failed["hook"], failed["group"], failed["log_level"]) == ("up", "g", "error")
    assert bad in failed["command"]
    if kind == "exit3":
        assert failed["rc"] == 3
        output = failed["output"]
        assert output.endswith("4999\n5000\noops")  # stdout and stderr, merged, the tail
        assert len(output) <= OUTPUT_TAIL and not output.startswith("1\n")
    else:
        expected = {"missing": "ENOENT", "not-executable": "EACCES", "bad-format": "ENOEXEC"}
        assert failed["error"].startswith(expected[kind] + ":")
    assert [e["hook"] for e in events(logs, "hook_done")] == ["post_up"]


def test_unknown_event_raises_and_unconfigured_event_is_a_no_op(tmp_path: Path) -> None:
    async def scenario() -> None:
        runner = HookRunner(Hooks(), "web1")
        with pytest.raises(ValueError, match="unknown hook event"):
            runner.fire("timeout", "g", ADDRS, "eth0", "placement")
        runner.fire("up", "g", ADDRS, "eth0", "placement")
        assert runner.pending == 0
        assert asyncio.all_tasks() == {asyncio.current_task()}
        await runner.close(grace=1)
        assert runner.counters["run"] == 0

    run_clean(scenario())


# --- the event loop is never blocked ---------------------------------------------------------


def test_the_loop_keeps_ticking_while_hooks_run(tmp_path: Path) -> None:
    hook = script(tmp_path, "sleeps.sh", "sleep 2\n")

    async def scenario() -> tuple[HookRunner, list[float], float, float]:
        loop = asyncio.get_running_loop()
        ticks: list[float] = []

        async def ticker() -> None:
            while True:
                ticks.append(loop.time())
                await asyncio.sleep(0.01)

        tick_task = loop.create_task(ticker())
        await asyncio.sleep(0.05)
        runner = HookRunner(Hooks(up=(hook,), timeout=10), "web1")
        start = loop.time()
        for i in range(8):
            runner.fire("up", f"g{i}", ADDRS, "eth0", "placement")
        fire_time = loop.time() - start
        await runner.close(grace=10)
        elapsed = loop.time() - start
        tick_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await tick_task
        return runner, ticks, fire_time, elapsed

    runner, ticks, fire_time, elapsed = run_clean(scenario())
    assert runner.counters["run"] == 8 and runner.counters["failed"] == 0
    assert 2.0 <= elapsed < 4.0  # the hooks really slept, and concurrently
    assert fire_time < 0.05
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert len(ticks) > 100
    assert max(gaps) < 0.2


# --- queue overflow ------------------------------------------------------------------------


def test_queue_overflow_drops_the_oldest_queued_event(tmp_path: Path) -> None:
    log_file = tmp_path / "ran"
    hook = script(
        tmp_path,
        "slow-first.sh",
        'echo "$VIPD_EVENT $VIPD_REASON" >> "$1"\n[ "$VIPD_REASON" = r0 ] && sleep 0.3\nexit 0\n',
    )
    cmd = (hook, str(log_file))
    hooks = Hooks(up=cmd, post_up=cmd, down=cmd, post_down=cmd, timeout=5)

    async def scenario() -> HookRunner:
        runner = HookRunner(hooks, "web1", max_queued_per_group=2)
        runner.fire("up", "g", ADDRS, "eth0", "r0")
        await wait_for_file(log_file, 1)  # r0 is running now, the rest queue behind it
        for i, event in enumerate(("post_up", "down", "post_down", "up"), start=1):
            runner.fire(event, "g", ADDRS, "eth0", f"r{i}")
        runner.fire("up", "other", ADDRS, "eth0", "r9")  # other groups have their own queue
        await runner.close(grace=5)
        return runner

    with capture_logs() as logs:
        runner = run_clean(scenario())

    ran = log_file.read_text().splitlines()
    assert [line for line in ran if not line.endswith("r9")] == ["up r0", "post_down r3", "up r4"]
    assert "up r9" in ran
    assert runner.counters["dropped"] == 2
    dropped = events(logs, "hook_dropped")
    assert [(e["group"], e["hook"], e["reason"]) for e in dropped] == [
        ("g", "post_up", "r1"),
        ("g", "down", "r2"),
    ]
    assert all(e["log_level"] == "warning" for e in dropped)


# --- close -----------------------------------------------------------------------------------


def test_close_kills_leftovers_and_leaves_no_zombies(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    marker = tmp_path / "marker"
    hang = script(
        tmp_path,
        "hang.sh",
        '[ "$VIPD_GROUP" = quick ] && exec sleep 0.1\n'
        'echo $$ >> "$1.hooks"\nsleep 60 &\necho $! >> "$1.children"\nwait\n',
    )
    never = script(tmp_path, "never.sh", 'echo "$VIPD_GROUP" >> "$1"\n')
    hooks = Hooks(up=(hang, str(pids)), post_up=(never, str(marker)), timeout=30)
    hook_pids, child_pids = Path(f"{pids}.hooks"), Path(f"{pids}.children")

    async def scenario() -> tuple[HookRunner, float, float]:
        runner = HookRunner(hooks, "web1")
        for g in ("g1", "g2", "g3", "quick"):
            runner.fire("up", g, ADDRS, "eth0", "placement")
        for g in ("g1", "g2", "g3"):
            runner.fire("post_up", g, ADDRS, "eth0", "placement")  # queued behind a hang
        await wait_for_file(child_pids, 3)
        start = time.monotonic()
        await runner.close(grace=0.5)
        took = time.monotonic() - start
        assert runner.closed and runner.pending == 0
        start = time.monotonic()
        await runner.close(grace=0.5)  # idempotent, and immediate the second time
        again = time.monotonic() - start
        runner.fire("post_up", "late", ADDRS, "eth0", "placement")  # refused
        await asyncio.sleep(0.1)
        return runner, took, again

    with capture_logs() as logs:
        runner, took, again = run_clean(scenario())

    assert 0.5 <= took < 2.0
    assert again < 0.05
    assert all(reaped(pid) for pid in read_pids(hook_pids)), "a hook was not reaped"
    assert all(gone(pid) for pid in read_pids(child_pids)), "a hook's child survived"
    assert not marker.exists()  # the queued post_up hooks and the late one never ran
    assert runner.counters == {"run": 4, "failed": 3, "timed_out": 0, "dropped": 4}
    killed = events(logs, "hook_failed")
    assert sorted(e["group"] for e in killed) == ["g1", "g2", "g3"]
    assert all(e["rc"] == -signal.SIGKILL and "closing" in e["error"] for e in killed)
    assert [e["group"] for e in events(logs, "hook_done")] == ["quick"]
    dropped = events(logs, "hook_dropped")
    assert sorted((e["group"], e["hook"]) for e in dropped) == [
        ("g1", "post_up"),
        ("g2", "post_up"),
        ("g3", "post_up"),
        ("late", "post_up"),
    ]
