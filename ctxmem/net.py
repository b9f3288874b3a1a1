"""Networking helpers shared by the stages, the benchmarks and the tests (standard library only)."""
from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on at `host` right now (the OS picks it; loopback by default).

    The port is released before it is returned, so another process could take it first: use it at
    once (a rendezvous, a test server), not as a reservation."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
