"""Every local mistake stops the start with one line naming the file, the key and the fix."""

from __future__ import annotations

import copy
import grp
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.clusterkit import config_dict
from vipd.config import CLUSTER_TIMING, PROFILES, ConfigError, load_config, parse_config
from vipd.host.keys import generate_key_file, load_private_key, public_key_line

KEYS = {"n1": Ed25519PrivateKey.generate(), "n2": Ed25519PrivateKey.generate()}


def base() -> dict[str, Any]:
    return copy.deepcopy(config_dict("n1", KEYS, groups=3))


def error_for(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, Path("/etc/vipd/vipd.toml"))
    return info.value


def test_valid_config_loads_sorted_pool_and_profile_defaults() -> None:
    data = base()
    data["pool"].reverse()
    cfg = parse_config(data, Path("x.toml"))
    assert [g.name for g in cfg.pool] == ["www1", "www2", "www3"]
    assert cfg.timing.heartbeat_interval == 0.075
    assert cfg.control_mode == 0o660


def test_fast_profile_and_overrides() -> None:
    data = base()
    data["timing"] = {"profile": "fast", "dead_after": 0.2}
    cfg = parse_config(data, Path("x.toml"))
    assert cfg.timing.heartbeat_interval == 0.015
    assert cfg.timing.dead_after == 0.2
    assert cfg.timing.startup_wait == 0.2  # follows dead_after unless set


def mutate(path: str, value: Any) -> dict[str, Any]:
    data = base()
    target: Any = data
    keys = path.split(".")
    for k in keys[:-1]:
        target = target[int(k)] if isinstance(target, list) else target.setdefault(k, {})
    last = keys[-1]
    if value is KeyError:
        del target[last]
    elif isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return data


CASES = [
    ("cluster.colour", "blue", "cluster.colour", "unknown key"),
    ("surprise", {}, "surprise", "unknown key"),
    ("pool.0.addresses", ["203.0.113.300/32"], "pool[0].addresses[0]", "not an address"),
    ("pool.0.addresses", ["203.0.113.9"], "pool[0].addresses[0]", "no prefix length"),
    ("pool.1.addresses", ["203.0.113.11/32"], "pool[1].addresses[0]", "already in group"),
    ("pool.1.name", "www1", "pool[1].name", "duplicate group name"),
    ("roster.1.name", "n1", "roster[1].name", "duplicate node name"),
    ("roster.1.public_keys", ["ed25519:abc"], "roster[1].public_keys[0]", "base64"),
    ("node.name", "n9", "node.name", "not in the roster"),
    ("cluster.multicast_group", "198.51.100.1", "cluster.multicast_group", "not a multicast"),
    ("cluster.port", 70000, "cluster.port", "not a UDP port"),
    ("cluster.interface", "an-interface-name-too-long", "cluster.interface", "interface name"),
    ("timing.dead_after", 0.1, "timing.dead_after", "under 3 heartbeat intervals"),
    ("timing.profile", "warp", "timing.profile", "unknown profile"),
    ("control.mode", "0666", "control.mode", "closed to others"),
    ("log.level", "loud", "log.level", "not a level"),
    ("pool.0.colour", "x", "pool[0].colour", "unknown key"),
    ("cluster.transport", "pigeon", "cluster.transport", "unknown transport"),
    ("cluster.partition_policy", "biggest", "cluster.partition_policy", "unknown policy"),
    ("cluster.transport", "unicast", "roster[0].address", "is missing for 'n1'"),
    ("roster.0.address", "239.1.1.1", "roster[0].address", "not a unicast address"),
    ("metrics.listen", "localhost", "metrics.listen", "not host:port"),
    ("pool.0.prefer", ["n7"], "pool[0].prefer[0]", "not in the roster"),
    ("pool.0.prefer", ["n1", "n1"], "pool[0].prefer", "names a member twice"),
    ("pool.0.prefer", "n1", "pool[0].prefer", "not a list of names"),
    ("announce.refresh_interval", 0.5, "announce.refresh_interval", "too often"),
    ("announce.defend_interval", 0, "announce.defend_interval", "positive number"),
    ("announce.na_router", "yes", "announce.na_router", "not true or false"),
    ("announce.notify", ["2001:db8::/64"], "announce.notify[0]", "larger than 4096"),
    ("announce.notify", ["198.51.100.1/24"], "announce.notify[0]", "host bits set"),
    ("hooks.up", "vip-up", "hooks.up", "not a command"),
    ("hooks.post_down", [], "hooks.post_down", "not a command"),
    ("hooks.timeout", -1, "hooks.timeout", "positive number"),
    ("hooks.later", "/bin/true", "hooks.later", "unknown key"),
]


