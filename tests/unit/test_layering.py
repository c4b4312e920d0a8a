"""The folder layout is the architecture: pure modules import nothing that does IO.

Pure: `vipd/membership/`, `vipd/placement/`, `vipd/node/`, `vipd/counters.py`,
`vipd/memo.py`, `vipd/errors.py` (docs/internals.md, rule 1). `vipd/config.py` is pure but
for `load_config`, which reads the file, so it is held only to the IO-library rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

VIPD = Path(__file__).resolve().parents[2] / "vipd"
PURE = [
    *sorted((VIPD / "membership").glob("*.py")),
    *sorted((VIPD / "placement").glob("*.py")),
    *sorted((VIPD / "node").glob("*.py")),
    *(VIPD / name for name in ("counters.py", "memo.py", "errors.py")),
]
#: Libraries and modules that do IO (or read the clock) on import or use.
IO_MODULES = ("asyncio", "socket", "subprocess", "threading", "time", "select", "os", "shutil")
IO_PACKAGES: tuple[str, ...] = (
    *("pyroute2", "scapy", "structlog"),
    *("vipd.kernel", "vipd.arp", "vipd.host", "vipd.lab"),
    *("vipd.daemon", "vipd.vipctl", "vipd.__main__"),
)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def _forbidden(name: str) -> bool:
    return name in IO_MODULES or any(name == p or name.startswith(p + ".") for p in IO_PACKAGES)


@pytest.mark.parametrize("path", [p for p in PURE if p.exists()], ids=lambda p: p.name)
def test_a_pure_module_imports_no_io(path: Path) -> None:
    bad = sorted(n for n in _imports(path) if _forbidden(n))
    assert not bad, f"{path.relative_to(VIPD.parent)} is pure but imports {bad}"


def test_config_imports_no_io_library() -> None:
    bad = sorted(n for n in _imports(VIPD / "config.py") if _forbidden(n) and n != "os")
    assert not bad, f"vipd/config.py imports {bad}"


def test_the_check_can_fail() -> None:
    assert _forbidden("asyncio") and _forbidden("vipd.kernel.addresses")
    assert not _forbidden("vipd.membership.wire") and not _forbidden("timeit")
