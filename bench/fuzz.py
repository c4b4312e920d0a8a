"""Long-run fuzzer for the heartbeat decoder and the control protocol.

Run from the repository root::

    .venv/bin/python -m bench.fuzz --target wire --seconds 600
    .venv/bin/python -m bench.fuzz --target control --seconds 600

Options: ``--runs N`` (stop after N inputs instead), ``--engine auto|atheris|hypothesis``,
``--seed N`` (hypothesis engine), ``--findings DIR`` (where inputs that raised go; default a
new temporary directory). Exit status 1 if any input raised an exception that is not a known
bug (see KNOWN), 0 otherwise.

Engines:

- atheris (coverage-guided libFuzzer, used when ``import atheris`` works): vipd's modules are
  instrumented, libFuzzer mutates raw bytes starting from ``tests/fuzz/corpus/<target>/`` and
  keeps every input that reaches new code in ``<findings>/corpus``.
- hypothesis (fallback): random generation with a large example count, in chunks until the
  time is up: raw bytes, the corpus files, their mutations, and (wire) the flood generator of
  the fuzz tests.

Each input goes through the same checks as ``tests/fuzz`` (``kit.WireHarness`` and
``kit.ControlHarness``): for wire, the decoder on its own (only DecodeError may come out) and
then one long-lived receiver core, as is and re-signed with a member's key, with its
accounting checked on every datagram and its events drained as the daemon drains them; for
control, ``handle_line`` as root and as a user. An assertion failure counts like any other
exception. At the end a table: inputs run, outcomes, exceptions by type, resident memory.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import random
import resource
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "fuzz" / "corpus"
#: Exceptions that are known, reported bugs (each has a strict-xfail test): listed in the
#: table, not counted as new findings.
KNOWN: dict[tuple[str, str], str] = {}  # none open
MAX_LEN = {"wire": 2048, "control": 8192}
SAVED_PER_TYPE = 5
SAMPLE_EVERY = 10.0  # seconds between resident-memory samples


def rss_mb() -> float:
    """Current resident set size (not the peak), from /proc."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Runner:
    """Feeds inputs to a harness, counts, catches and saves what raises, samples memory."""

    def __init__(
        self,
        target: str,
        harness: Callable[[bytes], None],
        findings: Path,
        seconds: float | None,
        runs: int | None,
    ) -> None:
        self.target = target
        self.harness = harness
        self.findings = findings
        self.deadline = time.monotonic() + seconds if seconds is not None else None
        self.runs = runs
        self.inputs = 0
        self.errors: Counter[str] = Counter()
        self.samples: list[tuple[float, int, float]] = []
        self.started = time.monotonic()
        self._next_sample = self.started

    def one(self, data: bytes) -> None:
        self.inputs += 1
        try:
            self.harness(data)
        except Exception as e:
            name = type(e).__name__
            self.errors[name] += 1
            if self.errors[name] <= SAVED_PER_TYPE:
                stem = f"{name}-{self.errors[name]}"
                (self.findings / f"{stem}.bin").write_bytes(data)
                (self.findings / f"{stem}.txt").write_text(traceback.format_exc())
        now = time.monotonic()
        if now >= self._next_sample:
            self.samples.append((now - self.started, self.inputs, rss_mb()))
            self._next_sample = now + SAMPLE_EVERY

    def done(self) -> bool:
        if self.runs is not None and self.inputs >= self.runs:
            return True
        return self.deadline is not None and time.monotonic() >= self.deadline

    def unexpected(self) -> int:
        return sum(n for name, n in self.errors.items() if (self.target, name) not in KNOWN)

    def report(self, engine: str, outcomes: Counter[str]) -> None:
        elapsed = time.monotonic() - self.started
        self.samples.append((elapsed, self.inputs, rss_mb()))
        rows: list[tuple[str, str]] = [
            ("target / engine", f"{self.target} / {engine}"),
            ("time", f"{elapsed:.1f} s"),
            ("inputs run", f"{self.inputs:,} ({self.inputs / max(elapsed, 1e-9):,.0f}/s)"),
        ]
        for name, n in outcomes.most_common():
            rows.append((f"  outcome {name}", f"{n:,}"))
        if not self.errors:
            rows.append(("exceptions", "0"))
        for name, n in self.errors.most_common():
            known = KNOWN.get((self.target, name))
            rows.append((f"exception {name}", f"{n:,}" + (f"  (known: {known})" if known else "")))
        rows.append(("unexpected exceptions", str(self.unexpected())))
        first, last = self.samples[0], self.samples[-1]
        rows.append(("RSS first sample", f"{first[2]:.1f} MiB after {first[1]:,} inputs"))
        rows.append(("RSS at the end", f"{last[2]:.1f} MiB after {last[1]:,} inputs"))
        step = max(1, len(self.samples) // 8)
        trend = ", ".join(f"{t:.0f}s {m:.1f}" for t, _, m in self.samples[::step])
        rows.append(("RSS over time (MiB)", trend))
        peak = max(peak_rss_mb(), *(rss for _, _, rss in self.samples))
        rows.append(("peak RSS", f"{peak:.1f} MiB (getrusage ru_maxrss, or a later sample)"))
        if self.errors:
            rows.append(("findings", str(self.findings)))
        width = max(len(k) for k, _ in rows)
        print("\n".join(f"{k:<{width}}  {v}" for k, v in rows), flush=True)


def quiet_logs() -> None:
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def make_harness(target: str) -> tuple[Callable[[bytes], None], Callable[[], Counter[str]]]:
    from tests.fuzz import kit

    if target == "wire":
        wire_harness = kit.WireHarness()
        return wire_harness, wire_harness.totals
    control_harness = kit.ControlHarness()
    return control_harness, lambda: control_harness.outcomes


# --- engines -------------------------------------------------------------------------------


def run_atheris(args: argparse.Namespace, findings: Path) -> int:
    import atheris

    # Instrument vipd (the code under test) before anything imports it.
    with atheris.instrument_imports(include=["vipd"]):
        for module in (
            "vipd.membership.wire",
            "vipd.membership.core",
            "vipd.membership.admission",
            "vipd.host.control",
        ):
            with contextlib.suppress(ImportError):  # admission: only in newer trees
                importlib.import_module(module)
    harness, outcomes = make_harness(args.target)
    runner = Runner(args.target, harness, findings, args.seconds, args.runs)

    def test_one_input(data: bytes) -> None:
        runner.one(data)
        if runner.done():
            runner.report("atheris (libFuzzer, coverage-guided)", outcomes())
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1 if runner.unexpected() else 0)  # libFuzzer never returns

    work = findings / "corpus"
    work.mkdir()
    libfuzzer = [
        sys.argv[0],
        f"-max_len={MAX_LEN[args.target]}",
        "-timeout=10",
        "-rss_limit_mb=4096",
        "-print_final_stats=1",
        str(work),  # the first directory receives new interesting inputs
        str(CORPUS / args.target),  # seeds, read only
    ]
    if args.seconds is not None:
        libfuzzer.insert(1, f"-max_total_time={int(args.seconds) + 60}")  # a backstop
    atheris.Setup(libfuzzer, test_one_input)
    atheris.Fuzz()
    return 0


