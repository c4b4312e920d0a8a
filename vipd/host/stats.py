"""Local load figures for the heartbeat (mod_backhand's stats announcer), read from /proc.

Worker counts, arriba and request figures are left at 0 until a web-server integration feeds
them; the candidacy functions treat 0 as "unknown".
"""

from __future__ import annotations

import os
from pathlib import Path

from vipd.membership.wire import Stats

_U32 = 0xFFFFFFFF


class StatsCollector:
    def __init__(self, proc: Path = Path("/proc")) -> None:
        self._proc = proc
        self._last_cpu: tuple[int, int] | None = None

    def collect(self) -> Stats:
        return Stats(
            load_milli=min(_U32, int(self._loadavg() * 1000)),
            cpu_idle_permille=self._cpu_idle_permille(),
            ncpu=min(0xFFFF, os.cpu_count() or 0),
            mem_total=self._meminfo("MemTotal"),
            mem_available=self._meminfo("MemAvailable"),
        )

    def _read(self, name: str) -> str:
        try:
            return (self._proc / name).read_text()
        except OSError:
            return ""

    def _loadavg(self) -> float:
        fields = self._read("loadavg").split()
        try:
            return float(fields[0])
        except (IndexError, ValueError):
            return 0.0

    def _meminfo(self, key: str) -> int:
        for line in self._read("meminfo").splitlines():
            name, _, rest = line.partition(":")
            if name == key:
                parts = rest.split()
                return int(parts[0]) * 1024 if parts and parts[0].isdigit() else 0
        return 0

    def _cpu_idle_permille(self) -> int:
        """Idle share since the previous call (first call: since boot)."""
        first = self._read("stat").split("\n", 1)[0].split()
        if len(first) < 5 or first[0] != "cpu":
            return 0
        ticks = [int(x) for x in first[1:] if x.isdigit()]
        total, idle = sum(ticks), ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        if self._last_cpu is not None:
            dt, di = total - self._last_cpu[0], idle - self._last_cpu[1]
            self._last_cpu = (total, idle)
            return max(0, min(1000, di * 1000 // dt)) if dt > 0 else 0
        self._last_cpu = (total, idle)
        return max(0, min(1000, idle * 1000 // total)) if total else 0
