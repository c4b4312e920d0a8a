"""Claiming and releasing addresses in the kernel (rtnetlink via pyroute2).

Threading model: one synchronous pyroute2 ``IPRoute`` owned by one dedicated worker
thread (``ThreadPoolExecutor(max_workers=1)``), reached with ``loop.run_in_executor``.
We chose this over pyroute2 0.9's ``AsyncIPRoute`` because:

* ``AsyncIPRoute`` runs its netlink transport on the caller's event loop and its docstring
  still warns that parts of the core use the old synchronous API during the refactoring;
  a slow or stuck netlink exchange must never stall heartbeats, so it stays off our loop.
* One worker thread serializes every request (add, remove, dump), so the ifname->index
  cache needs no lock and requests never interleave on one socket.
* The sync ``IPRoute`` drives its own private event loop, which must stay in the thread
  that created it; creating it lazily *inside* the worker satisfies that.

The socket is opened with ``groups=0``: pyroute2's default subscribes to link, address,
route and neighbour broadcasts, which nothing here reads and which would pile up in
pyroute2's queue for the life of the daemon.

Errors: EEXIST on add and EADDRNOTAVAIL on remove mean "already so" and return False; a
missing interface raises ``InterfaceMissing``; anything else raises ``AddressError``
naming the operation, the address, the interface and the errno text. A request whose
awaiting task is cancelled still runs to completion in the worker (netlink requests
cannot be taken back); the reconcile timer repairs any drift that leaves behind.

IPv6 addresses whose duplicate address detection failed (IFA_F_DADFAILED: someone added
the address without ``nodad`` while another host answered for it) stay in the kernel's list
but are never used, so for the daemon they are missing: ``list_addresses`` leaves them out.
The next ``add`` of such an address meets EEXIST; it then removes the dead copy (with
whatever prefix it has) and adds the address again with IFA_F_NODAD, logs
``dadfailed_recovered`` and returns True. An EEXIST for a usable (or still tentative)
address remains "already so" (False); a failure of either recovery step is an
``AddressError`` with op "add", like any other refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import socket
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from vipd.config import IPInterface

IFA_F_NODAD = 0x02  # <linux/if_addr.h>: skip duplicate address detection
IFA_F_DADFAILED = 0x08  # <linux/if_addr.h>: DAD found a duplicate; the kernel won't use it
IFNAMSIZ = 16  # <linux/if.h>: interface names and IPv4 labels, including the NUL
LABEL_SUFFIX = ":vip"
RT_SCOPE_UNIVERSE = 0  # "global" in `ip addr`

_LINK_LOCAL_V6 = ipaddress.IPv6Network("fe80::/10")

T = TypeVar("T")

log = structlog.get_logger()


class AddressError(Exception):
    """A netlink request about an address failed for a reason other than "already so"."""

    def __init__(
        self,
        message: str,
        *,
        op: str | None = None,
        interface: str | None = None,
        address: IPInterface | None = None,
        errno: int | None = None,
    ) -> None:
        super().__init__(message)
        self.op = op
        self.interface = interface
        self.address = address
        self.errno = errno


class InterfaceMissing(AddressError):
    """The named interface does not exist (in this network namespace)."""

    def __init__(
        self, interface: str, *, op: str | None = None, address: IPInterface | None = None
    ) -> None:
        detail = f" ({op} {address})" if op and address is not None else f" ({op})" if op else ""
        super().__init__(
            f"interface {interface!r} does not exist{detail}",
            op=op,
            interface=interface,
            address=address,
            errno=errno.ENODEV,
        )


class AddressManager(Protocol):
    """The kernel's view of the addresses on an interface (see docs/internals.md)."""

    async def list_addresses(self, interface: str) -> set[IPInterface]:
        """Global-scope addresses on the interface (no link-local, no IPv6 dadfailed), with
        prefix lengths."""
        ...

    async def add(self, interface: str, address: IPInterface) -> bool:
        """Add the address; False when it was already there."""
        ...

    async def remove(self, interface: str, address: IPInterface) -> bool:
        """Remove the address; False when it was already absent."""
        ...

    async def mac_address(self, interface: str) -> bytes:
        """The interface's 6-byte hardware address."""
        ...

    def close(self) -> None: ...


def vip_label(interface: str) -> str | None:
    """`<ifname>:vip` for IPv4 addresses, or None when it exceeds the kernel's 15 bytes.

    The label lets operators (and `ip addr show label 'eth0:vip'`) tell our addresses from
    the node's own; the kernel rejects labels of IFNAMSIZ bytes or more.
    """
    label = interface + LABEL_SUFFIX
    return label if len(label.encode()) < IFNAMSIZ else None


