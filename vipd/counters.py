"""The node's counters: one object owns them, and they change only through it.

Plain counters (`claims`, `rx_accepted`, ...) appear once first incremented; the rejection
counts have every `Reject` reason from the start (a zero is an answer an operator reads).
The node creates one `Counters` and shares it with its membership core; the shells report
through the node's inputs (e.g. `Node.send_failed`), never by writing a counter themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from vipd.membership.wire import Reject


class Counters:
    __slots__ = ("_plain", "_rejected")

    def __init__(self) -> None:
        self._plain: dict[str, int] = {}
        self._rejected: dict[str, int] = {r.value: 0 for r in Reject}

    def inc(self, name: str, n: int = 1) -> None:
        self._plain[name] = self._plain.get(name, 0) + n

    def set(self, name: str, value: int) -> None:
        """A gauge read elsewhere (the kernel's drop count for our socket)."""
        self._plain[name] = value

    def reject(self, reason: Reject) -> None:
        self._rejected[reason.value] += 1

    def __getitem__(self, name: str) -> int:
        return self._plain.get(name, 0)

    def as_dict(self) -> dict[str, int]:
        return dict(self._plain)

    def rejected(self) -> dict[str, int]:
        return dict(self._rejected)

    @property
    def rejections(self) -> Mapping[str, int]:
        """Read-only live view of the rejection counts, by reason."""
        return MappingProxyType(self._rejected)
