"""Fixtures for the real-kernel tests: a 3-node lab + client per test, real vipd daemons.

Every lab of one pytest run shares a run prefix ("vl" + 6 hex) followed by a two-digit
counter, so the session finalizer can remove anything a crashed test left behind without
touching other runs. When a test fails, the tails of the daemons' logs are attached to the
report (the log is what explains a failover test failure); with VIPD_LAB_KEEP_LOGS=DIR the
whole logs are also copied to DIR.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from vipd.lab.cluster import LabCluster
from vipd.lab.topology import Lab, list_namespaces, new_prefix, remove_namespaces

NETNS_SKIP_REASON = "netns tests need root and iproute2 (network namespaces, raw sockets)"
_cluster_key = pytest.StashKey[LabCluster]()
_counter = itertools.count(1)


def netns_available() -> bool:
    return (
        os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("bridge") is not None
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "lab(ipv6=False): options for the netns lab fixture")


@pytest.fixture(scope="session")
def run_prefix() -> Iterator[str]:
    if not netns_available():
        pytest.skip(NETNS_SKIP_REASON)
    prefix = new_prefix()
    yield prefix
    # Whatever a test left behind (it should be nothing), remove it and say so.
    leftovers = remove_namespaces(prefix)
    assert not leftovers, f"namespaces left behind by the tests (now removed): {leftovers}"


@pytest.fixture
def lab(run_prefix: str) -> Iterator[Lab]:
    built = Lab(nodes=3, prefix=f"{run_prefix}{next(_counter):02d}").build()
    try:
        yield built
    finally:
        built.teardown()
        left = [ns for ns in list_namespaces() if ns.startswith(built.prefix + "-")]
        assert not left, f"teardown left namespaces: {left}"


@pytest.fixture
def cluster(lab: Lab, request: pytest.FixtureRequest) -> Iterator[LabCluster]:
    """Three running daemons that have converged to one holder per address, 2 each."""
    marker = request.node.get_closest_marker("lab")
    ipv6 = bool(marker.kwargs.get("ipv6", False)) if marker else False
    with running(LabCluster(lab, ipv6=ipv6), request) as c:
        yield c


@contextlib.contextmanager
def running(
    c: LabCluster, request: pytest.FixtureRequest, converge: bool = True
) -> Iterator[LabCluster]:
    """Start every daemon of `c` (by default until one holder per address, balanced), attach
    it to the test so a failure report carries its logs, and always stop and remove it."""
    request.node.stash[_cluster_key] = c
    try:
        c.start_all()
        if converge:
            c.wait_converged(timeout=20.0, balanced=True)
        yield c
    finally:
        # SIGKILL: fast, and the namespaces (with any addresses left) go away next anyway.
        c.close(graceful=False)
        c.remove_workdir()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    c = item.stash.get(_cluster_key, None)
    if c is not None and report.failed and report.when in ("setup", "call"):
        # Read now: the finalizer deletes the work dir right after this hook.
        report.sections.append(("vipd daemon logs", c.logs_tail(lines=60)))
        keep = os.environ.get("VIPD_LAB_KEEP_LOGS")
        if keep:  # opt-in: whole logs for a post-mortem, outside the work dir that is removed
            dest = Path(keep) / f"{item.name}-{c.lab.prefix}"
            dest.mkdir(parents=True, exist_ok=True)
            for node in c.nodes:
                with contextlib.suppress(FileNotFoundError):
                    shutil.copy(c.log_path(node), dest / f"{node}.log")
            for helper in c.helpers:  # prober / arpwatch records, same monotonic clock
                with contextlib.suppress(FileNotFoundError):
                    shutil.copy(helper.path, dest / helper.path.name)
    return report
