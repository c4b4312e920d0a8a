"""vipctl: the operator's tool. Talks to vipd over its control socket; never imports scapy."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vipd.config import ConfigError, load_config
from vipd.host.control import request
from vipd.host.keys import generate_key_file, public_key_line
from vipd.node.status import GroupStatus, Status

DEFAULT_SOCKET = Path("/run/vipd/vipd.sock")


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    if args.config:
        return load_config(args.config).control_socket
    return DEFAULT_SOCKET


def _call(args: argparse.Namespace, payload: dict[str, Any]) -> Any:
    path = _socket_path(args)
    try:
        reply = request(path, payload)
    except FileNotFoundError:
        raise SystemExit(f"vipctl: no control socket at {path}: is vipd running?") from None
    except PermissionError:
        raise SystemExit(
            f"vipctl: permission denied on {path}: run as root or the admin group"
        ) from None
    except (ConnectionError, TimeoutError, OSError) as e:
        raise SystemExit(f"vipctl: cannot talk to vipd at {path}: {e}") from None
    if not reply.get("ok"):
        raise SystemExit(f"vipctl: vipd refused: {reply.get('error')}")
    return reply["result"]


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def format_status(s: Status) -> str:
    state = "leaving" if s.leaving else "ready" if s.ready else "joining"
    view = s.view
    head = (
        f"node {s.node}  cluster {s.cluster}  {state}  "
        f"view {view.digest} ({len(view.members)}: {' '.join(view.members) or '-'})"
    )
    own_pool = s.members[0].pool_digest if s.members else None
    members = _table(
        ["MEMBER", "STATE", "LAST HEARD", "INCARNATION", "FLAGS", "CONFIG", "POOL"],
        [
            [
                m.name,
                m.state,
                "-" if m.age is None else f"{m.age:.2f}s ago",
                str(m.incarnation or "-"),
                ",".join([*m.flags, *(["drained"] if m.drained else [])]) or "-",
                "ok" if m.config_digest_ok else "MISMATCH",
                "-"
                if m.pool_digest is None
                else "same"
                if m.pool_digest == own_pool
                else "DIFFERS",
            ]
            for m in s.members
        ],
    )
    pool = _table(
        ["GROUP", "OWNER", "HELD HERE", "OVERRIDE", "INTERFACE", "ADDRESSES"],
        [
            [
                g.group,
                g.owner or "-",
                "yes" if g.held_here else "",
                _override_text(g),
                g.interface,
                " ".join(g.addresses),
            ]
            for g in s.pool
        ],
    )
    rejected = {k: v for k, v in s.counters.rejected.items() if v}
    tail = "rejected datagrams: " + (
        ", ".join(f"{k}={v}" for k, v in sorted(rejected.items())) if rejected else "none"
    )
    if s.overrides.version:
        tail += f"\noperator table: version {s.overrides.version} by {s.overrides.issuer}"
    return f"{head}\n\n{members}\n\n{pool}\n\n{tail}"


def _override_text(g: GroupStatus) -> str:
    o = g.override
    if o is not None:
        return f"{o.reason} -> {o.node}"
    return f"prefer {','.join(g.prefer)}" if g.prefer else ""


def _print_change(result: dict[str, Any]) -> None:
    print(f"{result['change']} (operator table version {result['version']})")
    if result.get("note"):
        print(f"note: {result['note']}")


def cmd_move(args: argparse.Namespace) -> int:
    if (args.node is None) == (not args.auto):
        raise SystemExit("vipctl: give either a NODE or --auto")
    _print_change(_call(args, {"cmd": "move", "group": args.group, "node": args.node}))
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    drained = args.command == "drain"
    _print_change(_call(args, {"cmd": "drain", "node": args.node, "drained": drained}))
    return 0


def cmd_rebalance(args: argparse.Namespace) -> int:
    _print_change(_call(args, {"cmd": "rebalance"}))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    reply = _call(args, {"cmd": "status"})
    try:
        status = Status.from_json(reply)
    except ValueError as e:
        raise SystemExit(f"vipctl: unexpected status reply from vipd: {e}") from None
    # --json prints the reply as served (it passed the parse above); the table is typed.
    print(json.dumps(reply, indent=2) if args.json else format_status(status))
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    result = _call(args, {"cmd": "reload"})
    for line in result["changes"] or ["nothing changed"]:
        print(line)
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        key = generate_key_file(out)
    except FileExistsError:
        print(f"vipctl: {out} exists; refusing to overwrite a node identity", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"vipctl: cannot write {out}: {e.strerror}", file=sys.stderr)
        return 1
    print(f"# private key written to {out} (mode 0600); add this to every node's config:")
    print("[[roster]]")
    print(f'name = "{args.name}"')
    print(f'public_keys = ["{public_key_line(key)}"]')
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lab"]:
        # The lab has its own parser (and --help); imported only when used.
        from vipd.lab.cli import main as lab_main

        code: int = lab_main(argv[1:])
        return code
    parser = argparse.ArgumentParser(prog="vipctl", description="operate vipd")
    parser.add_argument("--socket", "-s", help=f"control socket (default {DEFAULT_SOCKET})")
    parser.add_argument("--config", "-c", help="read the socket path from this vipd config")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("status", help="members and pool ownership")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "reload", help="re-read the config: pool, keys, hooks, log level (root/admin)"
    )
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser(
        "move",
        help="pin GROUP on NODE (make-before-break), or give it back to placement (--auto)",
    )
    p.add_argument("group")
    p.add_argument("node", nargs="?", help="a roster member")
    p.add_argument("--auto", action="store_true", help="clear the pin: automatic placement")
    p.set_defaults(func=cmd_move)

    for name, text in (
        ("drain", "move every group off NODE (default: this node) and keep it off"),
        ("undrain", "let NODE (default: this node) hold groups again"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("node", nargs="?", help="a roster member (default: this node)")
        p.set_defaults(func=cmd_drain)

    p = sub.add_parser(
        "rebalance", help="let go of the pins a pool reload made (those groups may move)"
    )
    p.set_defaults(func=cmd_rebalance)

    p = sub.add_parser("keygen", help="create a node key and print its roster entry")
    p.add_argument("--name", required=True, help="the node's roster name")
    p.add_argument("--out", required=True, help="private key file to create (mode 0600)")
    p.set_defaults(func=cmd_keygen)

    sub.add_parser("lab", help="a namespace lab on this machine (root); see: vipctl lab --help")

    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
    except ConfigError as e:
        print(f"vipctl: {e}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
