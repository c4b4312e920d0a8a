"""Local errors name the file, the setting and the fix (`vipd.errors`)."""

from __future__ import annotations

import asyncio
import errno
import grp
import os
from pathlib import Path

import pytest

from vipd.config import ConfigError as ConfigFromConfig
from vipd.errors import ConfigError, ControlError, StateError, TransportError, VipdError
from vipd.host.control import ControlServer
from vipd.host.state import (
    load_overrides,
    load_seen,
    next_incarnation,
    save_overrides,
    save_seen,
)
from vipd.kernel.transport import TransportError as TransportFromTransport
from vipd.placement.overrides import Overrides, OverridesError


def test_every_local_error_is_a_vipd_error_importable_where_it_was() -> None:
    for cls in (ConfigError, TransportError, StateError, ControlError):
        assert issubclass(cls, VipdError)
    assert ConfigFromConfig is ConfigError and TransportFromTransport is TransportError


def test_the_config_error_line_is_unchanged() -> None:
    e = ConfigError("/etc/vipd/vipd.toml", "cluster.port", "must be 1..65535", "fix the port")
    assert (
        str(e) == "config error: /etc/vipd/vipd.toml: cluster.port: must be 1..65535; fix the port"
    )
    assert (e.path, e.key, e.problem, e.fix) == (
        "/etc/vipd/vipd.toml",
        "cluster.port",
        "must be 1..65535",
        "fix the port",
    )
    assert e.args == (str(e),)  # as before the move to vipd.errors


def test_a_transport_error_reads_like_a_config_error_with_the_file_added() -> None:
    e = TransportError("interface 'eth9' does not exist", "cluster.interface", "use one that does")
    assert str(e) == "interface 'eth9' does not exist"
    assert e.describe("/etc/vipd/vipd.toml") == (
        "config error: /etc/vipd/vipd.toml: cluster.interface: interface 'eth9' does not"
        " exist; use one that does"
    )


def test_an_unwritable_state_dir_is_a_state_error_naming_the_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("a file where the directory should be")
    with pytest.raises(StateError) as caught:
        next_incarnation(state, 1_800_000_000.0)
    assert caught.value.key == "node.state_dir"
    assert str(state / "incarnation") in str(caught.value) and "writable" in str(caught.value)
    assert isinstance(caught.value, OSError)  # what guarded the state files before
    assert caught.value.filename == str(state / "incarnation") and caught.value.errno is not None
    with pytest.raises(StateError) as caught:
        save_overrides(state, Overrides())
    assert caught.value.path == str(state / "overrides.json")


def test_a_damaged_overrides_file_is_a_state_error_the_daemon_still_catches(
    tmp_path: Path,
) -> None:
    path = tmp_path / "overrides.json"
    path.write_text("{not json")
    with pytest.raises(StateError) as caught:
        load_overrides(tmp_path)
    e = caught.value
    assert isinstance(e, OverridesError)  # the daemon starts with no overrides on this
    assert (e.path, e.key) == (str(path), "node.state_dir")
    assert str(e).startswith(f"state error: {path}: node.state_dir: not JSON")
    assert str(e).endswith(
        "; restore a good copy or remove it, then repeat the moves and drains with vipctl"
    )
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(StateError, match="not UTF-8"):
        load_overrides(tmp_path)


def test_an_unreadable_overrides_file_is_a_state_error(tmp_path: Path) -> None:
    (tmp_path / "overrides.json").mkdir()  # unreadable even for root
    with pytest.raises(StateError) as caught:
        load_overrides(tmp_path)
    e = caught.value
    assert isinstance(e, OverridesError) and e.errno == errno.EISDIR
    assert "cannot read" in e.problem and "readable" in e.fix


def test_a_corrupt_incarnation_file_is_replaced_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "incarnation").write_text("not a number\n")
    assert next_incarnation(tmp_path, 2.0) == 2000
    assert (tmp_path / "incarnation").read_text() == "2000\n"


def test_a_missing_control_group_is_a_control_error(tmp_path: Path) -> None:
    server = ControlServer(tmp_path / "vipd.sock", 0o660, "vipd-no-such-group-x", {})
    with pytest.raises(ControlError) as caught:
        asyncio.run(server.start())
    assert caught.value.key == "control.group"
    assert "does not exist" in str(caught.value) and "groupadd" in str(caught.value)


def test_an_impossible_control_socket_path_is_a_control_error(tmp_path: Path) -> None:
    long = tmp_path / ("x" * 120) / "vipd.sock"
    server = ControlServer(long, 0o660, None, {})
    with pytest.raises(ControlError) as caught:
        asyncio.run(server.start())
    assert caught.value.key == "control.socket"
    assert os.fspath(long) in str(caught.value)


def test_a_chown_the_kernel_refuses_is_a_control_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(path: object, uid: int, gid: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    group = grp.getgrgid(os.getgid()).gr_name
    server = ControlServer(tmp_path / "vipd.sock", 0o660, group, {})
    monkeypatch.setattr(os, "chown", refuse)

    async def start() -> None:
        try:
            await server.start()
        finally:
            await server.close()

    with pytest.raises(ControlError) as caught:
        asyncio.run(start())
    assert caught.value.key == "control.group" and caught.value.path is None
    assert "Operation not permitted" in str(caught.value)
    assert "SupplementaryGroups=" in caught.value.fix
    assert caught.value.describe("/etc/vipd/vipd.toml").startswith(
        "config error: /etc/vipd/vipd.toml: control.group: cannot give"
    )


def test_an_incarnation_file_at_the_top_of_the_range_is_not_a_crash_loop(tmp_path: Path) -> None:
    """Issue 11 item 14: 2**64 - 1 in the file made the next incarnation overflow the wire's
    u64 at the first heartbeat, on every restart."""
    (tmp_path / "incarnation").write_text(f"{2**64 - 1}\n")
    assert next_incarnation(tmp_path, 2.0) == 2000


def test_what_peers_sent_survives_a_restart_and_a_damaged_record_only_loses_it(
    tmp_path: Path,
) -> None:
    """The record behind the restarted receiver's replay check (issue 11 item 7): written
    atomically, read back the same; a damaged or foreign file never stops the start."""
    seen = {"n2": (1_796_000_000_000, 1_796_000_123_456), "n3": (7, 9)}
    save_seen(tmp_path, seen)
    assert load_seen(tmp_path) == seen
    assert load_seen(None) == {}
    for damaged in ("{", '["n2"]', '{"n2": [1]}', '{"n2": ["x", 2]}', '{"n2": [-1, 2]}', "\xff"):
        (tmp_path / "peers-seen.json").write_text(damaged)
        assert load_seen(tmp_path) == {}, damaged
