"""`MqttSession`: one persistent MQTT session to a cloud broker, for one connection.

The MQTT sink and the AWS IoT sink each hold one (composition: they render what to
publish, the session gets it acknowledged). The session lives in a background task that
connects, keeps the connection, and reconnects after a loss with a backoff capped by the
connection's `reconnectStrategy`. `publish()` waits (within the delivery timeout) for the
session, publishes with the configured QoS and returns once the broker acknowledged the
message (PUBACK for QoS 1): only then does the worker count the delivery as delivered.
What went wrong is said through the type of the exception (see errors.py): a refused
CONNACK or certificate is an AuthenticationSinkError, a topic paho refuses a
PermanentSinkError, anything else (broker down, connection lost before the PUBACK,
timeout) a RetryableSinkError.

The session opens at the connection's first delivery and is kept from then on, through
reconnects, until it closes. Not at start(): a connection that has nothing to send
holds no session at a broker and makes no connection attempts (a fleet of idle
connections, a connection created with a wrong host, a fuzzed API). Downlinks lose little
by it: a device must have spoken before it can be sent one (a class A device listens only
after an uplink anyway), and once a session has existed the broker keeps what the cloud
sends for us while none is open, until it opens again at the connection's next delivery.

Reconnect attempts while deliveries wait are driven by the deliveries themselves (each
publish wakes the session at once): the worker's backoff and circuit already space them,
and a second backoff here would only delay recovery. The session's own backoff spaces the
attempts made when nothing is being sent, which keep downlinks flowing.

MQTT 3.1.1, supported by every broker and cloud we target. With downlinks enabled the
session is persistent (clean session off, a fixed client id): downlinks published while
we were away are kept by the broker and delivered when we are back. Without downlinks the
session is clean, so the broker keeps nothing for us.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
from paho.mqtt.reasoncodes import ReasonCode

from iotflow.backoff import Backoff
from iotflow.downlinks.handover import hand_over
from iotflow.errors import (
    AuthenticationSinkError,
    PermanentSinkError,
    RetryableSinkError,
    SinkError,
)
from iotflow.sinks.base import SinkContext
from iotflow.sinks.mqtt.client import ClientOptions, discard, make_client
from iotflow.sinks.mqtt.endpoint import Endpoint
from iotflow.sinks.mqtt.errors import classify_connect_error
from iotflow.sinks.mqtt.pacing import Pacer
from iotflow.sinks.mqtt.tls import TlsMaterial, describe_tls_error, tls_context
from iotflow.sinks.mqtt.topics import DownlinkTopic
from iotflow.sources.ack import ManualAck
from iotflow.telemetry.logging import get_logger

log = get_logger("iotflow.sinks")

# The first reconnect delay; it doubles after each failure up to the reconnectStrategy cap.
RECONNECT_INITIAL_SECONDS = 1.0
# A session that lasted this long was a real one: the next loss starts the backoff afresh.
# A shorter one (a broker that accepts and drops us at once) keeps backing off.
STABLE_SESSION_SECONDS = 10.0


class _SessionLost(RetryableSinkError):
    """A session that was up is gone (as opposed to an attempt that failed)."""


class _Stopped(Exception):
    """close() came during a connection attempt: the attempt is abandoned."""


@dataclass(slots=True)
class _Connected:
    client: aiomqtt.Client
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    socket_error: OSError | None = None


class MqttSession:
    """One connection's session to its cloud broker: see the module docstring."""

    def __init__(
        self,
        connection_id: str,
        context: SinkContext,
        *,
        endpoint: Endpoint,
        client_id: str,
        reconnect_cap: float,
        qos: int = 1,
        username: str | None = None,
        password: str | None = None,
        tls: TlsMaterial | None = None,
        downlinks: DownlinkTopic | None = None,
        downlink_port: int | None = None,
        pacer: Pacer | None = None,
        shares_subscriptions: bool = True,
        websocket_path: Callable[[], str] | None = None,
    ) -> None:
        self.connection_id = connection_id
        self.endpoint = endpoint
        self.client_id = client_id
        self.tls = tls
        self._context = context
        self._timeout = context.timeout
        self._qos = qos
        self._downlinks = downlinks
        self._downlink_port = downlink_port
        self._pacer = pacer
        # Whether a fleet's instances may share the downlink subscription (`$share/...`).
        self._shares_subscriptions = shares_subscriptions
        # The path of a websocket session (AWS signs it for each connection).
        self._websocket_path = websocket_path or (lambda: endpoint.path)
        self._options = ClientOptions(
            endpoint=endpoint,
            client_id=client_id,
            username=username,
            password=password,
            clean_session=downlinks is None,
            timeout=context.timeout,
            max_in_flight=context.max_in_flight,
        )
        # Equal jitter: never straight back, never all of a fleet at once.
        self._backoff = Backoff(
            RECONNECT_INITIAL_SECONDS, max(reconnect_cap, RECONNECT_INITIAL_SECONDS), jitter="equal"
        )
        self._ssl: ssl.SSLContext | None = None
        self.broken: SinkError | None = None  # the TLS material cannot work at all
        self._connected: _Connected | None = None  # set while connected
        self._error: SinkError | None = None  # why the last attempt failed
        self._failures = 0  # failed attempts so far; senders wait for it to move
        self._connecting = False
        self._changed = asyncio.Condition()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Make the TLS context; the session itself opens at the first publish."""
        if self.tls is None:
            return
        try:
            self._ssl = tls_context(self.tls)
        except (ssl.SSLError, ValueError, OSError) as exc:
            # The operator's material, not the cloud, is wrong: the state says so and
            # deliveries wait (slowly) until the connection is corrected.
            self.broken = AuthenticationSinkError(
                f"the TLS material cannot be used: {describe_tls_error(exc)}"
            )
            log.warning(
                "Cloud broker TLS material refused", connection=self.connection_id,
                error=str(self.broken),
            )  # fmt: skip

    def raise_if_broken(self) -> None:
        if self.broken is not None:
            raise type(self.broken)(str(self.broken))

    def _open(self) -> None:
        """Start the session task, once: at the first delivery (see the module docstring)."""
        if self._task is None and not self._stopping.is_set():
            self._task = asyncio.create_task(self._run(), name=f"mqtt-sink:{self.connection_id}")

    @property
    def connected(self) -> bool:
        return self._connected is not None

    async def close(self) -> None:
        self._stopping.set()
        async with self._changed:
            self._changed.notify_all()
        task, self._task = self._task, None
        if task is not None:
            # Room for a clean DISCONNECT; a broker that does not answer is left behind.
            done, _ = await asyncio.wait({task}, timeout=self._timeout + 1)
            if not done:
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # -- publishing ------------------------------------------------------------------------

    async def publish(self, topic: str, body: bytes) -> None:
        """Publish and wait for the broker's acknowledgement, within the send timeout."""
        self.raise_if_broken()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        connected = await self._wait_connected(deadline)
        if self._pacer is not None:
            await self._pacer.wait()
        await self._publish(connected, topic, body, deadline)

    async def _wait_connected(self, deadline: float) -> _Connected:
        """The current session, or the outcome of the next attempt, within `deadline`."""
        session = self._connected
        if session is not None and not session.lost.is_set():
            return session
        self._open()
        failures = self._failures
        if not self._connecting:
            self._wake.set()  # a delivery waits: try now rather than after the backoff

        def settled() -> bool:
            return self._connected is not None or self._failures != failures or self._stop_seen()

        try:
            async with asyncio.timeout_at(deadline), self._changed:
                await self._changed.wait_for(settled)
        except TimeoutError:
            last = f" (last error: {self._error})" if self._error is not None else ""
            raise RetryableSinkError(
                f"not connected to {self.endpoint} within {self._timeout:g}s{last}"
            ) from None
        session = self._connected
        if session is not None:
            return session
        if self._stop_seen():
            raise RetryableSinkError("the sink is closing")
        error = self._error or RetryableSinkError(f"cannot connect to {self.endpoint}")
        # A fresh exception for each sender: one object raised in several tasks would
        # collect all their tracebacks.
        raise type(error)(str(error))

    def _stop_seen(self) -> bool:
        return self._stopping.is_set()

    async def _publish(self, session: _Connected, topic: str, body: bytes, deadline: float) -> None:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise RetryableSinkError(f"no PUBACK within {self._timeout:g}s")
        publish = asyncio.ensure_future(
            session.client.publish(topic, body, qos=self._qos, timeout=remaining)
        )
        lost = asyncio.ensure_future(session.lost.wait())
        try:
            done, _ = await asyncio.wait(
                {publish, lost}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            lost.cancel()
            if not publish.done():
                publish.cancel()
            await asyncio.gather(publish, lost, return_exceptions=True)
        if publish in done and not publish.cancelled():
            error = publish.exception()
            if error is None:
                return
            if isinstance(error, ValueError):  # paho refuses the topic
                raise PermanentSinkError(f"cannot publish to {topic!r}: {error}")
            if isinstance(error, aiomqtt.MqttError):
                raise RetryableSinkError(f"publish to {self.endpoint} failed: {error}")
            raise error
        if lost in done:
            raise RetryableSinkError(f"connection to {self.endpoint} lost before the PUBACK")
        raise RetryableSinkError(f"no PUBACK from {self.endpoint} within {self._timeout:g}s")

    # -- the session -----------------------------------------------------------------------

    async def _run(self) -> None:
        """Connect, keep the session, reconnect after a loss; until close()."""
        loop = asyncio.get_running_loop()
        reported: str | None = None  # the last error logged as a warning
        while not self._stopping.is_set():
            self._wake.clear()
            started = loop.time()
            try:
                await self._session_once()
                return  # stopped
            except _Stopped:
                return
            except _SessionLost as exc:
                log.warning(
                    "Cloud broker connection lost", connection=self.connection_id, error=str(exc)
                )
                reported = None
            except SinkError as exc:
                text = str(exc)
                # The first failure of a streak is a warning; repeats of it are not news.
                level = log.debug if text == reported else log.warning
                level("Cloud broker unavailable", connection=self.connection_id, error=text)
                reported = text
            except Exception as exc:
                # A bug must not end the session task: the connection would stay silent.
                log.exception("Cloud broker session failed", connection=self.connection_id)
                self._error = RetryableSinkError(f"internal error: {exc}")
            if loop.time() - started >= STABLE_SESSION_SECONDS:
                self._backoff.reset()
            delay = self._backoff.next()
            stop = asyncio.ensure_future(self._stopping.wait())
            wake = asyncio.ensure_future(self._wake.wait())
            await asyncio.wait({stop, wake}, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            wake.cancel()
            await asyncio.gather(stop, wake, return_exceptions=True)

    async def _session_once(self) -> None:
        """One connection: returns when stopped, raises SinkError when it fails or is lost."""
        loop = asyncio.get_running_loop()
        before_connack: asyncio.Future[OSError] = loop.create_future()
        session_ref: list[_Connected] = []

        def on_socket_error(error: OSError) -> None:
            def record() -> None:
                if session_ref:
                    session_ref[0].socket_error = error
                elif not before_connack.done():
                    before_connack.set_result(error)

            loop.call_soon_threadsafe(record)

        client = make_client(
            self.connection_id,
            self._options,
            ssl_context=self._ssl,
            websocket_path=self._websocket_path() if self.endpoint.websockets else None,
            on_socket_error=on_socket_error,
        )
        acker = ManualAck(client) if self._downlinks is not None else None
        self._connecting = True
        try:
            await self._connect(client, before_connack)
        except BaseException as exc:
            discard(client)
            if isinstance(exc, SinkError):
                await self._settle(error=exc)
            raise
        finally:
            self._connecting = False
        session = _Connected(client)
        session_ref.append(session)
        try:
            log.info(
                "Cloud broker connected",
                connection=self.connection_id,
                url=str(self.endpoint),
                client_id=self.client_id,
            )
            if self._downlinks is not None:
                await self._subscribe(client, self._downlinks)
            await self._settle(session=session)
            await self._consume(session, acker)
        except aiomqtt.MqttError:
            # paho says why only when the socket itself failed; a closed socket is all
            # it knows otherwise (its reason code then reads "Unspecified error").
            detail = session.socket_error or "closed by the broker or the network"
            raise _SessionLost(f"connection to {self.endpoint} lost: {detail}") from None
        finally:
            session.lost.set()
            if self._connected is session:
                self._connected = None
            with contextlib.suppress(aiomqtt.MqttError, OSError, TimeoutError):
                # A clean DISCONNECT when we leave on purpose; a no-op after a loss.
                await client.__aexit__(None, None, None)

    async def _connect(
        self, client: aiomqtt.Client, before_connack: asyncio.Future[OSError]
    ) -> None:
        """Connect, or raise the classified reason; a socket error ends the wait at once."""
        enter = asyncio.ensure_future(client.__aenter__())
        # A broker that says nothing would otherwise hold close() for the whole timeout.
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            waiting: set[asyncio.Future[Any]] = {enter, before_connack, stopping}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            enter.cancel()
            raise
        finally:
            stopping.cancel()
        socket_error = before_connack.result() if before_connack.done() else None
        if not enter.done():
            # The socket is gone (paho closed it; aiomqtt would wait for its timeout), or
            # the sink is closing.
            enter.cancel()
            await asyncio.gather(enter, return_exceptions=True)
            if socket_error is None:
                raise _Stopped
            raise classify_connect_error(socket_error, self.endpoint)
        error = enter.exception() if not enter.cancelled() else None
        if error is not None:
            raise classify_connect_error(error, self.endpoint, socket_error)

    def _subscription(self, downlinks: DownlinkTopic) -> str:
        """The downlink filter, shared by the fleet's instances when there is a fleet."""
        group = self._context.shared_group
        if not group or not self._shares_subscriptions:
            return downlinks.filter
        return f"$share/{group}/{downlinks.filter}"

    async def _subscribe(self, client: aiomqtt.Client, downlinks: DownlinkTopic) -> None:
        topic = self._subscription(downlinks)
        try:
            granted = await client.subscribe(topic, qos=self._qos)
        except aiomqtt.MqttCodeError as exc:
            granted = [exc.rc] if isinstance(exc.rc, ReasonCode) else []
        codes = [g.value if isinstance(g, ReasonCode) else int(g) for g in granted]
        if any(code >= 0x80 for code in codes):
            # Uplinks still flow; the operator must fix the broker's ACL (or AWS policy).
            log.warning("Downlink subscription refused", connection=self.connection_id, topic=topic)
        else:
            log.info("Downlinks subscribed", connection=self.connection_id, topic=topic)

    async def _settle(
        self, *, session: _Connected | None = None, error: SinkError | None = None
    ) -> None:
        """Publish the outcome of an attempt to the senders waiting for it."""
        async with self._changed:
            if session is not None:
                self._connected = session
                self._error = None
            if error is not None:
                self._error = error
                self._failures += 1
            self._changed.notify_all()

    async def _consume(self, session: _Connected, acker: ManualAck | None) -> None:
        """Hand downlinks over until the session is lost (MqttError) or the sink closes.

        Iterating the messages is also how a lost connection shows up, so this runs even
        without a downlink subscription.
        """
        messages = aiter(session.client.messages)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                following = asyncio.ensure_future(anext(messages))
                done, _ = await asyncio.wait({following, stop}, return_when=asyncio.FIRST_COMPLETED)
                if following not in done:
                    following.cancel()
                    await asyncio.gather(following, return_exceptions=True)
                    return
                message = following.result()
                await self._downlink(message)
                if acker is not None:
                    # Acknowledged once handed over: a downlink in hand when we stop or
                    # crash is redelivered on the next session (it is persistent).
                    acker.ack(message.mid, message.qos)
        finally:
            stop.cancel()
            await asyncio.gather(stop, return_exceptions=True)

    async def _downlink(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        if self._downlinks is None or not message.topic.matches(self._downlinks.filter):
            return
        payload = message.payload if isinstance(message.payload, bytes) else b""
        topic_eui = self._downlinks.dev_eui(topic)
        await hand_over(
            self._context.downlink,
            self.connection_id,
            payload,
            dev_eui=topic_eui,
            default_port=self._downlink_port,
            within=self._timeout,
            topic=topic,
        )
