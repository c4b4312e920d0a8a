"""Persistent node state: the incarnation number, which must rise on every restart, the
operator table (moves and drains, `vipd.placement.overrides`), which must survive one, and
what each peer last sent us, which the next run's replay check starts from.

Without a state directory the incarnation is the start time in milliseconds, which rises as
long as the clock does not step back across a restart. With one, it is also at least one more
than the last persisted value, so a clock stepped back cannot make old heartbeats look new.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from vipd.errors import StateError
from vipd.placement.overrides import Overrides, OverridesError

FILE = "incarnation"
MAX_INCARNATION = 2**63  # far beyond any clock in ms, and one more still fits a u64


def next_incarnation(state_dir: Path | None, wall: float) -> int:
    """This run's incarnation: the start time in ms, above the last one recorded in
    `state_dir` (a clock stepped back cannot reuse one). Raises StateError."""
    candidate = int(wall * 1000)
    if state_dir is None:
        return candidate
    incarnation = max(candidate, _recorded(state_dir) + 1)
    _write_atomic(state_dir / FILE, f"{incarnation}\n")
    return incarnation


def record_incarnation(state_dir: Path, incarnation: int) -> None:
    """Raise the recorded incarnation to `incarnation` (a run that re-incarnated), never
    lower it. Raises StateError."""
    if _recorded(state_dir) < incarnation < MAX_INCARNATION:
        _write_atomic(state_dir / FILE, f"{incarnation}\n")


def _recorded(state_dir: Path) -> int:
    """The incarnation in `state_dir`; 0 if there is none, or it is unreadable or damaged
    (at or past MAX_INCARNATION one more would not fit the wire's u64: a crash loop)."""
    try:
        previous = int((state_dir / FILE).read_text().strip())
    except (OSError, ValueError):
        return 0
    return previous if 0 <= previous < MAX_INCARNATION else 0


OVERRIDES_FILE = "overrides.json"
STATE_SETTING = "node.state_dir"
_DAMAGED_FIX = "restore a good copy or remove it, then repeat the moves and drains with vipctl"


class OverridesFileError(StateError, OverridesError):
    """The persisted operator table cannot be read or is damaged: a StateError (path, key,
    fix) that is also the OverridesError the daemon catches to start with no overrides."""


def load_overrides(state_dir: Path | None) -> Overrides | None:
    """The operator table persisted by `save_overrides`, or None if there is none.
    Raises OverridesFileError (an OverridesError with the path and fix) if the file cannot
    be read or is damaged."""
    if state_dir is None:
        return None
    path = state_dir / OVERRIDES_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise OverridesFileError(
            path,
            STATE_SETTING,
            f"cannot read ({e.strerror or e})",
            "make it readable by vipd (the systemd unit's StateDirectory)",
            e.errno,
        ) from None
    except UnicodeDecodeError:
        raise OverridesFileError(path, STATE_SETTING, "not UTF-8", _DAMAGED_FIX) from None
    try:
        return Overrides.from_json(text)
    except OverridesError as e:
        raise OverridesFileError(path, STATE_SETTING, str(e), _DAMAGED_FIX) from None


def save_overrides(state_dir: Path, table: Overrides) -> None:
    """Atomically replace the persisted table (write, fsync, rename). Raises StateError."""
    _write_atomic(state_dir / OVERRIDES_FILE, table.to_json() + "\n")


SEEN_FILE = "peers-seen.json"


def load_seen(state_dir: Path | None) -> dict[str, tuple[int, int]]:
    """The newest (incarnation, send time in ms) heard from each peer by an earlier run
    (`save_seen`): what a capture must be newer than. Missing or damaged: empty, because a
    damaged file must not keep the node from starting (it loses only this protection)."""
    if state_dir is None:
        return {}
    try:
        raw = json.loads((state_dir / SEEN_FILE).read_text(encoding="utf-8"))
        return {
            str(name): (int(inc), int(sent))
            for name, (inc, sent) in raw.items()
            if 0 <= int(inc) < 2**64 and 0 <= int(sent) < 2**64
        }
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def save_seen(state_dir: Path, seen: Mapping[str, tuple[int, int]]) -> None:
    """Atomically replace the record of what each peer last sent us. Raises StateError."""
    text = json.dumps({name: list(v) for name, v in sorted(seen.items())})
    _write_atomic(state_dir / SEEN_FILE, text + "\n")


def _write_atomic(path: Path, text: str) -> None:
    """Write, fsync, rename; a failure is a StateError naming the file and the fix."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
        # The rename itself is durable only once the directory is synced.
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise StateError(
            path,
            STATE_SETTING,
            f"cannot write ({e.strerror or e})",
            "make the directory writable by vipd (the systemd unit's StateDirectory) or free"
            " space on its file system",
            e.errno,
        ) from None
