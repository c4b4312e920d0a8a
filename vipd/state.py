"""Persistent node state: the incarnation number, which must rise on every restart.

Without a state directory the incarnation is the start time in milliseconds, which rises as
long as the clock does not step back across a restart. With one, it is also at least one more
than the last persisted value, so a clock stepped back cannot make old heartbeats look new.
"""

from __future__ import annotations

import os
from pathlib import Path

FILE = "incarnation"


def next_incarnation(state_dir: Path | None, wall: float) -> int:
    candidate = int(wall * 1000)
    if state_dir is None:
        return candidate
    path = state_dir / FILE
    try:
        previous = int(path.read_text().strip())
    except (OSError, ValueError):
        previous = 0
    incarnation = max(candidate, previous + 1)
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{incarnation}\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
    return incarnation
