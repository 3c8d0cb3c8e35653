"""The API's listening sockets, bound before anything else starts.

A port in use must fail the start at once, in one line, before the registry, the spool
and the workers are opened only to be closed again.
"""

from __future__ import annotations

import socket


def bind(host: str, port: int) -> list[socket.socket]:
    """One listening socket per address of `host` (as asyncio's create_server binds them).

    Raises OSError (address in use, unknown host, no permission); nothing stays open then.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # ::1 and 127.0.0.1 are two sockets; the IPv6 one must not claim both.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets
