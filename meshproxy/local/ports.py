"""Free loopback ports for `meshproxy up`, avoiding the ones a Mesh file fixes."""

from __future__ import annotations

import socket


def free_port(taken: set[int], host: str = "127.0.0.1") -> int:
    """Return a port the kernel says is free on `host` and that is not in `taken`; add it.

    The port is released before it is used, so another program could take it in between;
    `meshproxy up` binds its children within a second, which makes that unlikely, and a child
    that fails to bind is reported.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port
    raise RuntimeError("no free port found")


def port_is_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
