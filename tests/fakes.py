"""In-memory fakes of the daemon's kernel-facing Protocols, for tests and benchmarks.

`FakeAddressManager` stands in for `vipd.kernel.addresses.AddressManager`, `FakeAnnouncer`
for `vipd.arp.announcer.Announcer`.
"""

from __future__ import annotations

from collections.abc import Mapping

from vipd.config import IPInterface
from vipd.kernel.addresses import AddressError, InterfaceMissing


class FakeAddressManager:
    """In-memory `AddressManager` for unit tests; mirrors the kernel's idempotency rules.

    IPv4 addresses are distinct per (address, prefix) like the kernel's; an IPv6 address
    exists once whatever its prefix (a second add is EEXIST). Removal needs the exact
    prefix. An IPv6 address marked with `mark_dadfailed` is left out of `list_addresses`
    and replaced by the next `add` (True), like the kernel manager's recovery. Every call
    is appended to `calls` as (op, interface, address-or-None).
    """

    DEFAULT_MAC = bytes.fromhex("020000000001")

    def __init__(self, interfaces: Mapping[str, bytes] | None = None) -> None:
        self.macs: dict[str, bytes] = dict(interfaces or {"eth0": self.DEFAULT_MAC})
        self.addresses: dict[str, set[IPInterface]] = {name: set() for name in self.macs}
        self.calls: list[tuple[str, str, IPInterface | None]] = []
        self.dadfailed: dict[str, set[IPInterface]] = {}
        self.closed = False
        self._failures: dict[str, list[BaseException]] = {}

    # -- test controls --------------------------------------------------------------------

    def fail_next(self, op: str, exc: BaseException) -> None:
        """Make the next call of `op` ("add", "remove", "list", "mac_address") raise `exc`."""
        self._failures.setdefault(op, []).append(exc)

    def add_interface(self, name: str, mac: bytes = DEFAULT_MAC) -> None:
        self.macs[name] = mac
        self.addresses.setdefault(name, set())

    def mark_dadfailed(self, interface: str, address: IPInterface) -> None:
        """Put an IPv6 address on `interface` in the kernel's dadfailed state."""
        if address.version != 6:
            raise ValueError(f"only IPv6 addresses have DAD, not {address}")
        self.addresses[interface].add(address)
        self.dadfailed.setdefault(interface, set()).add(address)

    def remove_interface(self, name: str) -> None:
        """Like `ip link del`: the interface and its addresses disappear."""
        self.macs.pop(name, None)
        self.addresses.pop(name, None)
        self.dadfailed.pop(name, None)

    # -- AddressManager -------------------------------------------------------------------

    def _enter(self, op: str, interface: str, address: IPInterface | None) -> set[IPInterface]:
        self.calls.append((op, interface, address))
        if self.closed:
            raise AddressError("address manager is closed")
        pending = self._failures.get(op)
        if pending:
            raise pending.pop(0)
        if interface not in self.macs:
            raise InterfaceMissing(interface, op=op, address=address)
        return self.addresses[interface]

    async def list_addresses(self, interface: str) -> set[IPInterface]:
        return self._enter("list", interface, None) - self.dadfailed.get(interface, set())

    async def add(self, interface: str, address: IPInterface) -> bool:
        held = self._enter("add", interface, address)
        failed = self.dadfailed.get(interface, set())
        dead = {a for a in failed if a.ip == address.ip}
        if dead:
            held -= dead
            failed -= dead
            held.add(address)
            return True
        if address in held or (
            address.version == 6 and any(a.version == 6 and a.ip == address.ip for a in held)
        ):
            return False
        held.add(address)
        return True

    async def remove(self, interface: str, address: IPInterface) -> bool:
        held = self._enter("remove", interface, address)
        if address not in held:
            return False
        held.remove(address)
        self.dadfailed.get(interface, set()).discard(address)
        return True

    async def mac_address(self, interface: str) -> bytes:
        self._enter("mac_address", interface, None)
        return self.macs[interface]

    def close(self) -> None:
        self.closed = True


class FakeAnnouncer:
    """In-memory `Announcer` for unit tests.

    `calls` records ("announce", interface, address), ("once", interface, address),
    ("cancel", None, address) and ("close", None, None); `active` maps addresses whose
    schedule would still be running to their interface (`announce_once` leaves it alone).
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None, IPInterface | None]] = []
        self.active: dict[IPInterface, str] = {}
        self.frames_sent: dict[IPInterface, int] = {}
        self.notify_sent = 0
        self.notify_dropped = 0
        self.closed = False

    def announce(self, interface: str, address: IPInterface) -> None:
        self.calls.append(("announce", interface, address))
        self.active[address] = interface
        self.frames_sent[address] = self.frames_sent.get(address, 0) + 1

    def announce_once(self, interface: str, address: IPInterface) -> None:
        self.calls.append(("once", interface, address))
        self.frames_sent[address] = self.frames_sent.get(address, 0) + 1

    def cancel(self, address: IPInterface) -> None:
        self.calls.append(("cancel", None, address))
        self.active.pop(address, None)

    def close(self) -> None:
        self.calls.append(("close", None, None))
        self.active.clear()
        self.closed = True

    def announced(self, address: IPInterface) -> int:
        """How many times `address` was announced (claims: `announce`)."""
        return sum(1 for op, _, a in self.calls if op == "announce" and a == address)

    def announced_once(self, address: IPInterface) -> int:
        """How many one-shot announcements (`announce_once`) `address` got."""
        return sum(1 for op, _, a in self.calls if op == "once" and a == address)
