"""`actility-amqp-0.9.1-iot`: one AMQP connection per connection, a confirmed publish per uplink.

Uplinks are published, persistent and `mandatory`, to `exchangeName` with the routing key
rendered from `uplinkTopicPattern`, on a channel in confirm mode: `send` returns once the
broker confirmed (basic.ack), which for a durable queue means the message is on its disk.
What the broker says otherwise is classified:

- basic.nack (the broker could not take it: a queue over its limit with reject-publish,
  an internal error): RetryableSinkError;
- basic.return NO_ROUTE (no queue is bound for the routing key, so the broker would drop
  it): PermanentSinkError, so that the delivery is a dead letter the operator can re-send
  once a queue is bound, rather than a silent loss or a retry that blocks the others;
- ACCESS_REFUSED at login or on the exchange, NOT_ALLOWED on the virtual host, a refused
  certificate: AuthenticationSinkError;
- anything on the way (broker down, connection lost before the confirm, no confirm in
  time): RetryableSinkError. A publish left unconfirmed cannot be taken back, so the
  connection is dropped and the next attempt starts on a fresh one (the broker never
  confirms it twice on the new channel, and the worker sends again: at least once).

The connection opens at the first delivery (as the MQTT session: an idle connection holds
nothing at a broker) and is kept from then on; with downlinks on, a lost connection is
reopened in the background with a backoff, so that downlinks keep flowing between uplinks.

Downlinks: a durable queue named after the connection (and the fleet's `shared_group`),
bound to the exchange with the binding key made from `downlinkTopicPattern` (`{...}`
words become `*`). Every instance of a fleet consumes the same queue, and AMQP gives each
message to one consumer: a downlink is sent once, not once per instance. A message is
acknowledged once handed to the downlink path (or refused by it); one in hand when the
sink stops is requeued by the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from typing import Any

import aio_pika
import aiormq.exceptions
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from iotflow.backoff import Backoff
from iotflow.config.types import secret_value
from iotflow.connectors.amqp import AmqpConfig
from iotflow.connectors.common import PROBE_BACKOFF_CAP_SECONDS
from iotflow.downlinks.handover import hand_over
from iotflow.errors import (
    AuthenticationSinkError,
    PermanentSinkError,
    RetryableSinkError,
    SinkError,
)
from iotflow.formats import Template, render_body
from iotflow.sinks.base import SinkContext
from iotflow.sinks.mqtt.endpoint import split_host_port
from iotflow.sinks.mqtt.errors import TLS_AUTH_REASONS, tls_auth_reason
from iotflow.sinks.mqtt.tls import TlsMaterial, describe_tls_error, tls_context
from iotflow.sinks.mqtt.topics import DownlinkTopic
from iotflow.spool import Delivery
from iotflow.telemetry.logging import get_logger

log = get_logger("iotflow.sinks")
# aiormq logs each failed connection attempt at error level, traceback and all; the sink
# classifies the same failure and the worker reports it once per streak.
logging.getLogger("aiormq.connection").setLevel(logging.CRITICAL)

MAX_ROUTING_KEY = 255  # bytes: a short string (AMQP 0.9.1 section 4.2.5.3)
DOWNLINK_PREFETCH = 10  # unacknowledged downlinks the broker may hand us at once
RECONNECT_INITIAL_SECONDS = 1.0
# AMQP reply codes (section 1.9): a login, a virtual host or an entity refused to us.
_ACCESS_REFUSED, _NOT_ALLOWED = 403, 530
_WORD_SPLIT = re.compile(r"\.(?![^{]*\})")  # the dots of a key that are outside `{...}`


_CLOSING: set[asyncio.Task[None]] = set()


class _ClosedOnFailure(aio_pika.Connection):
    """aio-pika drops a connection whose connect failed without closing it; its `__del__`
    then makes a `close()` coroutine that nothing awaits when no loop runs (a warning at
    garbage collection). Closed here, it has nothing left to do then."""

    # aio-pika's own signature, which `aio_pika.connect` calls.
    async def connect(self, timeout: Any = None) -> None:  # noqa: ASYNC109
        try:
            await super().connect(timeout=timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.close()
            raise

    def __del__(self) -> None:
        """A connection lost, or whose close was cut short, may be collected by a garbage
        collection running in another thread (aiosqlite's): aio-pika's own `__del__` would
        make there a `close()` coroutine that no loop runs. It is closed on its loop."""
        with contextlib.suppress(AttributeError, RuntimeError):
            if self.is_closed or self.loop.is_closed():
                return
            try:
                here = asyncio.get_running_loop()
            except RuntimeError:
                here = None
            if here is self.loop:
                super().__del__()
            else:
                self.loop.call_soon_threadsafe(self._close_soon)

    def _close_soon(self) -> None:
        task = self.loop.create_task(self.close())
        _CLOSING.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(_CLOSING.discard)


class DownlinkKey:
    """A `downlinkTopicPattern` as an AMQP binding key, and the DevEUI of a routing key.

    Words holding a `{...}` become `*`. The DevEUI is read back as for MQTT topics
    (topics.DownlinkTopic), with the key's words in place of the topic's levels.
    """

    def __init__(self, pattern: str) -> None:
        words = _WORD_SPLIT.split(pattern)
        self._topic = DownlinkTopic("/".join(words))
        self.binding = ".".join("*" if "{" in word else word for word in words)

    def dev_eui(self, routing_key: str) -> str | None:
        return self._topic.dev_eui(routing_key.replace("/", "\x00").replace(".", "/"))


def queue_name(connection_id: str, shared_group: str) -> str:
    """The downlink queue: one per connection, shared by a fleet's instances."""
    group = f"{shared_group}." if shared_group else ""
    return f"iotflow.{group}{connection_id}.downlinks"


def classify(error: BaseException, where: str) -> SinkError | None:
    """What an AMQP failure means for a delivery (see the module docstring); None for an
    error that is not the broker's or the network's (a bug: the delivery fails)."""
    if isinstance(error, SinkError):
        return error
    if isinstance(error, aiormq.exceptions.PublishError):
        return PermanentSinkError(f"unroutable: the broker returned it ({error})")
    if isinstance(error, aiormq.exceptions.DeliveryError):
        return RetryableSinkError(f"the broker refused it ({error})")
    if isinstance(
        error, aiormq.exceptions.AuthenticationError | aiormq.exceptions.ProbableAuthenticationError
    ):
        return AuthenticationSinkError(f"{where} refused the credentials: {error}")
    if isinstance(error, aiormq.exceptions.ChannelAccessRefused):
        return AuthenticationSinkError(f"{where} refused access: {error}")
    if isinstance(error, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(error):
        # A Connection.Close in answer to Connection.Open: the virtual host is refused
        # (RabbitMQ: 530 NOT_ALLOWED, not found or no permission); aiormq keeps no code.
        return AuthenticationSinkError(f"{where} refused the virtual host")
    code = _reply_code(error)
    if code in (_ACCESS_REFUSED, _NOT_ALLOWED):
        return AuthenticationSinkError(f"{where} refused access: {error}")
    reason = _tls_refusal(error)
    if reason is not None:
        return AuthenticationSinkError(f"TLS with {where} failed ({reason}): {error}")
    if isinstance(error, TimeoutError):
        return RetryableSinkError(f"no answer from {where} in time")
    if isinstance(
        error,
        aiormq.exceptions.AMQPError | aiormq.exceptions.ChannelInvalidStateError | OSError,
    ):
        return RetryableSinkError(f"{where}: {str(error) or type(error).__name__}")
    return None


def _tls_refusal(error: BaseException) -> str | None:
    """The OpenSSL reason when one side refused the other's certificate. aiormq wraps the
    ssl error in an AMQPConnectionError that keeps only its number and text."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        reason = tls_auth_reason(current)
        if reason is not None:
            return reason
        current = current.__cause__ or current.__context__
    text = str(error).upper()
    return next((known for known in TLS_AUTH_REASONS if known in text), None)


def _reply_code(error: BaseException) -> int | None:
    """The reply code of a Connection.Close or Channel.Close the broker sent, if any."""
    for arg in getattr(error, "args", ()):
        code = getattr(arg, "reply_code", None)
        if isinstance(code, int):
            return code
    return None


class AmqpSink:
    """`actility-amqp-0.9.1-iot`: see the module docstring."""

    def __init__(self, connection_id: str, config: AmqpConfig, context: SinkContext) -> None:
        self.connection_id = connection_id
        self._config = config
        self._context = context
        self._timeout = context.timeout
        self._problem: PermanentSinkError | None = None
        tls = config.protocol == "SSL"
        try:
            self.host, self.port = split_host_port(config.hostName, 5671 if tls else 5672)
        except ValueError as exc:
            self._problem = PermanentSinkError(f"hostName: {exc}")
            self.host, self.port = config.hostName, 0
        scheme = "amqps" if tls else "amqp"
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.where = f"{scheme}://{host}:{self.port}"  # for messages: never the credentials
        self._tls = (
            TlsMaterial(
                trusted_ca=config.trustedCaCertficate,
                certificate=config.certificate,
                private_key=secret_value(config.privateKey),
            )
            if tls
            else None
        )
        self._ssl: ssl.SSLContext | None = None
        self._broken: SinkError | None = None
        self._routing = Template(config.uplinkTopicPattern)
        self._templated = "{" in config.uplinkTopicPattern
        self._reshape = config.sendMetadata or config.sendRawDecodedFormat
        pattern = config.downlinkTopicPattern
        self.downlinks = DownlinkKey(pattern) if pattern and config.downlinkEnabled else None
        self.queue = queue_name(connection_id, context.shared_group)
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._lock = asyncio.Lock()
        self._started = False
        self._closing = asyncio.Event()
        self._lost = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self._backoff = Backoff(
            RECONNECT_INITIAL_SECONDS,
            max(PROBE_BACKOFF_CAP_SECONDS[config.reconnectStrategy], RECONNECT_INITIAL_SECONDS),
            jitter="equal",
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._started = True
        if self._tls is None:
            return
        try:
            self._ssl = tls_context(self._tls)
        except (ssl.SSLError, ValueError, OSError) as exc:
            self._broken = AuthenticationSinkError(
                f"the TLS material cannot be used: {describe_tls_error(exc)}"
            )
            log.warning(
                "Cloud broker TLS material refused", connection=self.connection_id,
                error=str(self._broken),
            )  # fmt: skip

    async def healthcheck(self) -> bool:
        connection = self._connection
        return (
            self._started
            and not self._closing.is_set()
            and connection is not None
            and not connection.is_closed
        )

    async def close(self) -> None:
        self._closing.set()
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        async with self._lock:
            await self._drop()

    # -- sending ---------------------------------------------------------------------------

    async def send(self, delivery: Delivery) -> None:
        if not self._started or self._closing.is_set():
            raise RetryableSinkError("the sink is closed" if self._started else "not started")
        if self._problem is not None:
            raise PermanentSinkError(str(self._problem))
        if self._broken is not None:
            raise type(self._broken)(str(self._broken))
        routing_key, body = self._render(delivery)
        closing = asyncio.ensure_future(self._closing.wait())
        publishing = asyncio.ensure_future(self._publish(routing_key, body))
        try:
            done, _ = await asyncio.wait(
                {publishing, closing}, timeout=self._timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            closing.cancel()
            if not publishing.done():
                publishing.cancel()
            await asyncio.gather(publishing, closing, return_exceptions=True)
        if publishing in done and not publishing.cancelled():
            error = publishing.exception()
            if error is None:
                return
            sink_error = classify(error, self.where)
            if sink_error is None:
                raise error
            if isinstance(sink_error, RetryableSinkError):
                await self._forget()
            raise sink_error from None
        if closing in done:
            raise RetryableSinkError("the sink is closing")
        # Unconfirmed: the channel cannot be trusted with the next publish (see above).
        await self._forget()
        raise RetryableSinkError(f"no confirm from {self.where} within {self._timeout:g}s")

    def _render(self, delivery: Delivery) -> tuple[str, bytes]:
        document: dict[str, Any] | None = None
        if self._templated or self._reshape:
            document = orjson.loads(delivery.document)
        key = self._routing.render(document) if document is not None else self._routing.text
        if not key or len(key.encode()) > MAX_ROUTING_KEY:
            raise PermanentSinkError(
                f"uplinkTopicPattern {self._routing.text!r} renders to a routing key of"
                f" {len(key.encode())} bytes (1 to {MAX_ROUTING_KEY})"
            )
        if document is not None and self._reshape:
            body = render_body(
                document,
                send_metadata=self._config.sendMetadata,
                send_raw_decoded=self._config.sendRawDecodedFormat,
            )
        else:
            body = delivery.document
        return key, body

    async def _publish(self, routing_key: str, body: bytes) -> None:
        exchange = await self._ensure()
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        # The confirm is waited for by `send`'s own timeout alone: a second timer for the
        # same deadline here raced it, and a loaded machine then said "no answer" for what
        # is a missing confirm.
        await exchange.publish(message, routing_key=routing_key, mandatory=True)

    # -- the connection --------------------------------------------------------------------

    async def _ensure(self) -> AbstractExchange:
        """The exchange on a live confirm channel, connecting first when there is none."""
        async with self._lock:
            if self._exchange is not None and self._live():
                return self._exchange
            await self._drop()
            if self._closing.is_set():
                raise RetryableSinkError("the sink is closing")
            try:
                await self._open()
            except BaseException:
                await self._drop()
                raise
            assert self._exchange is not None
            if self.downlinks is not None and self._keeper is None:
                self._keeper = asyncio.create_task(
                    self._keep(), name=f"amqp-sink:{self.connection_id}"
                )
            return self._exchange

    def _live(self) -> bool:
        return (
            self._connection is not None
            and not self._connection.is_closed
            and self._channel is not None
            and not self._channel.is_closed
        )

    async def _open(self) -> None:
        config = self._config
        connection = await aio_pika.connect(
            host=self.host,
            port=self.port,
            login=config.username or "guest",
            password=secret_value(config.password) or "guest",
            virtualhost=config.virtualHost,
            ssl=self._ssl is not None,
            ssl_context=self._ssl,
            timeout=self._timeout,
            client_properties={"connection_name": f"iotflow {self.connection_id}"},
            connection_class=_ClosedOnFailure,
        )
        self._connection = connection  # type: ignore[assignment]
        self._lost.clear()
        connection.close_callbacks.add(self._on_close)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        self._channel = channel
        self._exchange = await self._declare(connection, channel)
        if self.downlinks is not None:
            await self._consume(connection, self.downlinks)
        log.info(
            "Cloud broker connected",
            connection=self.connection_id,
            url=self.where,
            exchange=config.exchangeName,
        )

    async def _declare(self, connection: Any, channel: AbstractChannel) -> AbstractExchange:
        """The exchange: an existing one as it is (`amq.topic` cannot be declared by
        clients), else a new durable topic exchange."""
        name = self._config.exchangeName
        try:
            return await channel.declare_exchange(name, passive=True, timeout=self._timeout)
        except aiormq.exceptions.ChannelNotFoundEntity:
            pass
        # A failed passive declare closes the channel: a new one for the rest.
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        self._channel = channel
        exchange = await channel.declare_exchange(
            name, aio_pika.ExchangeType.TOPIC, durable=True, timeout=self._timeout
        )
        log.info("Exchange declared", connection=self.connection_id, exchange=name)
        return exchange

    async def _consume(self, connection: Any, downlinks: DownlinkKey) -> None:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=DOWNLINK_PREFETCH)
        queue = await channel.declare_queue(self.queue, durable=True, timeout=self._timeout)
        await queue.bind(self._config.exchangeName, routing_key=downlinks.binding)
        await queue.consume(self._on_downlink)
        log.info(
            "Downlinks subscribed",
            connection=self.connection_id,
            queue=self.queue,
            binding=downlinks.binding,
        )

    def _on_close(self, _: Any, error: BaseException | None = None) -> None:
        self._lost.set()
        if error is not None and not self._closing.is_set():
            log.warning(
                "Cloud broker connection lost",
                connection=self.connection_id,
                error=str(classify(error, self.where) or error),
            )

    async def _forget(self) -> None:
        async with self._lock:
            await self._drop()

    async def _drop(self) -> None:
        """Close the connection, if any, without waiting on a broker that does not answer."""
        connection, self._connection = self._connection, None
        self._channel = self._exchange = None
        if connection is None or connection.is_closed:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await connection.close()

    async def _keep(self) -> None:
        """With downlinks: reopen a lost connection between uplinks, with a backoff."""
        while not self._closing.is_set():
            await self._lost.wait()
            if self._closing.is_set():
                return
            await asyncio.sleep(self._backoff.next())
            try:
                await self._ensure()
            except Exception as exc:  # classified and logged; the next round tries again
                self._lost.set()
                log.debug(
                    "Cloud broker unavailable",
                    connection=self.connection_id,
                    error=str(classify(exc, self.where) or exc),
                )
            else:
                self._backoff.reset()

    # -- downlinks -------------------------------------------------------------------------

    async def _on_downlink(self, message: AbstractIncomingMessage) -> None:
        assert self.downlinks is not None
        key = message.routing_key or ""
        # Cancelled with it in hand (stopping): unacknowledged, the broker delivers it again.
        await hand_over(
            self._context.downlink,
            self.connection_id,
            message.body,
            dev_eui=self.downlinks.dev_eui(key),
            default_port=self._config.downlinkPort,
            within=self._timeout,
            routing_key=key,
        )
        with contextlib.suppress(Exception):
            await message.ack()