def test_pool_preferences_announce_and_hooks_are_read() -> None:
    data = base()
    data["pool"][0]["prefer"] = ["n2", "n1"]
    data["announce"] = {
        "refresh_interval": 60,
        "defend_interval": 2,
        "na_router": True,
        "notify": ["198.51.100.1", "198.51.100.64/28", "2001:db8::1"],
        "notify_rate": 100,
    }
    data["hooks"] = {"up": "/usr/local/sbin/vip-up", "down": ["/bin/logger", "-t", "vipd"]}
    cfg = parse_config(data, Path("x.toml"))
    assert cfg.pool[0].prefer == ("n2", "n1")
    a = cfg.announce
    assert (a.refresh_interval, a.defend_interval, a.na_router, a.notify_rate) == (60, 2, True, 100)
    assert [str(n) for n in a.notify] == ["198.51.100.1/32", "198.51.100.64/28", "2001:db8::1/128"]
    assert cfg.hooks.up == ("/usr/local/sbin/vip-up",)
    assert cfg.hooks.command("down") == ("/bin/logger", "-t", "vipd")
    assert cfg.hooks.post_up is None and cfg.hooks.timeout == 10.0
    # Preferences are part of the pool digest (placement), not of the config digest.
    other = base()
    assert parse_config(other, Path("x.toml")).digest == cfg.digest
    assert parse_config(other, Path("x.toml")).pool_digest != cfg.pool_digest


def test_what_nodes_judge_each_other_by_is_in_the_config_digest() -> None:
    """Issue 11 item 5: the partition policy and the cluster-wide timing must agree, so a
    difference is a config mismatch; timing that only paces the node itself is not."""

    def digest(**timing: object) -> bytes:
        data = base()
        policy = timing.pop("partition_policy", None)
        if policy is not None:
            data["cluster"]["partition_policy"] = policy
        data["timing"] = {**data.get("timing", {}), **timing}
        return parse_config(data, Path("x.toml")).digest

    plain = digest()
    assert digest(profile="lan") == plain
    assert digest(heartbeat_interval=0.075) == plain  # the profile's own value, spelled out
    assert digest(profile="fast") != plain
    for name in CLUSTER_TIMING:
        value = getattr(PROFILES["lan"], name)
        assert digest(**{name: value * 1.5}) != plain, name
    assert digest(partition_policy="majority") != plain
    for local in ("startup_wait", "reconcile_interval", "mature_after", "holddown"):
        assert digest(**{local: getattr(PROFILES["lan"], local) * 1.5}) == plain, local


def test_unicast_roster_addresses() -> None:
    data = base()
    data["cluster"]["transport"] = "unicast"
    data["roster"][0]["address"] = "198.51.100.11"
    data["roster"][1]["address"] = "198.51.100.11"
    assert "listed twice" in error_for(data).problem
    data["roster"][1]["address"] = "198.51.100.12"
    cfg = parse_config(data, Path("x.toml"))
    assert cfg.transport == "unicast"
    assert [str(m.address) for m in cfg.roster] == ["198.51.100.11", "198.51.100.12"]


@pytest.mark.parametrize(("path", "value", "key", "problem"), CASES)
def test_each_mistake_names_file_key_and_fix(path: str, value: Any, key: str, problem: str) -> None:
    err = error_for(mutate(path, value))
    line = str(err)
    assert "\n" not in line
    assert line.startswith("config error: /etc/vipd/vipd.toml: ")
    assert err.key == key
    assert problem in err.problem
    assert err.fix


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\nname=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read file"):
        load_config(tmp_path / "missing.toml")


def test_key_file_checks(tmp_path: Path) -> None:
    key_path = tmp_path / "n1.key"
    with pytest.raises(ConfigError, match="no such file") as info:
        load_private_key(key_path, "vipd.toml")
    assert info.value.key == "node.private_key_file" and "vipctl keygen" in info.value.fix
    generate_key_file(key_path)
    assert (key_path.stat().st_mode & 0o777) == 0o600
    assert isinstance(load_private_key(key_path, "vipd.toml"), Ed25519PrivateKey)
    os.chmod(key_path, 0o640)
    with pytest.raises(ConfigError, match="lets group or others read it") as info:
        load_private_key(key_path, "vipd.toml")
    assert "chmod 600" in info.value.fix
    with pytest.raises(FileExistsError):
        generate_key_file(key_path)  # an identity is never overwritten


def test_key_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    key_path = tmp_path / "n1.key"
    generate_key_file(key_path)
    os.chown(key_path, 65534, -1)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        load_private_key(key_path, "vipd.toml")


