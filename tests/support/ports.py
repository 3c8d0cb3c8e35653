"""Free TCP ports for the processes the test suite starts itself."""

from __future__ import annotations

import socket


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now.

    The kernel picks the port (bind to port 0), so two calls in a row do not collide and
    the well-known ports of whatever runs on the machine (1883, 5432) are never chosen.
    The port is released before the caller binds it, so another process could take it
    in between: the starters in this package retry on a new port when their first bind
    fails, which closes that window in practice.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
