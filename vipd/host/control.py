"""The control socket: a Unix stream socket speaking one JSON object per line each way.

Request ``{"cmd": NAME, ...}`` -> ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": ...}``.
The caller's uid/gid come from SO_PEERCRED; commands marked mutating are refused unless the
caller is root or in the configured admin group. Malformed, oversized or slow requests get an
error reply (or are dropped) and never block or crash the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from vipd.errors import ControlError

MAX_REQUEST = 64 * 1024
READ_TIMEOUT = 5.0

log = structlog.get_logger("vipd.control")


@dataclass(frozen=True)
class Caller:
    pid: int
    uid: int
    gid: int


Handler = Callable[[dict[str, Any], Caller], Awaitable[Any]]


@dataclass(frozen=True)
class Command:
    handler: Handler
    mutating: bool = False


class RequestError(Exception):
    """A request the daemon refuses; the message goes back to the caller."""


def peer_credentials(sock: socket.socket) -> Caller:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Caller(pid, uid, gid)


class ControlServer:
    def __init__(
        self, path: Path, mode: int, group: str | None, commands: dict[str, Command]
    ) -> None:
        self.path = path
        self.mode = mode
        self.group = group
        self.commands = commands
        self._admin_gid: int | None = None
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen on the socket; a setup that cannot work is a ControlError (key and fix)."""
        if self.group is not None:
            self._admin_gid = resolve_group(self.group)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(self.path.lstat().st_mode):
                    self.path.unlink()  # a previous run's; the systemd unit ensures one daemon
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_REQUEST
            )
            os.chmod(self.path, self.mode)
        except OSError as e:
            raise ControlError(
                None,
                "control.socket",
                f"cannot listen on {self.path} ({e.strerror or e})",
                "choose a path in a directory vipd can write (short: at most 107 bytes)",
            ) from None
        if self._admin_gid is not None:
            try:
                os.chown(self.path, -1, self._admin_gid)
            except OSError as e:
                raise ControlError(
                    None,
                    "control.group",
                    f"cannot give {self.path} to group {self.group!r} ({e.strerror or e})",
                    f"add vipd's user to group {self.group!r} (SupplementaryGroups= in the"
                    " unit), or remove control.group",
                ) from None

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def allowed(self, caller: Caller) -> bool:
        if caller.uid == 0:
            return True
        if self._admin_gid is None:
            return False
        if caller.gid == self._admin_gid:
            return True
        try:
            user_groups = os.getgrouplist(_username(caller.uid), caller.gid)
        except (KeyError, OSError):
            return False
        return self._admin_gid in user_groups

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            caller = peer_credentials(writer.get_extra_info("socket"))
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
                except (TimeoutError, asyncio.LimitOverrunError, ValueError):
                    await _reply(writer, {"ok": False, "error": "request too large or too slow"})
                    return
                if not line:
                    return
                reply = await self.handle_line(line, caller)
                await _reply(writer, reply)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def handle_line(self, line: bytes, caller: Caller) -> dict[str, Any]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                raise RequestError('a request is a JSON object with a "cmd" string')
            name = request["cmd"]
            command = self.commands.get(name)
            if command is None:
                raise RequestError(
                    f"unknown command {name!r}; known: {', '.join(sorted(self.commands))}"
                )
            if command.mutating:
                # The group lookup may ask a slow name service (LDAP...): not on the loop.
                if not await asyncio.to_thread(self.allowed, caller):
                    log.warning("control_refused", cmd=name, uid=caller.uid, pid=caller.pid)
                    raise RequestError(f"{name} needs root or the admin group")
                log.info("control_command", cmd=name, uid=caller.uid, pid=caller.pid)
            return {"ok": True, "result": await command.handler(request, caller)}
        except (ValueError, RequestError) as e:  # JSONDecodeError is a ValueError
            return {"ok": False, "error": str(e)}
        except RecursionError:  # json.loads on a line of a thousand "["
            return {"ok": False, "error": "request nested too deeply"}
        except Exception as e:  # a bug: vipctl gets an answer, the daemon keeps serving
            log.exception("internal_error", where="control", cmd=_cmd_of(line))
            return {"ok": False, "error": f"internal error ({type(e).__name__}): see the log"}


def _cmd_of(line: bytes) -> str:
    """The command a request named, for the log (never raises)."""
    try:
        request = json.loads(line)
    except (ValueError, RecursionError):
        return "?"
    cmd = request.get("cmd") if isinstance(request, dict) else None
    return cmd if isinstance(cmd, str) else "?"


def resolve_group(name: str) -> int:
    """The gid of `control.group`, if this process may give the socket to it: the group
    exists, and we are root or a member (chown to any other group is EPERM). Else a
    ControlError with the fix."""
    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        raise ControlError(
            None,
            "control.group",
            f"group {name!r} does not exist",
            f"create it (groupadd {name}) or remove control.group",
        ) from None
    if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        raise ControlError(
            None,
            "control.group",
            f"this user (uid {os.geteuid()}) is not in group {name!r}, so it cannot give"
            " the control socket to it",
            f"add it to the group (usermod -aG {name} USER, or SupplementaryGroups={name} in"
            " the systemd unit), or remove control.group",
        )
    return gid


async def _reply(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
    await writer.drain()


def _username(uid: int) -> str:
    import pwd

    return pwd.getpwuid(uid).pw_name


def request(path: Path, payload: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Client side (vipctl): send one request, return the decoded reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps(payload).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    reply: dict[str, Any] = json.loads(buf)
    return reply