def _errno_text(code: int) -> str:
    name = errno.errorcode.get(code, "?")
    return f"{name} ({code}): {os.strerror(code)}"


def _mac_bytes(text: str | None) -> bytes | None:
    if not text:
        return None
    raw = bytes.fromhex(text.replace(":", ""))
    return raw if len(raw) == 6 else None


class NetlinkAddressManager:
    """`AddressManager` on the kernel of the calling process's network namespace."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vipd-netlink")
        # Both touched only from the worker thread.
        self._ipr: IPRoute | None = None
        self._index: dict[str, int] = {}
        self._closed = False

    # -- async API (event loop side) ------------------------------------------------------

    async def list_addresses(self, interface: str) -> set[IPInterface]:
        return await self._call(self._list_sync, interface)

    async def add(self, interface: str, address: IPInterface) -> bool:
        return await self._call(self._add_sync, interface, address)

    async def remove(self, interface: str, address: IPInterface) -> bool:
        return await self._call(self._remove_sync, interface, address)

    async def mac_address(self, interface: str) -> bytes:
        return await self._call(self._mac_sync, interface)

    def close(self) -> None:
        """Close the netlink socket after already queued requests; idempotent, non-blocking."""
        if self._closed:
            return
        self._closed = True
        self._executor.submit(self._close_sync)
        self._executor.shutdown(wait=False)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise AddressError("address manager is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    # -- worker thread side ---------------------------------------------------------------

    def _netlink(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = IPRoute(groups=0)
        return self._ipr

    def _drop_socket(self) -> None:
        # After a transport error pyroute2 refuses further requests on that object; the
        # next request opens a fresh socket instead of failing forever.
        ipr, self._ipr = self._ipr, None
        if ipr is not None:
            with contextlib.suppress(OSError):
                ipr.close()

    def _close_sync(self) -> None:
        self._drop_socket()
        self._index.clear()

    def _link(self, interface: str, op: str, address: IPInterface | None) -> Any:
        """RTM_GETLINK by name (one request, not a dump); refreshes the index cache."""
        try:
            msgs = self._netlink().link("get", ifname=interface)
        except NetlinkError as exc:
            self._index.pop(interface, None)
            # ERANGE: a name too long to exist at all.
            if exc.code in (errno.ENODEV, errno.ERANGE):
                raise InterfaceMissing(interface, op=op, address=address) from None
            raise self._error(op, interface, address, exc.code) from exc
        except OSError as exc:
            self._drop_socket()
            raise self._error(op, interface, address, exc.errno or errno.EIO) from exc
        msg = msgs[0]
        self._index[interface] = msg["index"]
        return msg

    def _resolve(self, interface: str, op: str, address: IPInterface | None) -> int:
        cached = self._index.get(interface)
        if cached is not None:
            return cached
        index: int = self._link(interface, op, address)["index"]
        return index

    def _error(
        self, op: str, interface: str, address: IPInterface | None, code: int
    ) -> AddressError:
        what = f"{op} {address} on {interface}" if address is not None else f"{op} on {interface}"
        return AddressError(
            f"{what} failed: {_errno_text(code)}",
            op=op,
            interface=interface,
            address=address,
            errno=code,
        )

    def _with_index(
        self,
        op: str,
        interface: str,
        address: IPInterface,
        request: Callable[[IPRoute, int], T],
    ) -> T:
        """Run `request` on the cached index; on ENODEV re-resolve once (recreated link)."""
        index = self._resolve(interface, op, address)
        for attempt in (0, 1):
            try:
                return request(self._netlink(), index)
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise self._error(op, interface, address, exc.code) from exc
                self._index.pop(interface, None)
                if attempt == 1:
                    break
                fresh = self._resolve(interface, op, address)  # InterfaceMissing if gone
                if fresh == index:
                    break
                log.info(
                    "interface_recreated",
                    interface=interface,
                    old_index=index,
                    new_index=fresh,
                    op=op,
                    address=str(address),
                )
                index = fresh
            except OSError as exc:
                self._drop_socket()
                raise self._error(op, interface, address, exc.errno or errno.EIO) from exc
        raise InterfaceMissing(interface, op=op, address=address)

    def _add_sync(self, interface: str, address: IPInterface) -> bool:
        attrs: dict[str, Any] = {"address": str(address.ip), "prefixlen": address.network.prefixlen}
        if address.version == 4:
            label = vip_label(interface)
            if label is not None:
                attrs["label"] = label
        else:
            # Without NODAD the address stays "tentative" for ~1 s and cannot be used as
            # a source or answer neighbour solicitations: a failover gap for nothing.
            attrs["flags"] = IFA_F_NODAD

        def request(ipr: IPRoute, index: int) -> bool:
            try:
                ipr.addr("add", index=index, **attrs)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
                if address.version == 6:
                    return self._recover_dadfailed(ipr, index, interface, address, attrs)
                return False
            return True

        return self._with_index("add", interface, address, request)

    def _recover_dadfailed(
        self,
        ipr: IPRoute,
        index: int,
        interface: str,
        address: IPInterface,
        attrs: dict[str, Any],
    ) -> bool:
        """After EEXIST on an IPv6 add: replace a dadfailed copy (True), else False."""
        dead = None
        # Consume the whole dump: a half-read one would leave messages on the socket.
        for msg in list(ipr.addr("dump", index=index, family=socket.AF_INET6)):
            if (
                msg.get("index") == index
                and ifa_flags(msg) & IFA_F_DADFAILED
                and (found := ifa_address(msg)) is not None
                and found.ip == address.ip
            ):
                dead = msg
                break
        if dead is None:
            return False  # present and usable (or tentative): "already so"
        try:
            ipr.addr("del", index=index, address=str(address.ip), prefixlen=dead["prefixlen"])
        except NetlinkError as exc:
            if exc.code != errno.EADDRNOTAVAIL:  # gone meanwhile: just add it
                raise
        ipr.addr("add", index=index, **attrs)  # EEXIST now is a race: AddressError
        log.info(
            "dadfailed_recovered",
            interface=interface,
            address=str(address),
            old_prefixlen=dead["prefixlen"],
        )
        return True

    def _remove_sync(self, interface: str, address: IPInterface) -> bool:
        def request(ipr: IPRoute, index: int) -> bool:
            try:
                ipr.addr(
                    "del",
                    index=index,
                    address=str(address.ip),
                    prefixlen=address.network.prefixlen,
                )
            except NetlinkError as exc:
                if exc.code == errno.EADDRNOTAVAIL:
                    return False
                raise
            return True

        return self._with_index("remove", interface, address, request)

    def _list_sync(self, interface: str) -> set[IPInterface]:
        # Always re-resolve: a dump on a stale index would silently return nothing.
        index = self._link(interface, "list", None)["index"]
        try:
            msgs = list(self._netlink().addr("dump", index=index))
        except NetlinkError as exc:
            raise self._error("list", interface, None, exc.code) from exc
        except OSError as exc:
            self._drop_socket()
            raise self._error("list", interface, None, exc.errno or errno.EIO) from exc
        return set(_parse_addresses(msgs, index))

    def _mac_sync(self, interface: str) -> bytes:
        link = self._link(interface, "mac_address", None)
        mac = _mac_bytes(link.get("IFLA_ADDRESS"))
        if mac is None:
            raise AddressError(
                f"interface {interface!r} has no 6-byte hardware address",
                op="mac_address",
                interface=interface,
            )
        return mac


def ifa_flags(msg: Any) -> int:
    """IFA_F_* bits of an ifaddrmsg: IFA_FLAGS (all 32) when present, else the header's 8."""
    flags = msg.get("IFA_FLAGS")
    if flags is None:
        flags = msg.get("flags") or 0
    return int(flags)


def _parse_addresses(msgs: Iterable[Any], index: int) -> Iterable[IPInterface]:
    for msg in msgs:
        if msg.get("index") != index or msg.get("scope") != RT_SCOPE_UNIVERSE:
            continue
        if ifa_flags(msg) & IFA_F_DADFAILED:
            continue  # the kernel never uses it: for the daemon the address is missing
        iface = ifa_address(msg)
        if iface is None or (iface.version == 6 and iface.ip in _LINK_LOCAL_V6):
            continue
        yield iface


def ifa_address(msg: Any) -> IPInterface | None:
    """The address (with prefix length) of an ifaddrmsg; None if it has none or is garbled.

    IFA_LOCAL is our side; IFA_ADDRESS is the peer on point-to-point links (and the only one
    for IPv6)."""
    text = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
    if not text:
        return None
    try:
        return ipaddress.ip_interface(f"{text}/{msg['prefixlen']}")
    except (KeyError, TypeError, ValueError):
        return None
