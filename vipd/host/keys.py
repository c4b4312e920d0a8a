"""Ed25519 node keys on disk: generate, write safely, load with permission checks.

A node's private key decides who may speak for it, so a key file that other users can read
is refused at start, as is one owned by another user. Key material is never logged.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vipd.config import Config, ConfigError, format_public_key

KEY_SETTING = "node.private_key_file"


def generate_key_file(path: Path) -> Ed25519PrivateKey:
    """Create a new key at `path` (mode 0600, refusing to overwrite). Returns the key."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # O_EXCL: never clobber an existing identity; 0600 from the first byte written.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key


def public_key_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_line(key: Ed25519PrivateKey) -> str:
    return format_public_key(public_key_bytes(key))


def load_private_key(path: Path, config_path: Path | str) -> Ed25519PrivateKey:
    """Load the node key; refuse files others can read or another user owns."""

    def fail(problem: str, fix: str) -> ConfigError:
        return ConfigError(config_path, KEY_SETTING, f"{path}: {problem}", fix)

    try:
        st = path.stat()
    except FileNotFoundError:
        raise fail("no such file", "create it with: vipctl keygen --name NODE --out FILE") from None
    except OSError as e:
        raise fail(f"cannot stat ({e.strerror})", "check the path and permissions") from e
    if not stat.S_ISREG(st.st_mode):
        raise fail("is not a regular file", "point it at the key written by vipctl keygen")
    if st.st_mode & 0o077:
        raise fail(
            f"mode {stat.S_IMODE(st.st_mode):04o} lets group or others read it",
            f"run: chmod 600 {path}",
        )
    if st.st_uid != os.geteuid():
        raise fail(
            f"owned by uid {st.st_uid}, not by this daemon's uid {os.geteuid()}",
            f"run: chown {os.geteuid()} {path}",
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError):
        # The exception text could quote key bytes: do not pass it on.
        raise fail(
            "is not an unencrypted PEM private key", "regenerate it with vipctl keygen"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise fail("is not an Ed25519 key", "regenerate it with vipctl keygen")
    return key


def load_node_key(config: Config) -> Ed25519PrivateKey:
    """This node's key, checked like `load_private_key`, and listed for it in the roster."""
    key = load_private_key(config.private_key_file, config.path)
    me = config.member(config.node)
    if me is not None and public_key_bytes(key) not in me.public_keys:
        raise ConfigError(
            config.path,
            KEY_SETTING,
            f"the public key of {config.private_key_file} is not listed for {config.node!r}",
            f'add "{format_public_key(public_key_bytes(key))}" to its public_keys',
        )
    return key
