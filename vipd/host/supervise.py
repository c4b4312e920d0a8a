"""Supervision of the daemon's tasks and callbacks: nothing that fails is lost silently.

An exception in a background task (netlink job, periodic loop, disk writer) or in a loop
callback (a datagram batch, a timer) is logged once per interval with its traceback and
reported through `on_failure` (the node counts it as `task_failures`). A periodic step that
raises is tried again at its next tick, so one bad tick never ends the loop that claims,
reconciles or publishes the figures.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from vipd.host.ratelimit import RateLimitedLog


class Supervisor:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        log: RateLimitedLog,
        on_failure: Callable[[str], None],
    ) -> None:
        self.loop = loop
        self._log = log
        self._on_failure = on_failure
        # One daemon per loop in production: every callback error of the loop is ours.
        loop.set_exception_handler(self._loop_error)

    def failed(self, where: str, error: BaseException) -> None:
        self._log.error(
            "internal_error", key=f"internal {where}", task=where, error=repr(error), exc_info=error
        )
        self._on_failure(where)

    def spawn(self, job: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A task whose exception (if it ends in one) is reported, never dropped."""
        task = self.loop.create_task(job, name=name)
        task.add_done_callback(self._task_done)
        return task

    def guard(self, name: str, step: Callable[[], None]) -> None:
        """Run `step`; an exception is reported and goes no further."""
        try:
            step()
        except Exception as e:
            self.failed(name, e)

    async def periodic(
        self, name: str, interval: Callable[[], float], step: Callable[[], None], *, now: bool
    ) -> None:
        """`step` every `interval()` seconds (the first at once if `now`) until cancelled."""
        if not now:
            await asyncio.sleep(interval())
        while True:
            self.guard(name, step)
            await asyncio.sleep(interval())

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (error := task.exception()) is not None:
            self.failed(task.get_name(), error)

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if isinstance(error, BaseException):
            self.failed("callback", error)
        else:  # asyncio's own complaints (e.g. a task destroyed while pending)
            self._log.error("internal_error", key="internal loop", error=context.get("message"))
