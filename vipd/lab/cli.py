"""`vipctl lab`: watch vipd fail over on one machine, in network namespaces.

    vipctl lab up [--nodes 3] [--no-ipv6] [--profile lan|fast]
    vipctl lab status [--json]
    vipctl lab fail NODE [--how link|block|kill|term|stop]
    vipctl lab heal NODE
    vipctl lab down [--prefix PREFIX]
    vipctl lab demo

`up` leaves the lab running and records it (namespaces, daemon pids, work dir) in a state
file, /run/vipd-lab/lab.json by default (`--state` or $VIPD_LAB_STATE to change), so later
subcommands find it; `down` removes everything, even after a half-finished `up`. `demo` does
the whole tour (up, cut a link, watch the addresses move, measure the client's outage,
restore, watch the rebalance) and always tears down, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from vipd.lab.cluster import LabCluster, LabTimeout
from vipd.lab.topology import Lab, LabError, check_prefix, list_namespaces, new_prefix

STATE_DIR = Path("/run/vipd-lab")
DEFAULT_STATE = STATE_DIR / "lab.json"
FAULTS = ("link", "block", "kill", "term", "stop")


class CliError(Exception):
    """A problem to report in one line (exit code 1)."""


# --- state file ---------------------------------------------------------------------------


def state_path(args: argparse.Namespace) -> Path:
    return Path(args.state or os.environ.get("VIPD_LAB_STATE") or DEFAULT_STATE)


def load_state(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise CliError(f"{path} is not a lab state file ({e}); remove it or use --state") from e
    return data if isinstance(data, dict) else None


def save_state(path: Path, lab: Lab, cluster: LabCluster | None, faults: dict[str, str]) -> None:
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    data = {
        "lab": lab.to_state(),
        "cluster": cluster.to_state() if cluster else None,
        "faults": faults,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)  # atomic: a crash never leaves half a state file


def attach(path: Path) -> tuple[Lab, LabCluster, dict[str, Any]]:
    state = load_state(path)
    if state is None:
        raise CliError(f"no lab is up (no {path}); start one with: vipctl lab up")
    lab = Lab.attach(state["lab"])
    if not state.get("cluster"):
        raise CliError(f"{path} records a half-built lab; remove it with: vipctl lab down")
    return lab, LabCluster.attach(lab, state["cluster"]), state


# --- output -------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def say(text: str = "") -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Output piped into `head` and closed: finish the job silently (a half-done `up`
        # would be worse than lost lines). /dev/null keeps later prints from raising.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def daemon_state(cluster: LabCluster, node: str) -> str:
    pid = cluster.pids.get(node)
    if pid is None or not cluster.running(node):
        return "stopped"
    try:
        st = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "stopped"
    return "paused" if st in ("T", "t") else "running"


def collect_status(lab: Lab, cluster: LabCluster) -> dict[str, Any]:
    """Everything `status` shows: kernel holders, daemons' opinions, the client's view."""
    kernel = cluster.ownership()
    opinions: dict[str, dict[str, str | None]] = {}
    nodes: list[dict[str, Any]] = []
    macs = {n: lab.mac(n) for n in cluster.nodes}
    for n in cluster.nodes:
        entry: dict[str, Any] = {
            "node": n,
            "pid": cluster.pids.get(n),
            "daemon": daemon_state(cluster, n),
            "port": lab.port_state(n),
            "mac": macs[n],
            "holds": sorted(cluster.holdings([n])[n]),
        }
        if entry["daemon"] == "running":
            try:
                st = cluster.status(n, timeout=1.0)
                opinions[n] = cluster.status_owners(n)
                entry["view"] = st["view"]["members"]
                entry["ready"] = st["ready"]
            except (OSError, ValueError, RuntimeError) as e:
                entry["error"] = str(e)
        nodes.append(entry)
    by_mac = {m: n for n, m in macs.items()}
    addresses = []
    for v in cluster.vips:
        said = sorted({o or "-" for o in (op.get(v) for op in opinions.values())})
        mac = lab.client_neigh(v) if lab.client else None
        addresses.append(
            {
                "address": v,
                "group": cluster.group_of[v],
                "kernel": kernel[v],
                "vipd": said,
                "client_mac": mac,
                "client_node": by_mac.get(mac) if mac else None,
            }
        )
    return {"prefix": lab.prefix, "nodes": nodes, "addresses": addresses}


def render_status(st: dict[str, Any], faults: dict[str, str] | None = None) -> str:
    faults = faults or {}
    rows = []
    for a in st["addresses"]:
        kernel = ",".join(a["kernel"]) or "NONE"
        if len(a["kernel"]) > 1:
            kernel += "  (!)"
        client = f"{a['client_mac']} ({a['client_node'] or '?'})" if a["client_mac"] else "-"
        rows.append([a["address"], a["group"], kernel, "/".join(a["vipd"]) or "-", client])
    out = [
        table(["ADDRESS", "GROUP", "HELD BY (kernel)", "OWNER (vipd)", "CLIENT ARP/ND"], rows),
        "",
    ]
    rows = []
    for n in st["nodes"]:
        view = ",".join(n.get("view", [])) or n.get("error", "-")
        rows.append(
            [
                n["node"],
                n["daemon"],
                n["pid"] or "-",
                n["port"],
                n["mac"],
                len(n["holds"]),
                view,
                faults.get(n["node"], ""),
            ]
        )
    out.append(table(["NODE", "VIPD", "PID", "SWITCH PORT", "MAC", "HOLDS", "VIEW", "FAULT"], rows))
    return "\n".join(out)


# --- subcommands --------------------------------------------------------------------------


def refuse_if_up(path: Path) -> None:
    existing = load_state(path)
    if existing is not None:
        raise CliError(
            f"a lab is already up (prefix {existing['lab']['prefix']}, state {path});"
            " run: vipctl lab down"
        )


def build_and_start(args: argparse.Namespace, path: Path) -> tuple[Lab, LabCluster]:
    """Build the namespaces, start the daemons, wait for one holder per address."""
    refuse_if_up(path)
    lab = Lab(nodes=args.nodes, prefix=check_prefix(args.prefix or new_prefix()))
    # Record the lab before creating anything, so `down` can clean up after any crash.
    save_state(path, lab, None, {})
    lab.build()
    cluster = LabCluster(lab, ipv6=args.ipv6, timing={"profile": args.profile})
    save_state(path, lab, cluster, {})
    say(f"lab {lab.prefix}: switch + {args.nodes} nodes + client in namespaces {lab.prefix}-*")
    say(
        f"work dir {cluster.workdir} (configs, keys, logs); starting vipd on "
        + ", ".join(cluster.nodes)
    )
    t0 = time.monotonic()
    for node in cluster.nodes:
        cluster.start(node, wait=False)
    save_state(path, lab, cluster, {})  # the pids, before anything can fail
    cluster.wait_answering(timeout=20.0)
    cluster.wait_converged(timeout=20.0, balanced=True)
    say(
        f"every address has exactly one holder, {time.monotonic() - t0:.1f}s after the"
        " daemons were started"
    )
    return lab, cluster


def cmd_up(args: argparse.Namespace) -> int:
    path = state_path(args)
    try:
        lab, cluster = build_and_start(args, path)
    except (LabTimeout, LabError, OSError, RuntimeError, KeyboardInterrupt) as e:
        say(f"vipctl lab up: failed: {e or 'interrupted'}")
        say("tearing the half-built lab down")
        teardown(path)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    say()
    say(render_status(collect_status(lab, cluster)))
    say()
    say("next: vipctl lab status | fail NODE [--how link|block|kill|term|stop] | heal NODE | down")
    say(f"logs: {cluster.workdir}/NODE/vipd.log")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    lab, cluster, state = attach(state_path(args))
    st = collect_status(lab, cluster)
    if args.json:
        print(json.dumps({**st, "faults": state.get("faults", {})}, indent=1))
    else:
        say(f"lab {lab.prefix} (work dir {cluster.workdir})")
        say(render_status(st, state.get("faults", {})))
    return 0


def live_nodes(cluster: LabCluster, faults: dict[str, str]) -> list[str]:
    return [n for n in cluster.nodes if n not in faults]


def cmd_fail(args: argparse.Namespace) -> int:
    path = state_path(args)
    lab, cluster, state = attach(path)
    node, how = args.node, args.how
    faults: dict[str, str] = dict(state.get("faults", {}))
    if node not in cluster.nodes:
        raise CliError(f"no node {node!r}; nodes: {', '.join(cluster.nodes)}")
    if node in faults:
        raise CliError(f"{node} already has a fault ({faults[node]}); run: vipctl lab heal {node}")
    held = sorted(cluster.holdings([node])[node])
    t0 = time.monotonic()
    if how == "link":
        lab.cut_link(node)
    elif how == "block":
        lab.block_port(node)
    elif how == "stop":
        cluster.stop(node, signal.SIGSTOP)
    else:
        cluster.stop(node, signal.SIGKILL if how == "kill" else signal.SIGTERM, timeout=10.0)
    faults[node] = how
    save_state(path, lab, cluster, faults)
    say(f"{node}: {describe_fault(how)}; it held {', '.join(held) or 'nothing'}")
    others = live_nodes(cluster, faults)
    try:
        cluster.wait_for(
            lambda: all(any(v in h for h in cluster.holdings(others).values()) for v in held),
            15.0,
            f"{held} to be taken over",
        )
        say(f"taken over by {', '.join(others)} after {time.monotonic() - t0:.2f}s")
    except LabTimeout as e:
        say(f"not taken over yet: {str(e).splitlines()[0]}")
    say()
    say(render_status(collect_status(lab, cluster), faults))
    return 0


def describe_fault(how: str) -> str:
    return {
        "link": "switch port down (the machine is gone; it sees no carrier)",
        "block": "switch port blocked (a partition it cannot see: carrier stays up)",
        "kill": "vipd killed with SIGKILL (host alive, addresses left behind)",
        "term": "vipd stopped with SIGTERM (graceful leave)",
        "stop": "vipd paused with SIGSTOP (a stalled daemon)",
    }[how]


def cmd_heal(args: argparse.Namespace) -> int:
    path = state_path(args)
    lab, cluster, state = attach(path)
    node = args.node
    faults: dict[str, str] = dict(state.get("faults", {}))
    how = faults.pop(node, None)
    if node not in cluster.nodes:
        raise CliError(f"no node {node!r}; nodes: {', '.join(cluster.nodes)}")
    # Undo whatever was done, and make sure the link and the daemon are back in any case.
    if how == "link" or lab.port_state(node) == "down":
        lab.restore_link(node)
    if how == "block" or lab.port_state(node) == "disabled":
        lab.unblock_port(node)
    if daemon_state(cluster, node) == "paused":
        cluster.stop(node, signal.SIGCONT)
    t0 = time.monotonic()
    if not cluster.running(node):
        cluster.start(node)
    save_state(path, lab, cluster, faults)
    say(f"{node}: healed ({how or 'no recorded fault'}); waiting for the pool to rebalance")
    try:
        cluster.wait_converged(live_nodes(cluster, faults), timeout=15.0, balanced=True)
        say(f"one holder per address again, balanced, after {time.monotonic() - t0:.2f}s")
    except LabTimeout as e:
        say(f"not converged yet: {str(e).splitlines()[0]}")
    say()
    say(render_status(collect_status(lab, cluster), faults))
    return 0


def teardown(path: Path, prefix: str | None = None) -> list[str]:
    """Stop the daemons (by recorded pid), delete the namespaces and the work dir, forget
    the state. Tolerates a partial state; returns what it could not do."""
    problems: list[str] = []
    state = load_state(path)
    lab: Lab | None = None
    if state is not None:
        lab = Lab.attach(state["lab"])
        if state.get("cluster"):
            cluster = LabCluster.attach(lab, state["cluster"])
            try:
                cluster.close(graceful=True, timeout=3.0)
            except OSError as e:
                problems.append(f"stopping daemons: {e}")
            shutil.rmtree(cluster.workdir, ignore_errors=True)
        else:
            shutil.rmtree(Path("/tmp") / f"vipd-lab-{lab.prefix}", ignore_errors=True)
    elif prefix is not None:
        lab = Lab.attach({"prefix": check_prefix(prefix), "nodes": 1})
        shutil.rmtree(Path("/tmp") / f"vipd-lab-{prefix}", ignore_errors=True)
    if lab is not None:
        lab.built = True
        lab.teardown()
        left = [ns for ns in list_namespaces() if ns.startswith(lab.prefix + "-")]
        if left:
            problems.append(f"namespaces still present: {', '.join(left)}")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return problems


def cmd_down(args: argparse.Namespace) -> int:
    path = state_path(args)
    state = load_state(path)
    if state is None and not args.prefix:
        stale = sorted(
            {
                ns.rsplit("-", 1)[0]
                for ns in list_namespaces()
                if ns.startswith("vl") and ns.endswith("-sw")
            }
        )
        say(f"no lab is up (no {path})")
        if stale:
            say("namespaces that look like lab leftovers: prefixes " + ", ".join(stale))
            say("remove one with: vipctl lab down --prefix PREFIX")
        return 0
    prefix = state["lab"]["prefix"] if state else args.prefix
    problems = teardown(path, args.prefix)
    if problems:
        for p in problems:
            say(f"vipctl lab down: {p}")
        return 1
    say(f"lab {prefix} removed (daemons stopped, namespaces and work dir deleted)")
    return 0


# --- demo ---------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from vipd.lab.arpwatch import announcements, load_events
    from vipd.lab.probe import last_success, load_records, lost, outage

    path = state_path(args)
    refuse_if_up(path)  # before the try: never tear down a lab this run did not build
    try:
        try:
            lab, cluster = build_and_start(args, path)
        except (LabError, OSError, RuntimeError) as e:
            say(f"vipctl lab demo: start-up failed: {e}")
            return 1
        say()
        say(render_status(collect_status(lab, cluster)))
        arp = cluster.start_arpwatch()
        probe = cluster.start_probe(interval=0.01)
        say()
        say(f"the client ({lab.client_ns}) now pings every address every 10 ms")
        held = cluster.holdings()
        victim = max(sorted(held), key=lambda n: len(held[n]))
        moved = sorted(held[victim], key=cluster.vips.index)
        survivors = [n for n in cluster.nodes if n != victim]
        time.sleep(1.0)  # a second of clean baseline on the probe chart
        say()
        say(f">>> cutting {victim}'s link: it held {', '.join(moved)}")
        t_cut = time.monotonic()
        lab.cut_link(victim)
        after = cluster.wait_converged(survivors, timeout=15.0)
        t_moved = time.monotonic()
        say(f"    survivors hold every address {t_moved - t_cut:.2f}s after the cut")
        cluster.wait_for(
            lambda: all((last_success(load_records(probe.path), v) or 0) > t_moved for v in moved),
            10.0,
            "the moved addresses to answer",
        )
        records = load_records(probe.path)
        events = load_events(arp.path)
        now = time.monotonic()
        rows = []
        for v in cluster.vips:
            gap = f"{outage(records, v, t_cut, now) * 1000:.0f} ms"
            if v in moved:
                ann = announcements(events, v, since=t_cut, mac=lab.mac(after[v]))
                garp = f"{(ann[0]['t'] - t_cut) * 1000:.0f} ms" if ann else "none seen"
                rows.append([v, f"{victim} -> {after[v]}", garp, gap])
            else:
                rows.append([v, f"{after[v]} (stays)", "-", gap])
        say()
        say(table(["ADDRESS", "MOVE", "GRATUITOUS ARP/NA AT", "CLIENT OUTAGE"], rows))
        say("    (outage = longest gap between successful 10 ms probes; ~10 ms means none)")
        say()
        say(render_status(collect_status(lab, cluster), {victim: "link"}))
        say(f"    ({victim} is cut off: whatever it still holds, nobody can reach it there)")
        say()
        say(f">>> restoring {victim}'s link")
        t_heal = time.monotonic()
        lab.restore_link(victim)
        cluster.wait_converged(timeout=15.0, balanced=True)
        t_done = time.monotonic()
        say(
            f"    {victim} rejoined; pool rebalanced to one holder each after "
            f"{t_done - t_heal:.2f}s"
        )
        probe.stop()  # settles every request in flight, so losses are all counted
        records = load_records(probe.path)
        end = max(r["t"] for r in records)
        gaps = {v: outage(records, v, t_heal, end) for v in cluster.vips}
        losses = {v: lost(records, v, t_heal, end) for v in cluster.vips}
        say(
            "    longest gap per address during the rejoin (make-before-break should keep it at"
            " ~10 ms):"
        )
        say(
            "    "
            + ", ".join(
                f"{v} {gaps[v] * 1000:.0f} ms" + (f" ({losses[v]} lost)" if losses[v] else "")
                for v in cluster.vips
            )
        )
        say()
        say(render_status(collect_status(lab, cluster)))
        arp.stop()
        return 0
    except LabTimeout as e:
        say(f"vipctl lab demo: {e}")
        return 1
    except KeyboardInterrupt:
        say("\ninterrupted")
        return 130
    finally:
        say()
        say("tearing down ...")
        problems = teardown(path)
        say("lab removed" if not problems else "; ".join(problems))


# --- entry point --------------------------------------------------------------------------


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state", help=f"lab state file (default {DEFAULT_STATE})")
    build = argparse.ArgumentParser(add_help=False)
    build.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    build.add_argument("--prefix", help="namespace/link name prefix (default: vl + 6 hex)")
    build.add_argument(
        "--no-ipv6",
        dest="ipv6",
        action="store_false",
        help="leave out the IPv6 group (2001:db8:1::17)",
    )
    build.add_argument(
        "--profile",
        default="lan",
        choices=("lan", "fast"),
        help="vipd timing profile (default lan)",
    )

    p = argparse.ArgumentParser(
        prog="vipctl lab",
        parents=[common],
        description="vipd in network namespaces on this machine (root)",
    )
    sub = p.add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")
    s = sub.add_parser("up", parents=[common, build], help="build the lab and start the daemons")
    s.set_defaults(func=cmd_up)
    s = sub.add_parser("status", parents=[common], help="who holds what, per kernel/vipd/client")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)
    s = sub.add_parser("fail", parents=[common], help="inject a fault on a node")
    s.add_argument("node")
    s.add_argument(
        "--how",
        choices=FAULTS,
        default="link",
        help="link: port down; block: port blocked, carrier up; kill/term: signal "
        "vipd; stop: SIGSTOP vipd (default link)",
    )
    s.set_defaults(func=cmd_fail)
    s = sub.add_parser("heal", parents=[common], help="undo a node's fault / restart its vipd")
    s.add_argument("node")
    s.set_defaults(func=cmd_heal)
    s = sub.add_parser("down", parents=[common], help="stop everything and remove the lab")
    s.add_argument("--prefix", help="with no state file: remove the namespaces PREFIX-*")
    s.set_defaults(func=cmd_down)
    s = sub.add_parser("demo", parents=[common, build], help="the whole failover tour, then down")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if os.geteuid() != 0:
        print(
            "vipctl lab: needs root (it creates network namespaces and raw sockets); "
            "run it with sudo",
            file=sys.stderr,
        )
        return 1
    for tool in ("ip", "bridge"):
        if shutil.which(tool) is None:
            print(f"vipctl lab: {tool} (iproute2) is not installed", file=sys.stderr)
            return 1
    # SIGTERM/SIGHUP take the same orderly path as Ctrl-C (demo tears down in `finally`).
    previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, _raise_interrupt)
    try:
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except CliError as e:
        print(f"vipctl lab: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vipctl lab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # from a print outside say(), e.g. `status --json | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
