"""What the pure node asks its shell to do: typed, frozen orders, carried out in list order.

The node (`vipd.node.node.Node`) never touches a socket, a clock, a thread or a file. Every
input returns a list of these; the daemon (`vipd.daemon`) turns them into netlink, scapy,
subprocess and socket calls, and the simulator (`tests.sim`) into events on its virtual
clock. Kernel work (`ListAddresses`, `ClaimAddress`, `ReleaseAddress`) is answered with
`Node.kernel_listing` / `Node.kernel_result`; the node never has two of those in flight.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from vipd.config import IPInterface
from vipd.membership.events import Event
from vipd.placement.handover import ClaimAddress, ReleaseAddress
from vipd.placement.overrides import Overrides

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

__all__ = [
    "Announce",
    "AnnounceOnce",
    "CancelAnnounce",
    "ClaimAddress",
    "DefendTimer",
    "Exit",
    "ListAddresses",
    "Log",
    "Notify",
    "OpenTransport",
    "Order",
    "ReleaseAddress",
    "RunHook",
    "SaveOverrides",
    "SendDatagram",
    "SetTimer",
    "Timer",
    "TimerKey",
    "WatchConflicts",
]


class Timer(enum.Enum):
    MEMBERSHIP = "membership"  # the core's heartbeat/liveness timer (`core.get_timer()`)
    DEADLINE = "deadline"  # handover timeouts and the stop bound


@dataclass(frozen=True, slots=True)
class DefendTimer:
    """When to announce `address` once more after a conflict (`DefendPolicy`)."""

    address: IPAddress


TimerKey = Timer | DefendTimer


@dataclass(frozen=True, slots=True)
class SetTimer:
    """Call `Node.handle_timer(timer)` at loop time `when`; None cancels. A timer key has
    at most one pending expiry: a new SetTimer replaces the old one."""

    timer: TimerKey
    when: float | None


@dataclass(frozen=True, slots=True)
class ListAddresses:
    """List the pool addresses the kernel has (and this node's MAC) per interface, then call
    `Node.kernel_listing`."""

    interfaces: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Announce:
    """Gratuitous ARP / unsolicited NA now and at the configured repeats (restarts them)."""

    interface: str
    address: IPInterface


@dataclass(frozen=True, slots=True)
class AnnounceOnce:
    """One announcement, the repeat schedule untouched (defence, refresh)."""

    interface: str
    address: IPInterface


@dataclass(frozen=True, slots=True)
class CancelAnnounce:
    """Stop the pending repeats for an address (it is being released or moving away)."""

    address: IPInterface


@dataclass(frozen=True, slots=True)
class WatchConflicts:
    """Listen on `interface` for other MACs announcing these addresses (ours: `mac`)."""

    interface: str
    addresses: frozenset[IPAddress]
    mac: bytes | None


@dataclass(frozen=True, slots=True)
class RunHook:
    event: str  # up, down, post_up, post_down
    group: str
    addresses: tuple[IPInterface, ...]
    interface: str
    reason: str


@dataclass(frozen=True, slots=True)
class SendDatagram:
    """One heartbeat to every destination of the transport."""

    data: bytes


@dataclass(frozen=True, slots=True)
class OpenTransport:
    """Start stale cleanup is over: open the heartbeat socket and start taking part."""


@dataclass(frozen=True, slots=True)
class SaveOverrides:
    table: Overrides


@dataclass(frozen=True, slots=True)
class SaveIncarnation:
    """This run took a new incarnation (above a second instance's): record it in
    `state_dir`, so that the next start is above it too."""

    incarnation: int


@dataclass(frozen=True, slots=True)
class SaveSeen:
    """Record in `state_dir` what each peer last sent us (`MembershipCore.seen`), so that a
    restart of this node still refuses captures of it."""

    seen: tuple[tuple[str, int, int], ...]  # (peer, incarnation, send time in ms)


@dataclass(frozen=True, slots=True)
class Notify:
    """A systemd notification (READY=1, STOPPING=1, WATCHDOG=1...)."""

    text: str


@dataclass(frozen=True, slots=True)
class Log:
    """One log line. `limit_key`: rate-limited per key (floods of one kind of line)."""

    level: str  # debug, info, warning, error
    event: str
    fields: Mapping[str, object] = field(default_factory=dict)
    limit_key: str | None = None
    source: Event | None = None  # the core event this line reports, if it reports one


@dataclass(frozen=True, slots=True)
class Exit:
    """Everything is released (or the stop bound passed) and the last heartbeat is out."""

    reason: str


Order = (
    ListAddresses
    | ClaimAddress
    | ReleaseAddress
    | Announce
    | AnnounceOnce
    | CancelAnnounce
    | WatchConflicts
    | RunHook
    | SendDatagram
    | OpenTransport
    | SetTimer
    | SaveOverrides
    | SaveIncarnation
    | SaveSeen
    | Notify
    | Log
    | Exit
)