def run_hypothesis(args: argparse.Namespace, findings: Path) -> int:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    from tests.fuzz import kit

    harness, outcomes = make_harness(args.target)
    runner = Runner(args.target, harness, findings, args.seconds, args.runs)
    seeds = list(kit.corpus(args.target).values())
    for data in seeds:
        runner.one(data)
    flood = kit.Flood(random.Random(args.seed))

    def generate(rng: random.Random, raw: bytes, how: int) -> bytes:
        if how == 0 or not seeds:
            return raw
        if how == 1:
            return kit.mutate(rng, rng.choice(seeds), rng.choice(seeds))
        if args.target == "wire":
            flood.rng = rng
            return flood.next()
        value: object = rng.choice([None, True, -1, 1e308, "é", [[[]]], {"cmd": "move"}])
        request = {"cmd": rng.choice(["status", "move", "x"]), "v": value}
        return kit.mutate(rng, json.dumps(request).encode())

    chunk = settings(
        max_examples=5000,
        deadline=None,
        database=None,
        derandomize=False,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )

    # Hypothesis draws a seed, the raw bytes and the kind; everything else comes from a
    # Random seeded with it, so the draws never depend on state kept between examples.
    @chunk
    @given(
        seed=st.integers(0, 2**64 - 1),
        raw=st.binary(max_size=MAX_LEN[args.target]),
        how=st.integers(0, 2),
    )
    def fuzz(seed: int, raw: bytes, how: int) -> None:
        if not runner.done():
            runner.one(generate(random.Random(seed), raw, how))

    while not runner.done():
        fuzz()
    runner.report("hypothesis (random generation, max_examples=5000 a chunk)", outcomes())
    return 1 if runner.unexpected() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", choices=("wire", "control"), required=True)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--engine", choices=("auto", "atheris", "hypothesis"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--findings", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.seconds is None and args.runs is None:
        args.seconds = 60.0
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # for tests.fuzz.kit when run as bench/fuzz.py
    engine = args.engine
    if engine == "auto":
        try:
            importlib.import_module("atheris")
            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
    findings = args.findings or Path(tempfile.mkdtemp(prefix=f"vipd-fuzz-{args.target}-"))
    findings.mkdir(parents=True, exist_ok=True)
    quiet_logs()
    if engine == "atheris":
        return run_atheris(args, findings)
    return run_hypothesis(args, findings)


if __name__ == "__main__":
    sys.exit(main())
