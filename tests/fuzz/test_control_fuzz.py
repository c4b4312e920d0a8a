"""Fuzzing the control protocol: handle_line on anything, and the socket under abuse.

Properties: handle_line answers every line with {"ok": true, "result": ...} or
{"ok": false, "error": str}, never raises, runs the mutating command only for a privileged
caller; over the socket every line gets exactly one reply, oversized, silent and slow clients
are dropped without holding up anyone else, and garbage leaves no file descriptor or task
behind. Unix sockets in a temporary directory only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz import kit
from tests.fuzz.kit import ROOT, USER, ControlHarness, FakeCommands, check_reply, fuzz_settings
from vipd.host import control

CORPUS = kit.corpus("control")
INDEX = kit.corpus_index("control")
STATUS = b'{"cmd":"status"}\n'


@pytest.fixture(scope="module")
def harness() -> Iterator[ControlHarness]:
    """handle_line checks on one event loop for the module (module-scoped, so hypothesis can
    share it between examples)."""
    h = ControlHarness()
    yield h
    h.close()


# --- handle_line -----------------------------------------------------------------------------

JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
JSON = st.recursive(
    JSON_LEAVES,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)
ENCODINGS = st.sampled_from(("utf-8", "utf-8", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32"))


def dump(value: Any, ascii_only: bool, encoding: str) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode(encoding, errors="surrogatepass")


@given(line=st.binary(max_size=4096))
@fuzz_settings(1500)
def test_arbitrary_bytes(harness: ControlHarness, line: bytes) -> None:
    harness(line)


@given(value=JSON, ascii_only=st.booleans(), encoding=ENCODINGS, newline=st.booleans())
@fuzz_settings(600)
def test_arbitrary_json_values(
    harness: ControlHarness, value: Any, ascii_only: bool, encoding: str, newline: bool
) -> None:
    harness(dump(value, ascii_only, encoding) + (b"\n" if newline else b""))


@given(
    cmd=st.sampled_from(["status", "move", "", "STATUS", "status ", "mov"])
    | st.text(max_size=20)
    | JSON,
    extra=st.dictionaries(st.text(max_size=10), JSON, max_size=6),
    cmd_first=st.booleans(),
)
@fuzz_settings(400)
def test_requests_with_random_cmd_and_extra_keys(
    harness: ControlHarness, cmd: Any, extra: dict[str, Any], cmd_first: bool
) -> None:
    extra.pop("cmd", None)
    request = {"cmd": cmd, **extra} if cmd_first else {**extra, "cmd": cmd}
    harness(json.dumps(request).encode())


@given(
    openers=st.lists(st.sampled_from(["[", '{"k":', '{"cmd":"status","x":']), max_size=300),
    close=st.booleans(),
    wrap=st.booleans(),
)
@fuzz_settings(300)
def test_nesting_below_the_recursion_limit(
    harness: ControlHarness, openers: list[str], close: bool, wrap: bool
) -> None:
    """Nested up to 300 deep (deeper is a known bug: see the deep-* corpus entries)."""
    closers = "".join("]" if o == "[" else "}" for o in reversed(openers)) if close else ""
    text = "".join(openers) + ("0" if close else "") + closers
    if wrap:
        text = '{"cmd":"status","x":' + text + "}"
    harness(text.encode())


@given(
    digits=st.integers(1, 10_000),
    exponent=st.none() | st.integers(-(10**6), 10**6),
    sign=st.sampled_from(["", "-"]),
    where=st.sampled_from(["bare", "value", "cmd"]),
)
@fuzz_settings(200)
def test_huge_numbers(
    harness: ControlHarness, digits: int, exponent: int | None, sign: str, where: str
) -> None:
    number = sign + "9" * digits + (f"e{exponent}" if exponent is not None else "")
    line = {
        "bare": number,
        "value": '{"cmd":"status","n":' + number + "}",
        "cmd": '{"cmd":' + number + "}",
    }[where]
    harness(line.encode())


@given(
    value=JSON,
    bad=st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\xf4\x90\x80\x80"]),
    at=st.integers(0, 10_000),
)
@fuzz_settings(300)
def test_invalid_utf8(harness: ControlHarness, value: Any, bad: bytes, at: int) -> None:
    line = json.dumps({"cmd": "status", "v": value}, ensure_ascii=False).encode()
    at %= len(line) + 1
    harness(line[:at] + bad + line[at:])


def test_the_mutating_command_never_runs_for_a_user() -> None:
    harness = ControlHarness()
    try:
        for line in (b'{"cmd":"move"}', b'{"cmd":"status","cmd":"move"}', b'{"cmd":"move","x":1}'):
            reply = harness.loop.run_until_complete(harness.server.handle_line(line, USER))
            assert reply["ok"] is False and "move" in reply["error"]
            reply = harness.loop.run_until_complete(harness.server.handle_line(line, ROOT))
            assert reply == {"ok": True, "result": "moved"}
        assert harness.fake.moved_by == [ROOT] * 3
    finally:
        harness.close()


def _corpus_params() -> list[Any]:
    params = []
    for name, entry in sorted(INDEX.items()):
        marks = (
            [pytest.mark.xfail(strict=True, reason=f"BUG: {entry['bug']}")]
            if "bug" in entry
            else []
        )
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.mark.parametrize("name", _corpus_params())
def test_corpus_entry(name: str) -> None:
    """Each saved line gets the answer its index entry records; entries with a "bug" are
    strict xfails that record the correct answer."""
    entry, line = INDEX[name], CORPUS[name]
    fake = FakeCommands()
    server = kit.control_server(Path("/nonexistent/ctl.sock"), fake)

    async def both() -> tuple[dict[str, Any], dict[str, Any]]:
        return await server.handle_line(line, ROOT), await server.handle_line(line, USER)

    root, user = asyncio.run(both())
    assert (check_reply(root), check_reply(user)) == (entry["root"], entry["user"])


# --- the socket ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(path: Path) -> AsyncIterator[FakeCommands]:
    fake = FakeCommands()
    server = kit.control_server(path, fake)
    await server.start()
    try:
        yield fake
    finally:
        await server.close()


async def converse(
    path: Path, payload: bytes, *, half_close: bool = True, timeout: float = 5.0
) -> tuple[list[dict[str, Any]], float]:
    """Send payload (then EOF), read until the server closes; replies and seconds taken."""
    started = time.monotonic()
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(payload)
            await writer.drain()
            if half_close:
                writer.write_eof()
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    replies = [json.loads(line) for line in raw.splitlines()]
    for reply in replies:
        check_reply(reply)
    return replies, time.monotonic() - started


async def status_ok(path: Path) -> bool:
    replies, _ = await converse(path, STATUS)
    return replies == [{"ok": True, "result": {"uid": os.geteuid(), "keys": ["cmd"]}}]


@pytest.fixture()
def sock(tmp_path: Path) -> Path:
    return tmp_path / "ctl.sock"


def test_line_limit_is_max_request_bytes(sock: Path) -> None:
    async def scenario() -> list[list[dict[str, Any]]]:
        async with serving(sock):
            out = []
            for size in (control.MAX_REQUEST, control.MAX_REQUEST + 1):
                replies, _ = await converse(sock, STATUS[:-1].ljust(size, b" ") + b"\n")
                out.append(replies)
            return out

    at_limit, over = asyncio.run(scenario())
    assert at_limit[0]["ok"] is True
    assert over == [{"ok": False, "error": "request too large or too slow"}]


def test_oversized_line_is_refused_and_others_are_served(sock: Path) -> None:
    """A client sending more than MAX_REQUEST bytes (newline or not, connection kept open) is
    answered at once with an error and dropped; a client connected before and one connected
    after are served."""

    async def scenario() -> tuple[list[dict[str, Any]], float, list[dict[str, Any]], bool]:
        async with serving(sock):
            early_reader, early_writer = await asyncio.open_unix_connection(str(sock))
            replies, took = await converse(
                sock, b"x" * (control.MAX_REQUEST + 100), half_close=False
            )
            early_writer.write(STATUS)
            early_writer.write_eof()
            early = [json.loads(line) for line in (await early_reader.read()).splitlines()]
            early_writer.close()
            return replies, took, early, await status_ok(sock)

    replies, took, early, after = asyncio.run(scenario())
    assert replies == [{"ok": False, "error": "request too large or too slow"}]
    assert took < control.READ_TIMEOUT / 2  # refused when the limit is hit, not at timeout
    assert early[0]["ok"] is True and after


def test_silent_client_is_dropped_after_read_timeout(
    sock: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "READ_TIMEOUT", 0.2)

    async def scenario() -> tuple[list[dict[str, Any]], float, list[float]]:
        async with serving(sock):
            silent = asyncio.create_task(converse(sock, b"", half_close=False))
            others = []
            for _ in range(5):  # served while the silent one still holds its connection
                started = time.monotonic()
                assert await status_ok(sock)
                others.append(time.monotonic() - started)
            assert not silent.done()
            replies, took = await silent
            return replies, took, others

    replies, took, others = asyncio.run(scenario())
    assert replies == [{"ok": False, "error": "request too large or too slow"}]
    assert 0.2 <= took < 2.0
    assert max(others) < 0.2


def test_dribbling_client_is_dropped_after_read_timeout(
    sock: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One byte every 50 ms and never a newline: the timeout bounds the whole line, so the
    trickle does not keep the connection alive."""
    monkeypatch.setattr(control, "READ_TIMEOUT", 0.2)

    async def scenario() -> tuple[bytes, float]:
        async with serving(sock):
            reader, writer = await asyncio.open_unix_connection(str(sock))
            started = time.monotonic()

            async def dribble() -> None:
                with contextlib.suppress(ConnectionError):
                    for _ in range(100):
                        writer.write(b" ")
                        await writer.drain()
                        await asyncio.sleep(0.05)

            task = asyncio.create_task(dribble())
            raw = await asyncio.wait_for(reader.read(), 5.0)
            took = time.monotonic() - started
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            writer.close()
            return raw, took

    raw, took = asyncio.run(scenario())
    assert json.loads(raw) == {"ok": False, "error": "request too large or too slow"}
    assert 0.2 <= took < 1.0


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_garbage_connections_leave_the_server_serving(
    sock: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 connections of garbage in a row (random bytes, many lines at once, oversized,
    half a line then EOF, closed at once, aborted mid-line). Every complete or EOF-ended line
    gets exactly one well-formed reply; afterwards the server serves, and no file descriptor
    or connection task is left behind."""
    monkeypatch.setattr(control, "READ_TIMEOUT", 0.5)
    rng = random.Random(5)

    def garbage(kind: int) -> bytes:
        if kind == 0:
            return rng.randbytes(rng.randint(0, 2000)) + b"\n"
        if kind == 1:
            return rng.randbytes(rng.randint(1, 2000)).replace(b"\n", b"")
        if kind == 2:
            lines = [rng.choice([STATUS[:-1], b"[]", b"{", rng.randbytes(20)]) for _ in range(8)]
            return b"\n".join(line.replace(b"\n", b"") for line in lines) + b"\n"
        return json.dumps({"cmd": rng.choice(["status", "move", "x"]), "v": "é" * 50}).encode()

    async def scenario() -> tuple[int, int, int, bool]:
        async with serving(sock):
            await asyncio.sleep(0)
            fds, tasks = _open_fds(), len(asyncio.all_tasks())
            replies = 0
            for i in range(200):
                kind = i % 6
                if kind == 4:  # connect, close at once
                    _, writer = await asyncio.open_unix_connection(str(sock))
                    writer.close()
                    continue
                if kind == 5:  # half a line, then a reset
                    _, writer = await asyncio.open_unix_connection(str(sock))
                    writer.write(b'{"cmd": "sta')
                    await writer.drain()
                    writer.transport.abort()
                    continue
                payload = garbage(kind) if i % 50 else b"x" * (control.MAX_REQUEST + 1)
                got, _ = await converse(sock, payload)
                if len(payload) > control.MAX_REQUEST:
                    assert len(got) == 1 and got[0]["ok"] is False
                else:
                    tail = 1 if payload and not payload.endswith(b"\n") else 0
                    assert len(got) == payload.count(b"\n") + tail, payload[:100]
                replies += len(got)
            ok = await status_ok(sock)
            for _ in range(50):  # let the server finish closing what the clients dropped
                if _open_fds() <= fds and len(asyncio.all_tasks()) <= tasks:
                    break
                await asyncio.sleep(0.02)
            return replies, _open_fds() - fds, len(asyncio.all_tasks()) - tasks, ok

    replies, extra_fds, extra_tasks, ok = asyncio.run(scenario())
    assert ok
    assert replies > 200
    assert extra_fds <= 0 and extra_tasks <= 0


def test_server_survives_deep_nesting(sock: Path) -> None:
    async def scenario() -> bool:
        async with serving(sock):
            await converse(sock, b"[" * 2000 + b"\n")
            return await status_ok(sock)

    assert asyncio.run(scenario())


def test_deep_nesting_gets_an_error_reply_over_the_socket(sock: Path) -> None:
    async def scenario() -> list[dict[str, Any]]:
        async with serving(sock):
            replies, _ = await converse(sock, b"[" * 2000 + b"\n")
            return replies

    replies = asyncio.run(scenario())
    assert len(replies) == 1 and replies[0]["ok"] is False
