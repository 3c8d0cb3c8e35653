"""The source broker: QoS 1, a persistent session, manual acknowledgement in arrival order."""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from iotflow.config.model import MqttSettings, Subscription
from iotflow.errors import IotflowError
from iotflow.sources.ack import ManualAck
from iotflow.telemetry.logging import get_logger
from iotflow.telemetry.metrics import Metrics

log = get_logger("iotflow.source")


@dataclass(frozen=True, slots=True)
class Incoming:
    topic: str
    payload: bytes
    subscription: Subscription | None  # None: matched no configured filter


# What the daemon does with one message. It returns None when the message may be
# acknowledged at once (rejected, unrouted), or an awaitable that completes when the
# uplink is committed (and raises if it could not be).
Handler = Callable[[Incoming], Awaitable[None] | None]


class _Reconnect(Exception):
    """A commit failed: reconnect, so that the broker redelivers what we did not ack."""


class MqttSource:
    def __init__(self, settings: MqttSettings, handler: Handler, metrics: Metrics) -> None:
        self.settings = settings
        self._handler = handler
        self._metrics = metrics
        self.connected = asyncio.Event()
        self.consuming = asyncio.Event()  # subscribed at least once: READY for systemd
        self._stopping = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._commits_failing = False  # logged once per episode, not once per reconnect

    def _filters(self) -> list[tuple[str, Subscription]]:
        group = self.settings.shared_group
        return [
            (f"$share/{group}/{s.topic}" if group else s.topic, s)
            for s in self.settings.subscriptions
        ]

    def _match(self, topic: aiomqtt.Topic) -> Subscription | None:
        for subscription in self.settings.subscriptions:
            if topic.matches(subscription.topic):
                return subscription
        return None

    def _make_client(self) -> aiomqtt.Client:
        s = self.settings
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = int(s.session_expiry.total_seconds())
        properties.ReceiveMaximum = s.receive_maximum
        user, password = s.credentials()
        tls: ssl.SSLContext | None = None
        if s.tls:
            tls = ssl.create_default_context(cafile=s.ca_file)
        return aiomqtt.Client(
            s.host,
            s.port,
            identifier=s.client_id,
            username=user,
            password=password,
            protocol=aiomqtt.ProtocolVersion.V5,
            # Never a clean start: the broker must keep what arrived while we were away.
            clean_start=False,
            properties=properties,
            keepalive=int(s.keepalive.total_seconds()),
            tls_context=tls,
        )

    async def run(self) -> None:
        """Consume until `stop()`; reconnect with backoff and full jitter after any loss."""
        backoff = self.settings.reconnect_initial.total_seconds()
        while not self._stopping.is_set():
            try:
                await self._session()
                backoff = self.settings.reconnect_initial.total_seconds()
            except (aiomqtt.MqttError, _Reconnect) as exc:
                # Our own reconnect is logged once per episode by the ack loop.
                self._disconnected(None if isinstance(exc, _Reconnect) else str(exc))
                delay = random.uniform(0, backoff)
                backoff = min(backoff * 2, self.settings.reconnect_max.total_seconds())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=delay)
        self._disconnected(None)

    def _disconnected(self, error: str | None) -> None:
        if self.connected.is_set():
            self.connected.clear()
            self._metrics.mqtt_connected.set(0)
            if error is not None:
                log.warning("Broker connection lost", error=error)
        elif error is not None:
            log.warning("Broker unreachable", error=error, url=self._safe_url())

    def _safe_url(self) -> str:
        return f"{'mqtts' if self.settings.tls else 'mqtt'}://{self.settings.host}:{self.settings.port}"

    async def _session(self) -> None:
        client = self._make_client()
        acker = ManualAck(client)
        # Acknowledgements leave in arrival order (MQTT 5 section 4.6), each once its uplink is
        # committed; a queue per session, so nothing is acked on a later connection.
        # Bounded by our Receive Maximum: some brokers (Mosquitto 2.0.11) exceed the quota
        # once acknowledgements flow, and we must not take in more than we can commit.
        acks: asyncio.Queue[tuple[int, int, Awaitable[None] | None]] = asyncio.Queue(
            maxsize=self.settings.receive_maximum
        )
        async with client:
            self._client = client
            self.connected.set()
            self._metrics.mqtt_connected.set(1)
            log.info("Broker connected", url=self._safe_url(), client_id=self.settings.client_id)
            for topic, subscription in self._filters():
                await client.subscribe(topic, qos=1)
                log.info("Subscribed", topic=topic, format=subscription.format)
            self.consuming.set()
            log.info("Consuming uplinks", subscriptions=len(self.settings.subscriptions))
            ack_task = asyncio.create_task(self._ack_loop(acks, acker))
            stop_task = asyncio.create_task(self._stopping.wait())
            try:
                await self._consume(client, acks, stop_task, ack_task)
            finally:
                stop_task.cancel()
                if self._stopping.is_set() and not ack_task.done():
                    # Stop: commits under way finish and are acknowledged before we leave.
                    # The marker waits for room in a full queue only while the ack loop lives.
                    marker = asyncio.ensure_future(acks.put((-1, 0, None)))
                    await asyncio.wait({ack_task}, timeout=10)
                    marker.cancel()
                ack_task.cancel()
                self._client = None

    async def _consume(
        self,
        client: aiomqtt.Client,
        acks: asyncio.Queue[tuple[int, int, Awaitable[None] | None]],
        stop_task: asyncio.Task[bool],
        ack_task: asyncio.Task[None],
    ) -> None:
        messages = aiter(client.messages)
        while True:
            next_message = asyncio.ensure_future(anext(messages))
            done, _ = await asyncio.wait(
                {next_message, stop_task, ack_task}, return_when=asyncio.FIRST_COMPLETED
            )
            if next_message not in done:
                next_message.cancel()
                if ack_task in done:
                    ack_task.result()  # raises _Reconnect: a commit failed
                return
            message = next_message.result()
            payload = message.payload if isinstance(message.payload, bytes) else b""
            incoming = Incoming(message.topic.value, payload, self._match(message.topic))
            pending = self._handler(incoming)
            if not acks.full():
                acks.put_nowait((message.mid, message.qos, pending))
                continue
            # A broker over our quota: wait for room, but not past a stop or a failed commit.
            put = asyncio.ensure_future(acks.put((message.mid, message.qos, pending)))
            await asyncio.wait({put, stop_task, ack_task}, return_when=asyncio.FIRST_COMPLETED)
            if not put.done():
                put.cancel()
                if ack_task.done():
                    ack_task.result()  # raises _Reconnect: a commit failed
                return

    async def _ack_loop(
        self, acks: asyncio.Queue[tuple[int, int, Awaitable[None] | None]], acker: ManualAck
    ) -> None:
        while True:
            mid, qos, pending = await acks.get()
            if mid < 0:
                return  # the stop marker, queued after the last message
            if pending is not None:
                try:
                    await pending
                except Exception as exc:
                    # Not acknowledged: the broker redelivers it on the next session.
                    if not self._commits_failing and not self._stopping.is_set():
                        self._commits_failing = True
                        log.warning(
                            "Uplink not committed; reconnecting for redelivery",
                            error=str(exc),
                            exc_info=not isinstance(exc, IotflowError),  # a bug: its traceback
                        )
                    raise _Reconnect(str(exc)) from exc
                if self._commits_failing:
                    self._commits_failing = False
                    log.info("Uplinks committed again")
            acker.ack(mid, qos)

    async def publish(self, topic: str, payload: bytes) -> None:
        """Publish on the source broker (alarm notifications), QoS 1."""
        client = self._client
        if client is None or not self.connected.is_set():
            raise ConnectionError("not connected to the broker")
        await client.publish(topic, payload, qos=1)

    def stop(self) -> None:
        self._stopping.set()
