"""The shipped example config and systemd unit stay valid and minimal."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vipd.config import load_config
from vipd.host.keys import public_key_line

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_example_config_loads_once_keys_are_filled_in(tmp_path: Path) -> None:
    text = (DEPLOY / "vipd.toml.example").read_text()
    placeholders = re.findall(r'"ed25519:REPLACE[^"]*"', text)
    assert len(placeholders) == 3
    for _ in placeholders:
        line = public_key_line(Ed25519PrivateKey.generate())
        text = text.replace(placeholders[0], f'"{line}"', 1)
    path = tmp_path / "vipd.toml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.node == "web1" and len(cfg.roster) == 3 and len(cfg.pool) == 3
    assert cfg.control_group == "vipd"
    assert {a.version for g in cfg.pool for a in g.addresses} == {4, 6}


def test_systemd_unit_runs_unprivileged_with_two_capabilities() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "systemd" / "vipd.service")
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["User"] == "vipd"
    caps = {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert set(service["AmbientCapabilities"].split()) == caps
    assert set(service["CapabilityBoundingSet"].split()) == caps
    assert service["NoNewPrivileges"] == "yes"
    assert "--config /etc/vipd/vipd.toml" in service["ExecStart"]
    assert service["KillSignal"] == "SIGTERM"  # graceful leave with make-before-break
    # Issue 11 item 8: admins in control.group but not in the daemon's group must be able to
    # reach the socket; its own mode (0660) is what guards it, not the directory.
    assert int(service["RuntimeDirectoryMode"], 8) & 0o005 == 0o005
