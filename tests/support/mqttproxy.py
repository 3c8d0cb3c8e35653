"""A TCP proxy in front of a real Mosquitto that plays the faults of a cloud broker.

The broker does the MQTT; the proxy reads the packets its clients send (fixed header and
remaining length, MQTT 3.1.1 section 2.2) so that it can, once: close a connection as it
arrives (a broker that is down behind its load balancer), answer a CONNECT with a CONNACK
refusing the credentials (return code 5, what Mosquitto answers a wrong password), drop a
PUBLISH (no PUBACK ever comes: a timeout), or reset the connection when a PUBLISH comes in.
`hold()` keeps every PUBLISH from the broker until `release()`. With `ssl`, the proxy is
the TLS end (mutual TLS, as AWS IoT's endpoint) and speaks plain MQTT to the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import Callable

HOST = "127.0.0.1"
CONNECT, PUBLISH = 1, 3
CONNACK_NOT_AUTHORIZED = bytes([0x20, 0x02, 0x00, 0x05])


async def _packet(reader: asyncio.StreamReader) -> bytes:
    """One MQTT control packet, whole; IncompleteReadError at the end of the stream."""
    header = await reader.readexactly(1)
    length, multiplier, raw = 0, 1, b""
    while True:
        byte = await reader.readexactly(1)
        raw += byte
        length += (byte[0] & 0x7F) * multiplier
        if not byte[0] & 0x80:
            break
        multiplier *= 128
    return header + raw + await reader.readexactly(length)


class MqttFaultProxy:
    def __init__(
        self,
        upstream_port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        authorize: Callable[[bytes], int] | None = None,
    ) -> None:
        self.upstream_port = upstream_port
        self._ssl = ssl_context
        # A cloud's own login check: the CONNECT packet → a CONNACK return code (0: accept).
        self.authorize = authorize
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.close_next_connection = False
        self.refuse_next_connect = False
        self.drop_next_publish = False
        self.reset_at_next_publish = False
        self.publishes = 0  # PUBLISH packets clients sent, forwarded or not
        self._released = asyncio.Event()
        self._released.set()
        self._changed = asyncio.Condition()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        # TLS is started per connection, so that a fault can close one before its handshake.
        self._server = await asyncio.start_server(self._serve, HOST, 0)

    async def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def hold(self) -> None:
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    async def wait_publishes(self, count: int, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.publishes >= count)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            if self.close_next_connection:
                self.close_next_connection = False
                return
            if self._ssl is not None:
                await writer.start_tls(self._ssl)
            connect = await _packet(reader)
            if self.refuse_next_connect and connect[0] >> 4 == CONNECT:
                self.refuse_next_connect = False
                writer.write(CONNACK_NOT_AUTHORIZED)
                await writer.drain()
                return
            code = self.authorize(connect) if self.authorize is not None else 0
            if code:
                writer.write(bytes([0x20, 0x02, 0x00, code]))
                await writer.drain()
                return
            up_reader, upstream = await asyncio.open_connection(HOST, self.upstream_port)
            self._writers.add(upstream)
            upstream.write(connect)
            back = asyncio.create_task(self._pipe(up_reader, writer))
            self._tasks.add(back)
            back.add_done_callback(self._tasks.discard)
            while True:
                packet = await _packet(reader)
                if packet[0] >> 4 == PUBLISH and await self._publish_fault(writer, upstream):
                    continue
                upstream.write(packet)
                await upstream.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            self._tasks.discard(task)
            for end in (writer, upstream):
                if end is not None:
                    self._writers.discard(end)
                    end.transport.abort()

    async def _publish_fault(
        self, writer: asyncio.StreamWriter, upstream: asyncio.StreamWriter
    ) -> bool:
        """True when the PUBLISH is not to be forwarded; raises to end the connection."""
        self.publishes += 1
        async with self._changed:
            self._changed.notify_all()
        if self.reset_at_next_publish:
            self.reset_at_next_publish = False
            raw = writer.get_extra_info("socket")
            if raw is not None:
                # Linger 0: close sends a RST, as a broker or a middlebox that resets does.
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raise ConnectionResetError("reset by the proxy")
        if self.drop_next_publish:
            self.drop_next_publish = False
            return True
        await self._released.wait()
        return False

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
