"""Who may use the control socket, with real processes of other users (needs root to run
them): the socket's mode and group keep others out, SO_PEERCRED tells the daemon who is
calling, mutating commands need root or the admin group, and each is logged with the uid."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from vipd.host.control import Caller, Command, ControlServer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs clients as other users")

NOBODY, NOGROUP = 65534, 65534  # nobody:nogroup, the admin group in these tests
STRANGER = 54321  # a uid/gid with no account and no groups


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vipd-ctl-"))
    d.chmod(0o755)  # others may reach the socket file: its own mode must keep them out
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


async def whoami(request: dict[str, Any], caller: Caller) -> dict[str, int]:
    return {"uid": caller.uid, "gid": caller.gid}


def call_as(uid: int, gid: int, path: Path, cmd: str) -> dict[str, Any]:
    """Connect and send one command from a forked child running as uid:gid (no other
    groups): the daemon sees those credentials through SO_PEERCRED."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to the user, talk, report through the pipe, never return
        code = 0
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
            except PermissionError:
                out = json.dumps({"connect": "EACCES"})
            else:
                s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
                out = s.makefile().readline().strip()
            os.write(write_fd, out.encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        raw = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the client process failed"
    reply: dict[str, Any] = json.loads(raw)
    return reply


def test_socket_mode_and_group_decide_who_connects_and_who_may_mutate(socket_dir: Path) -> None:
    path = socket_dir / "vipd.sock"
    commands = {"status": Command(whoami), "reload": Command(whoami, mutating=True)}

    async def scenario() -> dict[str, dict[str, Any]]:
        srv = ControlServer(path, 0o660, "nogroup", commands)
        await srv.start()
        try:
            st = path.stat()
            assert (st.st_mode & 0o777, st.st_gid) == (0o660, NOGROUP)
            return {
                "admin status": await asyncio.to_thread(call_as, NOBODY, NOGROUP, path, "status"),
                "admin reload": await asyncio.to_thread(call_as, NOBODY, NOGROUP, path, "reload"),
                "stranger": await asyncio.to_thread(call_as, STRANGER, STRANGER, path, "status"),
                "root reload": await asyncio.to_thread(call_as, 0, 0, path, "reload"),
            }
        finally:
            await srv.close()

    with capture_logs() as logs:
        replies = asyncio.run(scenario())
    assert replies["admin status"] == {"ok": True, "result": {"uid": NOBODY, "gid": NOGROUP}}
    assert replies["admin reload"] == {"ok": True, "result": {"uid": NOBODY, "gid": NOGROUP}}
    assert replies["stranger"] == {"connect": "EACCES"}  # mode 0660: others cannot connect
    assert replies["root reload"]["ok"] is True
    mutating = [(e["cmd"], e["uid"]) for e in logs if e["event"] == "control_command"]
    assert mutating == [("reload", NOBODY), ("reload", 0)]


def test_without_an_admin_group_only_root_may_mutate(socket_dir: Path) -> None:
    path = socket_dir / "vipd.sock"
    commands = {"status": Command(whoami), "reload": Command(whoami, mutating=True)}

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        srv = ControlServer(path, 0o666, None, commands)  # (a test-only mode: others connect)
        await srv.start()
        try:
            refused = await asyncio.to_thread(call_as, NOBODY, NOGROUP, path, "reload")
            allowed = await asyncio.to_thread(call_as, NOBODY, NOGROUP, path, "status")
            return refused, allowed
        finally:
            await srv.close()

    with capture_logs() as logs:
        refused, allowed = asyncio.run(scenario())
    assert refused == {"ok": False, "error": "reload needs root or the admin group"}
    assert allowed["ok"] is True
    assert [(e["event"], e["uid"]) for e in logs if e["event"].startswith("control_")] == [
        ("control_refused", NOBODY)
    ]
