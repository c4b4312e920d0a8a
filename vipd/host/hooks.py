"""Operator hooks: run the configured command on a group's up / post_up / down / post_down.

The Wackamole / keepalived "notify script", done so that it can never hurt the daemon:

- ``HookRunner.fire()`` only queues work and returns; the processes run in asyncio tasks,
  so a slow or hung hook never blocks heartbeats or claims.
- Events of one group run one at a time, in the order they were fired (a FIFO per group),
  so ``up -> post_up -> down -> post_down`` of a group never overtake each other. Different
  groups run concurrently, at most ``max_concurrent`` processes at once (one semaphore).
- A group's queue holds at most ``max_queued_per_group`` events that have not started; on
  overflow the oldest queued one is dropped (counted, logged). The running one is never
  dropped: a group that flaps faster than its hook runs keeps the newest intent.
- The command runs without a shell, in its own session (``start_new_session``: its own
  process group), stdin from /dev/null, cwd ``/``, with a clean environment: PATH (the
  daemon's, or a default), ``LANG=C`` and the ``VIPD_*`` variables below, nothing else.
- ``Hooks.timeout`` bounds each run: SIGTERM to the whole process group, SIGKILL to the
  group 1 s later if any of it is still alive.
- stdout and stderr go to one pipe; the last 4 KiB are kept for the log.
- ``close(grace)`` stops taking events, lets queued and running hooks finish for ``grace``
  seconds, then kills (SIGKILL, whole process group) and reaps what is left.

Environment of a hook::

    VIPD_EVENT      up | post_up | down | post_down
    VIPD_GROUP      the pool group's name
    VIPD_ADDRESSES  the group's addresses with prefix lengths, space separated
                    ("203.0.113.10/32 2001:db8::10/128")
    VIPD_INTERFACE  the interface the addresses live on
    VIPD_REASON     why (free text from the daemon: placement, failover, leaving, drain, move)
    VIPD_NODE       this node's configured name

A hook that exits 0 but leaves a background process behind (a service it started) is left
alone: the hook is done when its own process exits. Output such a leftover writes after that
is discarded (our end of its stdout pipe is closed, so it may get SIGPIPE: redirect it).

Log events (structlog; the hook's event name is the ``hook`` field, since ``event`` is
structlog's own key): ``hook_done`` (info), ``hook_failed`` / ``hook_timeout`` (error),
``hook_dropped`` (warning). ``counters`` (a ``collections.Counter``): ``run`` (every run
attempted, spawn errors included) = successes + ``failed`` + ``timed_out``; ``dropped``
(queue overflow, or refused / abandoned because the runner is closing).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import shlex
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv6Interface

import structlog

from vipd.config import HOOK_EVENTS, HookCommand, Hooks

log = structlog.get_logger("vipd")

#: PATH for hooks when the daemon itself has none.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: How much of a hook's (merged) output is kept for the log, in bytes: the last part.
OUTPUT_TAIL = 4096
#: After SIGTERM on timeout, how long the process group gets before SIGKILL (seconds).
KILL_AFTER = 1.0
#: After the hook's process exited, how long to wait for EOF on its output pipe (seconds).
#: Only a background process that kept the pipe open makes this wait last.
EOF_WAIT = 0.2
#: In close(), after SIGKILL, how long to wait for the runs to be reaped (seconds). Only a
#: process stuck in the kernel (state D) takes longer than a few milliseconds.
REAP_WAIT = 5.0
#: How often the process group is polled during the KILL_AFTER window (seconds).
_POLL = 0.02


@dataclass(frozen=True)
class _Job:
    """One fired event, with everything the run needs captured at fire() time."""

    event: str
    group: str
    reason: str
    argv: HookCommand
    env: dict[str, str]


class _OutputTail(asyncio.Protocol):
    """Read side of the hook's stdout/stderr pipe: keeps only the last OUTPUT_TAIL bytes."""

    def __init__(self, closed: asyncio.Future[None]) -> None:
        self.data = bytearray()
        self.closed = closed

    def data_received(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > OUTPUT_TAIL:
            del self.data[:-OUTPUT_TAIL]

    def eof_received(self) -> bool | None:
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def text(self) -> str:
        return self.data.decode("utf-8", "replace").strip()


class HookRunner:
    """Runs the operator's hook commands for group events; see the module docstring.

    Create it anywhere; call ``fire()`` from inside the running loop; ``await close()``
    before the loop ends (it is what reaps the processes).
    """

    def __init__(
        self,
        hooks: Hooks,
        node: str,
        *,
        max_concurrent: int = 8,
        max_queued_per_group: int = 16,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, not {max_concurrent}")
        if max_queued_per_group < 1:
            raise ValueError(f"max_queued_per_group must be >= 1, not {max_queued_per_group}")
        self.hooks = hooks
        self.node = node
        self.max_queued_per_group = max_queued_per_group
        self.counters: collections.Counter[str] = collections.Counter(
            {"run": 0, "failed": 0, "timed_out": 0, "dropped": 0}
        )
        self._path = os.environ.get("PATH") or DEFAULT_PATH
        # asyncio.Semaphore binds to the running loop on first use, not here.
        self._slots = asyncio.Semaphore(max_concurrent)
        # Per group: events fired but not started. A group has a queue (and a worker task)
        # exactly while it has work; both are removed together, with no await in between.
        self._queues: dict[str, collections.deque[_Job]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        # Processes currently running, so close() can kill their process groups.
        self._procs: set[asyncio.subprocess.Process] = set()
        self._active = 0  # jobs taken off their queue and not finished (waiting or running)
        self._closed = False  # close() called: fire() refuses
        self._killing = False  # grace is over: nothing new starts, running ones are killed
        self._close_task: asyncio.Task[None] | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> int:
        """Events queued or running, over all groups."""
        return sum(len(q) for q in self._queues.values()) + self._active

    # --- accepting events -----------------------------------------------------------------

    def fire(
        self,
        event: str,
        group: str,
        addresses: Sequence[IPv4Interface | IPv6Interface],
        interface: str,
        reason: str,
    ) -> None:
        """Queue the hook for ``event`` of ``group`` and return at once.

        A no-op when no command is configured for the event. Raises ValueError only for an
        event name that is not one of HOOK_EVENTS (a bug in the caller); a failing hook is
        logged and counted, never raised. Must be called from inside the running loop.
        """
        if event not in HOOK_EVENTS:
            raise ValueError(f"unknown hook event {event!r}; expected one of {HOOK_EVENTS}")
        argv = self.hooks.command(event)
        if argv is None:
            return
        env = {
            "PATH": self._path,
            "LANG": "C",
            "VIPD_EVENT": event,
            "VIPD_GROUP": group,
            "VIPD_ADDRESSES": " ".join(str(a) for a in addresses),
            "VIPD_INTERFACE": interface,
            "VIPD_REASON": reason,
            "VIPD_NODE": self.node,
        }
        job = _Job(event=event, group=group, reason=reason, argv=argv, env=env)
        if self._closed:
            self._drop(job, "runner closed")
            return
        loop = asyncio.get_running_loop()
        queue = self._queues.setdefault(group, collections.deque())
        queue.append(job)
        while len(queue) > self.max_queued_per_group:
            self._drop(queue.popleft(), "queue full")
        if group not in self._workers:
            self._workers[group] = loop.create_task(self._drain(group), name=f"hooks:{group}")

    def _drop(self, job: _Job, why: str) -> None:
        self.counters["dropped"] += 1
        log.warning(
            "hook_dropped",
            hook=job.event,
            group=job.group,
            reason=job.reason,
            why=why,
            queued=len(self._queues.get(job.group, ())),
        )

    # --- running them ---------------------------------------------------------------------

    async def _drain(self, group: str) -> None:
        """The group's worker: runs its queued events one after the other, then exits."""
        queue = self._queues[group]
        try:
            while queue:
                job = queue.popleft()
                self._active += 1
                try:
                    await self._run(job)
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug here must not stop the group's later hooks
                    log.exception("hook_runner_error", hook=job.event, group=group)
                finally:
                    self._active -= 1
        finally:
            # Reached with the queue empty (or on cancellation) and no await since the last
            # check, so fire() either appended before it (and it ran) or starts a new worker.
            del self._queues[group]
            del self._workers[group]

    async def _run(self, job: _Job) -> None:
        async with self._slots:
            if self._killing:
                self._drop(job, "runner closed")
                return
            self.counters["run"] += 1
            await self._run_process(job)

    async def _run_process(self, job: _Job) -> None:
        loop = asyncio.get_running_loop()
        command = shlex.join(job.argv)
        started = loop.time()
        # Our own pipe rather than stdout=PIPE: when the hook exits but a background child
        # keeps the write end open, we can stop reading and close our end ourselves, and
        # the process transport still finishes (and closes) as soon as the hook exits.
        # os.pipe() fds are close-on-exec, so concurrent hooks never inherit each other's.
        read_fd, write_fd = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                job.argv[0],
                *job.argv[1:],
                stdin=subprocess.DEVNULL,
                stdout=write_fd,
                stderr=subprocess.STDOUT,
                env=job.env,
                cwd="/",
                start_new_session=True,
            )
        except asyncio.CancelledError:
            os.close(read_fd)
            raise
        except Exception as e:  # ENOENT, EACCES, ENOEXEC, NUL in an argument...
            os.close(read_fd)
            self.counters["failed"] += 1
            log.error(
                "hook_failed",
                hook=job.event,
                group=job.group,
                reason=job.reason,
                command=command,
                error=_describe(e),
            )
            return
        finally:
            os.close(write_fd)  # the child has its copy; EOF comes when it (and kin) exit

        self._procs.add(proc)
        closed: asyncio.Future[None] = loop.create_future()
        tail = _OutputTail(closed)
        reader: asyncio.ReadTransport | None = None
        timed_out = False
        try:
            pipe = os.fdopen(read_fd, "rb", buffering=0)  # owns read_fd from here on
            try:
                reader, _ = await loop.connect_read_pipe(lambda: tail, pipe)
            except Exception:
                pipe.close()  # output is lost, the run goes on
                log.exception("hook_output_unavailable", hook=job.event, group=job.group)
            try:
                rc = await asyncio.wait_for(proc.wait(), self.hooks.timeout)
            except TimeoutError:
                timed_out = True
                rc = await self._terminate(proc)
            # Normally EOF arrived with the exit; don't wait long for a leftover child's.
            await asyncio.wait([closed], timeout=EOF_WAIT)
        finally:
            if reader is not None:
                reader.close()
            if proc.returncode is None:  # cancelled (the loop is going away): don't leak it
                _signal_group(proc.pid, signal.SIGKILL)
            self._procs.discard(proc)

        duration = round(loop.time() - started, 3)
        fields = {
            "hook": job.event,
            "group": job.group,
            "reason": job.reason,
            "rc": rc,
            "duration": duration,
        }
        if timed_out:
            self.counters["timed_out"] += 1
            log.error(
                "hook_timeout",
                **fields,
                command=command,
                timeout=self.hooks.timeout,
                output=tail.text(),
            )
        elif rc != 0:
            self.counters["failed"] += 1
            extra = {"error": "killed: hook runner closing"} if self._killing and rc < 0 else {}
            log.error("hook_failed", **fields, command=command, output=tail.text(), **extra)
        else:
            log.info("hook_done", **fields)

    async def _terminate(self, proc: asyncio.subprocess.Process) -> int:
        """Timeout: SIGTERM the process group, SIGKILL it after KILL_AFTER if any of it is
        still alive (the hook itself or anything it started), return the hook's status."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + KILL_AFTER
        _signal_group(proc.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), KILL_AFTER)
        # The hook has exited (or ignored SIGTERM); its children may still be winding down.
        while loop.time() < deadline and _group_alive(proc.pid):
            await asyncio.sleep(_POLL)
        if _group_alive(proc.pid):
            _signal_group(proc.pid, signal.SIGKILL)
        return await proc.wait()

    # --- shutdown -------------------------------------------------------------------------

    async def close(self, grace: float) -> None:
        """Stop accepting events, give queued and running hooks ``grace`` seconds, then kill
        the rest (SIGKILL to their process groups; queued ones are dropped) and reap them.

        Idempotent: later (or concurrent) calls wait for the first one to finish.
        """
        if self._close_task is None:
            self._closed = True
            self._close_task = asyncio.get_running_loop().create_task(
                self._shutdown(max(0.0, grace)), name="hooks:close"
            )
        # Shielded: a caller giving up waiting does not abort the shutdown for the others.
        await asyncio.shield(self._close_task)

    async def _shutdown(self, grace: float) -> None:
        workers = set(self._workers.values())
        if workers:
            await asyncio.wait(workers, timeout=grace)
        self._killing = True
        for queue in self._queues.values():
            while queue:
                self._drop(queue.popleft(), "runner closed")
        for proc in list(self._procs):
            _signal_group(proc.pid, signal.SIGKILL)
        workers = set(self._workers.values())
        if not workers:
            return
        # The workers see their processes exit, log them and finish.
        _, stuck = await asyncio.wait(workers, timeout=REAP_WAIT)
        if stuck:
            log.error(
                "hooks_not_reaped",
                groups=sorted(t.get_name().removeprefix("hooks:") for t in stuck),
                pids=sorted(p.pid for p in self._procs),
            )
            for task in stuck:
                task.cancel()
            await asyncio.wait(stuck)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    """Signal a hook's process group (its pgid is the hook's pid: start_new_session)."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # all gone already
    except OSError as e:  # EPERM: it became someone else (a setuid program we may not signal)
        log.warning("hook_signal_failed", pgid=pgid, signal=sig.name, error=_describe(e))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, but not ours to signal
    return True


def _describe(e: BaseException) -> str:
    """'ENOENT: No such file or directory' for OS errors, 'Type: message' otherwise."""
    if isinstance(e, OSError) and e.errno is not None:
        code = errno.errorcode.get(e.errno, f"errno {e.errno}")
        return f"{code}: {os.strerror(e.errno)}"
    return f"{type(e).__name__}: {e}"
