"""Persistent node state: the incarnation number, which must rise on every restart, and the
operator table (moves and drains, `vipd.placement.overrides`), which must survive one.

Without a state directory the incarnation is the start time in milliseconds, which rises as
long as the clock does not step back across a restart. With one, it is also at least one more
than the last persisted value, so a clock stepped back cannot make old heartbeats look new.
"""

from __future__ import annotations

import os
from pathlib import Path

from vipd.errors import StateError
from vipd.placement.overrides import Overrides, OverridesError

FILE = "incarnation"


def next_incarnation(state_dir: Path | None, wall: float) -> int:
    """This run's incarnation: the start time in ms, above the last one recorded in
    `state_dir` (a clock stepped back cannot reuse one). Raises StateError."""
    candidate = int(wall * 1000)
    if state_dir is None:
        return candidate
    path = state_dir / FILE
    try:
        previous = int(path.read_text().strip())
    except (OSError, ValueError):
        previous = 0
    incarnation = max(candidate, previous + 1)
    _write_atomic(path, f"{incarnation}\n")
    return incarnation


OVERRIDES_FILE = "overrides.json"


def load_overrides(state_dir: Path | None) -> Overrides | None:
    """The operator table persisted by `save_overrides`, or None if there is none.
    Raises OverridesError (with the path) if the file is damaged."""
    if state_dir is None:
        return None
    path = state_dir / OVERRIDES_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise OverridesError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise OverridesError(f"{path}: not UTF-8") from None
    try:
        return Overrides.from_json(text)
    except OverridesError as e:
        raise OverridesError(f"{path}: {e}") from None


def save_overrides(state_dir: Path, table: Overrides) -> None:
    """Atomically replace the persisted table (write, fsync, rename). Raises StateError."""
    _write_atomic(state_dir / OVERRIDES_FILE, table.to_json() + "\n")


def _write_atomic(path: Path, text: str) -> None:
    """Write, fsync, rename; a failure is a StateError naming the file and the fix."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as e:
        raise StateError(
            path,
            "node.state_dir",
            f"cannot write ({e.strerror or e})",
            "make the directory writable by vipd (the systemd unit's StateDirectory) or free"
            " space on its file system",
        ) from None
