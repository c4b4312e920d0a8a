"""The namespace lab: real vipd daemons, a switch and a client on one machine (root).

- `topology`: namespaces, bridge, veth, fault helpers (`Lab`), kernel-table queries.
- `cluster`: keys, configs, daemon processes, status and kernel ownership (`LabCluster`).
- `probe`: 10 ms ICMP prober and the outage arithmetic.
- `arpwatch`: ARP / IPv6 NA capture and parser.
- `cli`: `vipctl lab up|status|fail|heal|down|demo`.

Used by `vipctl lab` and by `tests/netns/`. Standard library plus vipd only: no scapy here,
so the instruments do not share code (or bugs) with the announcer they check.
"""
