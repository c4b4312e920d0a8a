"""What a running daemon may take from an edited config file (SIGHUP, `vipctl reload`).

Pure: compares the running config with the new one and says what changed, or refuses with
the list of settings that need a restart. A reload takes:

- key changes (roster public keys, this node's private key file): key rotation with no
  downtime (docs/security.md);
- the pool: groups added, removed or changed (addresses, interface, preferences). Groups are
  known by name, so an unchanged group keeps its holder (see `Controller.reload_pins`), a
  removed group's addresses are released, an added group is claimed by its owner;
- hooks and the log level.

Anything else (cluster, roster names or weights, timing, transport, announce settings,
control socket...) is refused and nothing is applied: those change how this node talks to
its peers or what it is, and take a restart.
"""

from __future__ import annotations

import dataclasses

from vipd.config import Config, Member, PoolGroup
from vipd.membership.wire import key_id

#: Settings a reload applies.
RELOADABLE = ("roster public keys", "node.private_key_file", "pool", "hooks", "log.level")
_TAKEN = ("roster", "private_key_file", "pool", "hooks", "log_level")


class ReloadRefused(Exception):
    """The new config changes settings a reload cannot apply; the daemon keeps running on the
    old config."""

    def __init__(self, settings: list[str]) -> None:
        super().__init__(
            f"these settings changed and need a restart: {', '.join(settings)}; "
            f"a reload applies only {', '.join(RELOADABLE)}"
        )
        self.settings = settings


def _without_keys(m: Member) -> Member:
    return dataclasses.replace(m, public_keys=())


def reload_changes(old: Config, new: Config) -> list[str]:
    """What the reload changes, as lines for the log and for `vipctl reload`; raises
    ReloadRefused if anything else changed."""
    refused = [
        f.name
        for f in dataclasses.fields(Config)
        if f.name not in _TAKEN and getattr(old, f.name) != getattr(new, f.name)
    ]
    if [_without_keys(m) for m in old.roster] != [_without_keys(m) for m in new.roster]:
        refused.append("roster (names, weights or addresses)")
    if refused:
        raise ReloadRefused(refused)
    changes = []
    for before, after in zip(old.roster, new.roster, strict=True):
        added = [key_id(k).hex() for k in after.public_keys if k not in before.public_keys]
        removed = [key_id(k).hex() for k in before.public_keys if k not in after.public_keys]
        if added or removed:
            changes.append(f"roster {after.name}: keys added {added}, removed {removed}")
    if old.private_key_file != new.private_key_file:
        changes.append(f"node.private_key_file: {old.private_key_file} -> {new.private_key_file}")
    changes += pool_changes(old.pool, new.pool)
    if old.hooks != new.hooks:
        changes.append("hooks changed")
    if old.log_level != new.log_level:
        changes.append(f"log.level: {old.log_level} -> {new.log_level}")
    return changes


def pool_changes(old: tuple[PoolGroup, ...], new: tuple[PoolGroup, ...]) -> list[str]:
    before = {g.name: g for g in old}
    after = {g.name: g for g in new}
    lines = [f"pool: group {name} added" for name in sorted(after.keys() - before.keys())]
    lines += [f"pool: group {name} removed" for name in sorted(before.keys() - after.keys())]
    lines += [
        f"pool: group {name} changed"
        for name in sorted(before.keys() & after.keys())
        if before[name] != after[name]
    ]
    return lines
