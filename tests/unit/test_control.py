"""The control protocol: errors are replies, mutating commands need root or the admin group."""

from __future__ import annotations

import asyncio
import json
import os
import struct
from pathlib import Path
from typing import Any

from vipd.host.control import Caller, Command, ControlServer, request

ROOT = Caller(pid=1, uid=0, gid=0)
USER = Caller(pid=2, uid=12345, gid=12345)


async def echo(req: dict[str, Any], caller: Caller) -> dict[str, Any]:
    return {"uid": caller.uid}


def server(path: Path) -> ControlServer:
    return ControlServer(
        path, 0o660, None, {"status": Command(echo), "move": Command(echo, mutating=True)}
    )


def handle(line: bytes, caller: Caller = ROOT) -> dict[str, Any]:
    return asyncio.run(server(Path("/nonexistent")).handle_line(line, caller))


def test_malformed_requests_get_error_replies() -> None:
    assert handle(b"not json")["ok"] is False
    assert "JSON object" in handle(b"[1,2]")["error"]
    assert "unknown command 'nope'" in handle(b'{"cmd": "nope"}')["error"]
    assert handle(b'{"cmd": 5}')["ok"] is False
    assert handle(b"\xff\xfe")["ok"] is False


def test_mutating_commands_need_root_or_admin_group() -> None:
    assert handle(b'{"cmd": "move"}', USER) == {
        "ok": False,
        "error": "move needs root or the admin group",
    }
    assert handle(b'{"cmd": "move"}', ROOT) == {"ok": True, "result": {"uid": 0}}
    assert handle(b'{"cmd": "status"}', USER)["ok"] is True


def test_real_socket_round_trip_and_oversized_request(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"

    async def scenario() -> tuple[dict[str, Any], bytes, dict[str, Any]]:
        srv = server(path)
        await srv.start()
        assert (path.stat().st_mode & 0o777) == 0o660
        ok = await asyncio.to_thread(request, path, {"cmd": "status"})
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"x" * (200 * 1024) + b"\n")
        await writer.drain()
        big = await reader.readline()
        writer.close()
        again = await asyncio.to_thread(request, path, {"cmd": "status"})
        await srv.close()
        return ok, big, again

    ok, big, again = asyncio.run(scenario())
    assert ok == {"ok": True, "result": {"uid": os.geteuid()}}
    assert json.loads(big)["ok"] is False
    assert again["ok"] is True  # the server survived the oversized request
    assert not path.exists()


def test_a_command_that_fails_unexpectedly_is_an_error_reply_not_a_dropped_connection() -> None:
    """Issue 11 item 2: a struct.error escaped the handler, and vipctl crashed on the empty
    reply. Whatever a handler raises, the caller gets an answer and the server goes on."""

    async def broken(req: dict[str, Any], caller: Caller) -> dict[str, Any]:
        raise struct.error("argument out of range")

    srv = ControlServer(Path("/nonexistent"), 0o660, None, {"move": Command(broken, True)})
    reply = asyncio.run(srv.handle_line(b'{"cmd": "move"}', ROOT))
    assert reply == {"ok": False, "error": "internal error (error): see the log"}
    assert asyncio.run(srv.handle_line(b'{"cmd": "nope"}', ROOT))["ok"] is False
