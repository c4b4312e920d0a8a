"""The kernel's drop count for the heartbeat socket (a flood, a stalled loop), which the
daemon reports as rx_kernel_drops: datagrams the core never saw. Loopback only."""

from __future__ import annotations

import socket

from vipd.kernel.transport import kernel_drops


def test_kernel_drops_counts_what_a_full_receive_buffer_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum
        rx.bind(("127.0.0.1", 0))
        assert kernel_drops(rx) == 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            for _ in range(500):
                tx.sendto(b"x" * 1000, rx.getsockname())
        drops = kernel_drops(rx)
        assert drops is not None and 400 <= drops < 500  # a few fit, the rest were dropped
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as rx6:
        rx6.bind(("::1", 0))
        assert kernel_drops(rx6) == 0
