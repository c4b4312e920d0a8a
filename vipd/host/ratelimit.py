"""Log a recurring event at most once per interval per key, with the count it stood for."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class RateLimitedLog:
    def __init__(
        self, logger: Any, interval: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def _emit(self, level: str, event: str, key: str, fields: dict[str, Any]) -> None:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            fields["suppressed_since_last"] = suppressed
        getattr(self._log, level)(event, **fields)

    def warning(self, event: str, *, key: str, **fields: Any) -> None:
        self._emit("warning", event, key, fields)

    def error(self, event: str, *, key: str, **fields: Any) -> None:
        self._emit("error", event, key, fields)
