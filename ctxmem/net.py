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


def unreachable(address: str, timeout: float = 5.0) -> str | None:
    """Why nothing answers at a Ray cluster ``address`` - "host:port" (its GCS) or "ray://host:port" (its
    client server) - and what to pass instead (the caller adds its own fallback), or None when something accepts a TCP connection there, or when the address is not
    one to probe ("auto", "local": Ray looks for the cluster itself). Ray's own connect retries without
    end where nothing listens, printing a warning every few seconds; this answers within ``timeout``."""
    target = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
            return None
    except OSError as err:
        return (f"no Ray cluster: nothing answers at {address} ({err.strerror or err}). Pass the address of a "
                "running cluster (`ray start --head` prints it)")
