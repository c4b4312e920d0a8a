"""`vipd --config FILE` (and `python -m vipd`): load the config, build the daemon, run it."""

from __future__ import annotations

import argparse
import asyncio
import sys

from vipd.arp.announcer import RawAnnouncer
from vipd.config import Config, load_config
from vipd.daemon import Daemon
from vipd.errors import VipdError
from vipd.host.control import resolve_group
from vipd.host.keys import load_node_key
from vipd.host.log import configure_logging
from vipd.kernel.addresses import NetlinkAddressManager
from vipd.kernel.netif import mac_address


def build_daemon(config: Config) -> Daemon:
    key = load_node_key(config)
    a = config.announce
    return Daemon(
        config,
        key,
        addresses=NetlinkAddressManager(),
        announcer_factory=lambda loop: RawAnnouncer(
            loop,
            mac_address,
            schedule=a.schedule,
            na_router=a.na_router,
            notify=a.notify,
            notify_rate=a.notify_rate,
        ),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vipd", description="virtual-IP failover daemon")
    parser.add_argument("--config", "-c", default="/etc/vipd/vipd.toml", help="TOML config file")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        configure_logging(config.log_level, config.log_format)
        daemon = build_daemon(config)
    except VipdError as e:
        print(f"vipd: {e}", file=sys.stderr)
        return 2
    if args.check:
        try:  # what the config file alone cannot tell: the group exists and we are in it
            if config.control_group is not None:
                resolve_group(config.control_group)
        except VipdError as e:
            print(f"vipd: {e.describe(config.path)}", file=sys.stderr)
            return 2
        print(f"vipd: {args.config}: OK ({len(config.roster)} members, {len(config.pool)} groups)")
        return 0
    try:
        return asyncio.run(daemon.run())
    except VipdError as e:  # transport, control socket, state directory: cannot start
        print(f"vipd: {e.describe(config.path)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
