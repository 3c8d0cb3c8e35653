"""A TCP proxy in front of a real RabbitMQ that plays the faults of an AMQP 0.9.1 broker.

The broker does the AMQP; the proxy reads the frames clients send (the 8-byte protocol
header, then frames of type, channel, size, payload and the 0xCE end octet: AMQP 0.9.1
section 4.2.3) so that it can, once: close a connection as it arrives (a broker down behind
its load balancer), spoil the password of the next login (Connection.Start-Ok, class 10
method 11: RabbitMQ itself then refuses it with ACCESS_REFUSED), swallow a Basic.Publish
and everything the client sends after it on that connection (no confirm ever comes: a
timeout), or reset the connection when a Basic.Publish comes in. `hold()` keeps every
Basic.Publish from the broker until `release()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

HOST = "127.0.0.1"
METHOD_FRAME = 1
START_OK = (10, 11)
BASIC_PUBLISH = (60, 40)


async def _frame(reader: asyncio.StreamReader) -> tuple[bytes, int, tuple[int, int] | None]:
    """One frame, whole, its type, and (class, method) when it is a method frame."""
    header = await reader.readexactly(7)
    kind, _channel, size = struct.unpack(">BHI", header)
    rest = await reader.readexactly(size + 1)
    method = struct.unpack(">HH", rest[:4]) if kind == METHOD_FRAME and size >= 4 else None
    return header + rest, kind, method


class AmqpFaultProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.close_next_connection = False
        self.spoil_next_login = False
        self.swallow_next_publish = False
        self.reset_at_next_publish = False
        self.connections = 0  # connections accepted
        self.publishes = 0  # Basic.Publish frames clients sent, forwarded or not
        self._released = asyncio.Event()
        self._released.set()
        self._changed = asyncio.Condition()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, HOST, 0)

    async def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.close()
        self.drop_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def drop_all(self) -> None:
        """Cut every connection now (a broker that goes away)."""
        for writer in list(self._writers):
            writer.transport.abort()

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
        self.connections += 1
        upstream: asyncio.StreamWriter | None = None
        swallowing = False
        try:
            if self.close_next_connection:
                self.close_next_connection = False
                return
            protocol_header = await reader.readexactly(8)
            up_reader, upstream = await asyncio.open_connection(HOST, self.upstream_port)
            self._writers.add(upstream)
            upstream.write(protocol_header)
            back = asyncio.create_task(self._pipe(up_reader, writer))
            self._tasks.add(back)
            back.add_done_callback(self._tasks.discard)
            while True:
                frame, _kind, method = await _frame(reader)
                if method == START_OK and self.spoil_next_login:
                    self.spoil_next_login = False
                    frame = _spoil_password(frame)
                if method == BASIC_PUBLISH:
                    swallowing = swallowing or await self._publish_fault(writer)
                if swallowing:
                    continue
                upstream.write(frame)
                await upstream.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self._tasks.discard(task)
            for end in (writer, upstream):
                if end is not None:
                    self._writers.discard(end)
                    end.transport.abort()

    async def _publish_fault(self, writer: asyncio.StreamWriter) -> bool:
        """True when this publish and all that follows on the connection are swallowed."""
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
        if self.swallow_next_publish:
            self.swallow_next_publish = False
            return True
        await self._released.wait()
        return False

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()


def _spoil_password(frame: bytes) -> bytes:
    """The Start-Ok frame with the last byte of the PLAIN password changed (same length)."""
    # PLAIN's response is "\0user\0password", a long string ending just before the locale
    # (a short string) and the end octet.
    end = len(frame) - 1
    locale_length = _locale_length(frame)
    last = end - locale_length - 2  # the password's last byte
    spoiled = bytearray(frame)
    spoiled[last] = ord("x") if spoiled[last] != ord("x") else ord("y")
    return bytes(spoiled)


def _locale_length(frame: bytes) -> int:
    """Length of the locale short string at the end of a Start-Ok frame ("en_US")."""
    end = len(frame) - 1
    for length in range(64):
        if frame[end - length - 1] == length:
            return length
    raise ValueError("no locale at the end of Start-Ok")
