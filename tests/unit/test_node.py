"""The pure node (`vipd.node.node.Node`) on its own: the inputs the simulator does not model
(reconcile and drift, kernel refusals, operator commands) and the ordering rules its shells
rely on (one kernel job at a time, hooks around a pass, the exit through a normal pass)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from tests.sim.cluster import ClusterSpec, node_key, node_public_key
from vipd.config import PROFILES, IPInterface
from vipd.node import orders as o
from vipd.node.node import CommandRejected, Node
from vipd.placement.overrides import MAX_VERSION, Overrides

SPEC = ClusterSpec(nodes=2, groups=4, timing=PROFILES["fast"])
WALL0 = 1_800_000_000.0


class Shell:
    """A minimal shell: timers on a virtual clock, a set for a kernel; kernel jobs are
    answered after the orders of the current input (as a loop would), or held back while
    `hold` is set (a job "in flight")."""

    def __init__(self) -> None:
        self.node = Node(
            SPEC.config("n01"),
            node_key("n01"),
            node_public_key("n01"),
            incarnation=1,
            now=0.0,
            rng=random.Random(1),
        )
        self.now = 0.0
        self.kernel: set[IPInterface] = set()
        self.timers: dict[o.TimerKey, float] = {}
        self.held_back: list[o.Order] = []
        self.jobs: list[o.Order] = []
        self.hold = False
        self.log: list[o.Order] = []
        self.fail_claims = False

    def do(self, orders: list[o.Order]) -> None:
        self._do(orders)
        while self.jobs and not self.hold:
            self.answer(self.jobs.pop(0))

    def _do(self, orders: list[o.Order]) -> None:
        for order in orders:
            self.log.append(order)
            if isinstance(order, o.SetTimer):
                self.timers.pop(order.timer, None)
                if order.when is not None:
                    self.timers[order.timer] = order.when
            elif isinstance(order, o.ClaimAddress | o.ReleaseAddress | o.ListAddresses):
                (self.held_back if self.hold else self.jobs).append(order)

    def answer(self, order: o.Order) -> None:
        call: Callable[[], list[o.Order]]
        if isinstance(order, o.ListAddresses):
            found = {"eth0": set(self.kernel)}
            call = lambda: self.node.kernel_listing(found, macs={}, now=self.now, wall=self.wall)  # noqa: E731
        elif isinstance(order, o.ClaimAddress):
            ok = not self.fail_claims
            if ok:
                self.kernel.add(order.address)
            call = lambda: self.node.kernel_result(order, ok=ok, now=self.now, wall=self.wall)  # noqa: E731
        else:
            assert isinstance(order, o.ReleaseAddress)
            self.kernel.discard(order.address)
            call = lambda: self.node.kernel_result(order, ok=True, now=self.now, wall=self.wall)  # noqa: E731
        self._do(call())

    @property
    def wall(self) -> float:
        return WALL0 + self.now

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self.timers and min(self.timers.values()) <= end:
            timer = min(self.timers, key=lambda t: self.timers[t])
            self.now = self.timers.pop(timer)
            self.do(self.node.handle_timer(timer, now=self.now, wall=self.wall))
        self.now = end

    def orders(self, kind: type) -> list[o.Order]:
        return [x for x in self.log if isinstance(x, kind)]


def started() -> Shell:
    """A lone node past its maturity wait, holding the whole pool."""
    shell = Shell()
    shell.do(shell.node.start(now=0.0, wall=WALL0))
    shell.run(SPEC.timing.mature_after + 0.5)
    assert shell.node.held_groups() == {g.name for g in SPEC.config("n01").pool}
    return shell


def test_start_lists_the_kernel_then_opens_the_transport() -> None:
    shell = Shell()
    shell.kernel.add(SPEC.config("n01").pool[0].addresses[0])  # a crashed run's address
    shell.do(shell.node.start(now=0.0, wall=WALL0))
    kinds = [type(x) for x in shell.log if not isinstance(x, o.Log)]
    first_open = kinds.index(o.OpenTransport)
    assert kinds[0] is o.ListAddresses
    assert o.ReleaseAddress in kinds[:first_open], "stale addresses go before taking part"
    assert not shell.kernel


def test_a_lone_node_holds_the_pool_with_hooks_around_the_pass() -> None:
    shell = started()
    hooks = [(h.event, h.group) for h in shell.orders(o.RunHook) if isinstance(h, o.RunHook)]
    ups = [g for e, g in hooks if e == "up"]
    post = [g for e, g in hooks if e == "post_up"]
    assert sorted(ups) == sorted(post) == sorted(shell.node.held_groups())
    assert max(i for i, (e, _) in enumerate(hooks) if e == "up") < min(
        i for i, (e, _) in enumerate(hooks) if e == "post_up"
    ), "every up hook fires before the pass, every post_up after it"


def test_drift_is_repaired_and_counted() -> None:
    shell = started()
    lost = SPEC.config("n01").pool[1].addresses[0]
    shell.kernel.discard(lost)  # someone ran `ip addr del`
    shell.do(shell.node.reconcile(now=shell.now, wall=shell.wall))
    assert lost in shell.kernel, "the missing address was claimed again"
    assert shell.node.counters["drift_repairs"] == 1


def test_no_listing_while_a_pass_is_in_flight() -> None:
    shell = started()
    shell.kernel.discard(SPEC.config("n01").pool[2].addresses[0])
    shell.do(shell.node.reconcile(now=shell.now, wall=shell.wall))  # listing answered: a claim
    shell.hold = True
    shell.kernel.discard(SPEC.config("n01").pool[3].addresses[0])
    shell.do(shell.node.reconcile(now=shell.now, wall=shell.wall))
    assert [type(x) for x in shell.held_back] == [o.ListAddresses]
    shell.do(shell.node.kernel_listing({"eth0": set(shell.kernel)}, macs={}, now=1.0, wall=1.0))
    shell.held_back.clear()
    assert len([x for x in shell.log[-5:] if isinstance(x, o.ClaimAddress)]) == 1
    # The claim is in flight: a reconcile now must wait for the pass to end.
    before = len(shell.orders(o.ListAddresses))
    shell.do(shell.node.reconcile(now=shell.now, wall=shell.wall))
    assert len(shell.orders(o.ListAddresses)) == before, "a listing overlapped a pass"


def test_a_refused_claim_is_counted_not_announced_and_retried() -> None:
    shell = Shell()
    shell.fail_claims = True
    shell.do(shell.node.start(now=0.0, wall=WALL0))
    shell.run(SPEC.timing.mature_after + 0.5)
    assert not shell.node.held_groups() and not shell.orders(o.Announce)
    assert shell.node.counters["claim_errors"] >= 4
    shell.fail_claims = False
    shell.do(shell.node.reconcile(now=shell.now, wall=shell.wall))
    shell.run(0.5)
    assert len(shell.node.held_groups()) == 4


def test_operator_commands_are_checked() -> None:
    shell = started()
    node = shell.node
    with pytest.raises(CommandRejected, match="not a group"):
        node.command("move", {"group": "nope", "node": "n02"}, uid=0, now=1.0, wall=WALL0)
    with pytest.raises(CommandRejected, match="not in the roster"):
        node.command("drain", {"node": "n99"}, uid=0, now=1.0, wall=WALL0)
    with pytest.raises(CommandRejected, match="no override"):
        node.command("move", {"group": "g0000", "node": None}, uid=0, now=1.0, wall=WALL0)
    reply, orders = node.command("move", {"group": "g0000", "node": "n02"}, uid=0, now=1, wall=1)
    assert reply["version"] == 1 and "not a live member" in reply["note"]
    assert any(isinstance(x, o.SendDatagram) for x in orders), "the new table is sent at once"


def test_a_stop_releases_through_a_normal_pass_then_exits() -> None:
    shell = started()
    shell.do(shell.node.stop(now=shell.now, wall=shell.wall))
    shell.run(0.1)
    assert not shell.kernel
    tail = [type(x) for x in shell.log if not isinstance(x, o.Log | o.SetTimer)]
    assert tail[-1] is o.Exit
    downs = [h for h in shell.orders(o.RunHook) if isinstance(h, o.RunHook) and "down" in h.event]
    assert {h.reason for h in downs} == {"leaving"}  # handed over while leaving, not at exit
    assert len([h for h in downs if h.event == "post_down"]) == 4
    assert shell.node.handle_timer(o.Timer.MEMBERSHIP, now=9.0, wall=WALL0) == []


def test_a_stop_during_an_in_flight_claim_releases_that_address_too() -> None:
    """Issue 11 item 9: the old daemon cancelled its apply task at exit, so a claim netlink
    finished after the cancel stayed in the kernel. The node waits for the answer and
    releases what it got."""
    shell = Shell()
    shell.do(shell.node.start(now=0.0, wall=WALL0))
    shell.hold = True  # the first claims are in flight when the stop comes
    shell.run(SPEC.timing.mature_after + 0.5)
    assert [type(x) for x in shell.held_back] == [o.ClaimAddress]
    shell.do(shell.node.stop(now=shell.now, wall=shell.wall))
    assert not shell.orders(o.Exit), "no exit with a kernel job in flight"
    claim = shell.held_back.pop()
    shell.hold = False
    shell.answer(claim)  # netlink finishes the claim after the stop
    shell.do([])
    shell.run(0.5)
    assert not shell.kernel, f"left in the kernel: {shell.kernel}"
    assert shell.orders(o.Exit)


def test_operator_commands_wait_until_the_node_runs() -> None:
    """The control socket opens before the start-up cleanup (so a bad control setup stops
    the daemon before it touches the kernel); a command in that window is refused, never
    allowed to re-plan under the cleanup."""
    shell = Shell()
    shell.hold = True
    shell.do(shell.node.start(now=0.0, wall=WALL0))
    with pytest.raises(CommandRejected, match="starting"):
        shell.node.command("rebalance", {}, uid=0, now=0.0, wall=WALL0)
    shell.hold = False
    shell.do([])
    shell.answer(shell.held_back.pop())
    assert shell.node.opened
    reply, _ = shell.node.command("rebalance", {}, uid=0, now=0.1, wall=WALL0)
    assert reply["change"] == "no reload pins"


def test_an_edit_after_the_last_table_version_is_refused_not_a_crash() -> None:
    """Issue 11 item 2: a table at the top version made every later edit raise struct.error
    out of the control handler. Now versions are u64, peers cannot jump there (test_core),
    and a saved table at the very top makes an edit a clear refusal."""
    shell = started()
    top = Overrides(MAX_VERSION, "n01", (), ("n02",))
    shell.node.load_overrides(top)
    with pytest.raises(CommandRejected, match="last version"):
        shell.node.command("drain", {"node": "n02", "drained": False}, uid=0, now=2, wall=2)
    assert shell.node.core.overrides == top


def test_hooks_never_hold_back_the_kernel() -> None:
    """`up`/`down` hooks are notifications (docs/configuration.md#hooks): each is ordered in
    the same step as its group's first claim or release, and nothing waits for it to end (the
    node has no input for a finished hook), so the addresses are in the kernel while it runs."""
    shell = Shell()
    shell.do(shell.node.start(now=0.0, wall=WALL0))
    shell.hold = True  # keep every kernel job in flight: only orders given so far count
    shell.run(SPEC.timing.mature_after + 0.5)
    ups = {h.group for h in shell.orders(o.RunHook) if isinstance(h, o.RunHook)}
    claims = [c for c in shell.held_back if isinstance(c, o.ClaimAddress)]
    assert ups and {c.group for c in claims} <= ups
    assert claims, "the first claim goes out with the up hooks, not after they finish"
    first = shell.log.index(claims[0])
    assert all(
        shell.log.index(h) < first for h in shell.orders(o.RunHook) if isinstance(h, o.RunHook)
    )

    shell.hold = False
    for job in shell.held_back:
        shell.answer(job)
    shell.held_back.clear()
    shell.do([])
    assert shell.node.held_groups() == ups
    shell.log.clear()
    shell.hold = True
    shell.do(shell.node.stop(now=shell.now, wall=shell.wall))
    downs = [h for h in shell.orders(o.RunHook) if isinstance(h, o.RunHook)]
    releases = [r for r in shell.held_back if isinstance(r, o.ReleaseAddress)]
    assert {h.event for h in downs} == {"down"} and releases
    assert shell.log.index(downs[-1]) < shell.log.index(releases[0])
