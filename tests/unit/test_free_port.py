"""sandbox.world.free_port: ports for listeners bound later are picked below the ephemeral
range, where no outgoing connection's local port can take them in between."""

from __future__ import annotations

import socket
from pathlib import Path

from gateway.sandbox.world import free_port


def test_ports_are_below_the_ephemeral_range_free_and_never_handed_out_twice() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(100)]
    assert all(1_024 <= p < low for p in ports), (low, ports)
    assert len(set(ports)) == len(ports)  # picked but not yet bound: still never twice
    for p in ports[:10]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # free: a listener can bind it
