"""Local errors: something on this machine is wrong, and the message says where and what to do.

Every one names the file (when there is one), the setting or object (`key`), the problem and
the fix, in one line: ``config error: /etc/vipd/vipd.toml: cluster.interface: interface
'eth9' does not exist; set it to an existing interface``. The daemon refuses to start with
that line on stderr and exit status 2; at run time the same text goes to the log.

Remote input (datagrams, peers' tables) never raises one of these: it is counted as a
rejection (`vipd.counters.Counters.reject`). Operator requests over the control socket that
cannot be carried out are answered with an error reply (`vipd.host.control.RequestError`).
"""

from __future__ import annotations

from pathlib import Path


class VipdError(Exception):
    """Base of vipd's local errors."""

    kind = "error"

    def __init__(self, path: Path | str | None, key: str, problem: str, fix: str) -> None:
        self.path = None if path is None else str(path)
        self.key = key
        self.problem = problem
        self.fix = fix
        super().__init__(problem)

    def describe(self, path: Path | str | None = None) -> str:
        """The one-line report; `path` names the file when the error itself has none."""
        where = self.path if self.path is not None else path
        prefix = f"{self.kind}: " + (f"{where}: " if where is not None else "")
        return f"{prefix}{self.key}: {self.problem}; {self.fix}"

    def __str__(self) -> str:
        return self.describe()


class ConfigError(VipdError):
    """A mistake in the config file (or a file it names, such as the node's key)."""

    kind = "config error"

    def __init__(self, path: Path | str, key: str, problem: str, fix: str) -> None:
        super().__init__(path, key, problem, fix)
        self.args = (str(self),)  # as before the move: repr() shows the whole line


class TransportError(VipdError):
    """The heartbeat socket cannot be set up; `key` is the config setting to look at. Its
    str() is the problem alone (the callers add the config file)."""

    kind = "config error"

    def __init__(self, message: str, key: str, fix: str) -> None:
        super().__init__(None, key, message, fix)

    def __str__(self) -> str:
        return self.problem


class StateError(VipdError, OSError):
    """A file in `node.state_dir` cannot be written (or read back).

    Also an OSError (`filename` is the file, `errno` the cause's when there is one), so code
    that guarded the state files with ``except OSError`` keeps catching it."""

    kind = "state error"

    def __init__(
        self,
        path: Path | str,
        key: str,
        problem: str,
        fix: str,
        errno: int | None = None,
    ) -> None:
        super().__init__(path, key, problem, fix)
        self.errno = errno
        self.strerror = problem
        self.filename = str(path)


class ControlError(VipdError):
    """The control socket cannot be set up as configured (`control.*`)."""

    kind = "config error"
