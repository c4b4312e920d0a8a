"""`vipctl lab` as an operator runs it: separate processes sharing only the state file."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vipd.lab.topology import list_namespaces, remove_namespaces

pytestmark = pytest.mark.netns


def vipctl_lab(*args: str, state: Path, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vipd.vipctl", "lab", *args, "--state", str(state)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def lab_namespaces(prefix: str) -> list[str]:
    return [ns for ns in list_namespaces() if ns.startswith(prefix + "-")]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def cli_lab(run_prefix: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    prefix = f"{run_prefix}c1"
    state = tmp_path / "lab.json"
    yield prefix, state
    # Safety net if the test failed before `down`: the recorded pids, then the namespaces.
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
        data = json.loads(state.read_text())
        for pid in (data.get("cluster") or {}).get("pids", {}).values():
            if (
                alive(pid)
                and data["cluster"]["workdir"].encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
            ):
                os.kill(pid, signal.SIGKILL)
    remove_namespaces(prefix + "-")


def test_up_status_fail_heal_down(cli_lab: tuple[str, Path]) -> None:
    prefix, state = cli_lab
    up = vipctl_lab("up", "--prefix", prefix, state=state)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "every address has exactly one holder" in up.stdout
    data = json.loads(state.read_text())
    pids = list(data["cluster"]["pids"].values())
    workdir = Path(data["cluster"]["workdir"])
    assert len(pids) == 3 and all(alive(p) for p in pids), data
    assert len(lab_namespaces(prefix)) == 5  # switch, n1..n3, client

    st = vipctl_lab("status", "--json", state=state)
    assert st.returncode == 0, st.stderr
    report = json.loads(st.stdout)
    assert len(report["addresses"]) == 7  # six IPv4 groups and the IPv6 one
    assert all(len(a["kernel"]) == 1 for a in report["addresses"]), report["addresses"]
    human = vipctl_lab("status", state=state)
    assert human.returncode == 0 and "203.0.113.11" in human.stdout, human.stdout

    fail = vipctl_lab("fail", "n1", "--how", "kill", state=state)
    assert fail.returncode == 0, fail.stdout + fail.stderr
    assert "taken over by n2, n3" in fail.stdout, fail.stdout
    heal = vipctl_lab("heal", "n1", state=state)
    assert heal.returncode == 0, heal.stdout + heal.stderr
    assert "one holder per address again" in heal.stdout, heal.stdout
    pids = list(json.loads(state.read_text())["cluster"]["pids"].values())

    down = vipctl_lab("down", state=state)
    assert down.returncode == 0, down.stdout + down.stderr
    assert lab_namespaces(prefix) == []
    assert not any(alive(p) for p in pids), "a daemon survived `down`"
    assert not state.exists() and not workdir.exists()
    # A second `down` is harmless.
    again = vipctl_lab("down", state=state)
    assert again.returncode == 0 and "no lab is up" in again.stdout


def test_down_cleans_a_lab_whose_state_is_partial(cli_lab: tuple[str, Path]) -> None:
    """A crash between building namespaces and starting daemons leaves a state file with
    no cluster; `down` must still remove the namespaces."""
    from vipd.lab.topology import Lab

    prefix, state = cli_lab
    lab = Lab(nodes=3, prefix=prefix).build()
    state.write_text(json.dumps({"lab": lab.to_state(), "cluster": None, "faults": {}}))
    assert len(lab_namespaces(prefix)) == 5
    down = vipctl_lab("down", state=state)
    assert down.returncode == 0, down.stdout + down.stderr
    assert lab_namespaces(prefix) == []
    assert not state.exists()


def test_refuses_without_root_clearly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from vipd.lab import cli

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["status"]) == 1
    assert "needs root" in capsys.readouterr().err
