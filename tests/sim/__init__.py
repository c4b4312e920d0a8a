"""Deterministic simulator of N vipd nodes: the shipped `vipd.node.node.Node` each, driven
by a shell on a virtual clock, with a simulated network and kernel.

Modules:

- `tests.sim.cluster`: deterministic keys and configs for a simulated cluster.
- `tests.sim.simulator`: the virtual clock, network, nodes, announcer, client and faults.
- `tests.sim.invariants`: the checker for I1-I6 and liveness, run after every step, and the
  list of known vipd defects it recognises.
- `tests.sim.schedules`: seeded random fault schedules and the one-seed runner.
- `tests.sim.harness`: helpers for hand-written scenarios.

Tests: `test_scenarios` (each design fault by hand), `test_random` (seeded schedules),
`test_scale` (256 and 64 nodes), `test_mutations` (injected bugs must be caught),
`test_defects` (reproductions of the vipd defects found, kept as regression tests).

Run: ``.venv/bin/pytest tests/sim``. Replay a seed: ``VIPD_SIM_SEED=1234 .venv/bin/pytest -s
tests/sim/test_random.py -k schedules`` (or ``.venv/bin/python -m tests.sim.schedules 1234``);
longer hunt: ``VIPD_SIM_SEEDS=20000``; see test_random.py for the other variables.
"""