def test_vipd_refuses_a_bad_config_with_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "vipd.toml"
    cfg.write_text('[node]\nname = "n1"\nprivate_key_file = "k"\ncolour = 1\n')
    proc = subprocess.run(
        [sys.executable, "-m", "vipd", "--config", str(cfg)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"vipd: config error: {cfg}: node.colour: unknown key;"
        " remove it or use one of: name, private_key_file, state_dir"
    )


def test_vipd_refuses_a_key_not_in_the_roster(tmp_path: Path) -> None:
    import tomllib  # noqa: F401  (the file below is written as TOML text)

    key = tmp_path / "n1.key"
    generate_key_file(key)
    data = base()
    roster = "\n".join(
        f'[[roster]]\nname = "{r["name"]}"\npublic_keys = ["{r["public_keys"][0]}"]'
        for r in data["roster"]
    )
    cfg = tmp_path / "vipd.toml"
    cfg.write_text(
        f'[node]\nname = "n1"\nprivate_key_file = "{key}"\n'
        '[cluster]\nname = "web"\ninterface = "lo"\n'
        f'[control]\nsocket = "{tmp_path}/s"\n{roster}\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "vipd", "--config", str(cfg), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "node.private_key_file" in proc.stderr and "is not listed for 'n1'" in proc.stderr


def test_keygen_prints_a_roster_entry(tmp_path: Path) -> None:
    out = tmp_path / "n7.key"
    proc = subprocess.run(
        [sys.executable, "-m", "vipd.vipctl", "keygen", "--name", "n7", "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    key = load_private_key(out, "x")
    assert f'public_keys = ["{public_key_line(key)}"]' in proc.stdout
    assert 'name = "n7"' in proc.stdout


NON_FINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("timing.heartbeat_interval", "timing.heartbeat_interval"),
        ("timing.dead_after", "timing.dead_after"),
        ("timing.handover_timeout", "timing.handover_timeout"),
        ("announce.defend_interval", "announce.defend_interval"),
        ("announce.notify_rate", "announce.notify_rate"),
        ("announce.refresh_interval", "announce.refresh_interval"),
        ("announce.schedule", "announce.schedule"),
    ],
)
def test_nan_and_infinity_are_refused(path: str, key: str, value: float) -> None:
    """TOML has nan and inf; a NaN heartbeat interval used to pass and then send almost no
    heartbeats (issue 11 item 4). Every number must be finite."""
    e = error_for(mutate(path, [0, value] if path.endswith("schedule") else value))
    assert e.key == key


@pytest.mark.parametrize(
    ("path", "value", "key"),
    [
        ("node.name", "n1\n", "node.name"),
        ("cluster.interface", "eth0\n", "cluster.interface"),
        ("node.state_dir", 5, "node.state_dir"),
        ("node.state_dir", "", "node.state_dir"),
    ],
)
def test_names_and_paths_are_checked_whole(path: str, value: Any, key: str) -> None:
    """Issue 11 item 14: "web1\\n" passed the name check (a `$` matches before a final
    newline) and `state_dir = 5` was a TypeError traceback."""
    assert error_for(mutate(path, value)).key == key


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root")
def test_check_refuses_a_control_group_the_daemon_user_cannot_give_the_socket_to() -> None:
    """Issue 11 item 8: under User=vipd, chown of the socket to a group vipd is not in is
    EPERM; it was a traceback at start. `vipd --check` (the unit's ExecStartPre, run as the
    same user) now names the group and the fix, and a group the user is in passes."""
    nobody = pwd.getpwnam("nobody")
    with tempfile.TemporaryDirectory(prefix="vipd-check-") as d:
        root = Path(d)
        os.chmod(root, 0o755)
        key = root / "n1.key"
        generate_key_file(key)
        line = public_key_line(load_private_key(key, "x"))
        os.chown(key, nobody.pw_uid, nobody.pw_gid)  # the daemon's user owns its key

        def check(group: str) -> subprocess.CompletedProcess[str]:
            cfg = root / "vipd.toml"
            cfg.write_text(
                f'[node]\nname = "n1"\nprivate_key_file = "{key}"\n'
                '[cluster]\nname = "web"\ninterface = "lo"\n'
                f'[control]\nsocket = "{root}/s"\ngroup = "{group}"\n'
                f'[[roster]]\nname = "n1"\npublic_keys = ["{line}"]\n'
            )
            as_nobody = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}"]
            argv = [*as_nobody, "--clear-groups", sys.executable, "-m", "vipd"]
            env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
            argv += ["--config", str(cfg), "--check"]
            return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=root)

        refused = check("root")
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "control.group: this user" in refused.stderr and "SupplementaryGroups=root" in (
            refused.stderr
        )
        own = grp.getgrgid(nobody.pw_gid).gr_name
        passed = check(own)
        assert passed.returncode == 0, passed.stdout + passed.stderr


def test_check_refuses_a_control_group_that_does_not_exist(tmp_path: Path) -> None:
    """Issue 11 item 8: an unknown control.group passed `vipd --check` and was a KeyError
    traceback at start, after stale addresses were already removed."""
    key = tmp_path / "n1.key"
    generate_key_file(key)
    line = public_key_line(load_private_key(key, "x"))
    cfg = tmp_path / "vipd.toml"
    cfg.write_text(
        f'[node]\nname = "n1"\nprivate_key_file = "{key}"\n'
        '[cluster]\nname = "web"\ninterface = "lo"\n'
        f'[control]\nsocket = "{tmp_path}/s"\ngroup = "vipd-no-such-group-x"\n'
        f'[[roster]]\nname = "n1"\npublic_keys = ["{line}"]\n'
    )
    argv = [sys.executable, "-m", "vipd", "--config", str(cfg), "--check"]
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"vipd: config error: {cfg}: control.group: group ")
    assert "does not exist" in proc.stderr
