"""The source broker: MQTT 5 or 3.1.1, a persistent session, manual acknowledgement in
arrival order for QoS 1, a bound on what is taken in, and a quick return after a blip."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from iotflow.backoff import Backoff, jittered
from iotflow.config.model import MqttSettings, Subscription
from iotflow.delivery.pressure import IngestPressure
from iotflow.errors import IotflowError
from iotflow.sources.ack import ConnectWatch, InflightGate, ManualAck, Messages
from iotflow.telemetry.logging import get_logger
from iotflow.telemetry.metrics import Metrics

log = get_logger("iotflow.sources")

# A broker that refuses our CONNECT (protocol, credentials) is not fixed by retrying fast;
# it is retried this often so that a broker upgraded or reconfigured later is picked up.
REFUSED_RETRY = 30.0
# The same connection error is logged once, then at most this often while it lasts.
REMINDER_INTERVAL = 300.0
# paho reason codes of a refused protocol version: 1 (MQTT 3.1.1), 0x84 (MQTT 5).
_UNSUPPORTED_PROTOCOL = (1, 0x84)
PROTOCOL_HINT = '[mqtt] protocol = "3.1.1"'
# Topics whose subscription is remembered (one a device in most layouts), at most.
MATCH_CACHE = 100_000


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


class _Refused(Exception):
    """The broker refused our CONNECT, or closed the connection before answering it."""

    def __init__(self, message: str, *, closed: bool, protocol: bool) -> None:
        super().__init__(message)
        self.closed = closed  # no CONNACK at all: could be a broker going down, once
        self.protocol = protocol  # refused for the protocol version


class _ErrorLog:
    """One line per distinct connection error, then a reminder every REMINDER_INTERVAL."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: str | None = None
        self._logged_at = 0.0
        self._repeats = 0

    def should_log(self, error: str) -> tuple[bool, int]:
        """Whether to log `error` now, and how many times it repeated unlogged before."""
        now = self._clock()
        if error != self._last:
            self._last, self._logged_at, self._repeats = error, now, 0
            return True, 0
        self._repeats += 1
        if now - self._logged_at >= REMINDER_INTERVAL:
            repeats, self._repeats, self._logged_at = self._repeats, 0, now
            return True, repeats
        return False, self._repeats

    def reset(self) -> None:
        self._last = None


class MqttSource:
    def __init__(
        self,
        settings: MqttSettings,
        handler: Handler,
        metrics: Metrics,
        pressure: IngestPressure | None = None,
    ) -> None:
        self.settings = settings
        self.pressure = pressure if pressure is not None else IngestPressure()
        self._handler = handler
        self._metrics = metrics
        self.connected = asyncio.Event()
        self.consuming = asyncio.Event()  # subscribed at least once: READY for systemd
        self._stopping = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._commits_failing = False  # logged once per episode, not once per reconnect
        self._gate: InflightGate | None = None
        self._errors = _ErrorLog()
        self._closed_at_connect = 0  # consecutive sessions closed before their CONNACK
        self._was_connected = False  # the last session got its CONNACK
        self._matches: dict[str, Subscription | None] = {}  # topic -> subscription (_match)

    @property
    def taken_in(self) -> int:
        """Messages read from the broker in this session and not yet acknowledged/committed."""
        return self._gate.taken if self._gate is not None else 0

    def _filters(self) -> list[tuple[str, Subscription]]:
        group = self.settings.shared_group
        return [
            (f"$share/{group}/{s.topic}" if group else s.topic, s)
            for s in self.settings.subscriptions
        ]

    def _match(self, topic: aiomqtt.Topic) -> Subscription | None:
        # A device publishes on the same topic every time: its match is remembered
        # (aiomqtt parses the filter again at every `matches`). Bounded: forgotten whole
        # past MATCH_CACHE topics, and remade by the next uplinks.
        name = topic.value
        try:
            return self._matches[name]
        except KeyError:
            pass
        found = None
        for subscription in self.settings.subscriptions:
            if topic.matches(subscription.topic):
                found = subscription
                break
        if len(self._matches) >= MATCH_CACHE:
            self._matches.clear()
        self._matches[name] = found
        return found

    def _make_client(self) -> aiomqtt.Client:
        s = self.settings
        user, password = s.credentials()
        tls: ssl.SSLContext | None = None
        if s.tls:
            tls = ssl.create_default_context(cafile=s.ca_file)
        common: dict[str, Any] = {
            "identifier": s.client_id,
            "username": user,
            "password": password,
            "keepalive": int(s.keepalive.total_seconds()),
            "tls_context": tls,
        }
        if s.protocol == "3.1.1":
            # No properties in 3.1.1: a persistent session (clean_session=False) lasts as
            # long as the broker's own policy; the in-flight bound is ours (InflightGate).
            return aiomqtt.Client(
                s.host, s.port, protocol=aiomqtt.ProtocolVersion.V311, clean_session=False, **common
            )
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = int(s.session_expiry.total_seconds())
        properties.ReceiveMaximum = s.receive_maximum
        return aiomqtt.Client(
            s.host,
            s.port,
            protocol=aiomqtt.ProtocolVersion.V5,
            # Never a clean start: the broker must keep what arrived while we were away.
            clean_start=False,
            properties=properties,
            **common,
        )

    async def run(self) -> None:
        """Consume until `stop()`; reconnect with backoff and full jitter after any loss."""
        self._warn_qos0()
        initial = self.settings.reconnect_initial.total_seconds()
        backoff = Backoff(initial, max(initial, self.settings.reconnect_max.total_seconds()))
        while not self._stopping.is_set():
            delay = 0.0
            try:
                await self._session()
            except _Refused as exc:
                delay = self._refused(exc, initial)
            except (aiomqtt.MqttError, _Reconnect) as exc:
                self._closed_at_connect = 0
                # Our own reconnect is logged once per episode by the ack loop.
                self._disconnected(None if isinstance(exc, _Reconnect) else str(exc))
                if self._was_connected:
                    # A session that got as far as CONNACK starts the backoff afresh.
                    backoff.reset()
                delay = backoff.next()
            self._was_connected = False
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=delay)
        self._disconnected(None)

    def _warn_qos0(self) -> None:
        at_most_once = [s.topic for s in self.settings.subscriptions if s.qos == 0]
        if at_most_once:
            log.warning(
                "QoS 0 subscriptions are at most once from the broker: what it sends while"
                " iotflow is down or reconnecting is lost",
                topics=at_most_once,
            )

    def _refused(self, exc: _Refused, initial: float) -> float:
        """Log a refused CONNECT once; the delay before the next attempt."""
        if exc.closed:
            self._closed_at_connect += 1
            if self._closed_at_connect < 2:
                # Once may be a broker shutting down as we connect: retry as usual.
                log.debug("Broker closed the connection at CONNECT", url=self._safe_url())
                return jittered(initial, "full")
        self._disconnected(None)
        error = str(exc)
        should, repeats = self._errors.should_log(error)
        if should:
            fields: dict[str, Any] = {"error": error, "url": self._safe_url()}
            if repeats:
                fields["repeated"] = repeats
            if exc.protocol and self.settings.protocol == "5":
                log.error(
                    f"The broker does not accept MQTT 5; if it speaks only MQTT 3.1.1, set"
                    f" {PROTOCOL_HINT}",
                    retry_every=f"{REFUSED_RETRY / 2:g}-{REFUSED_RETRY:g}s",
                    **fields,
                )
            else:
                log.error("The broker refused the connection", **fields)
        # Equal jitter: spread, but never a fast loop against a broker that says no.
        return jittered(REFUSED_RETRY, "equal")

    def _disconnected(self, error: str | None) -> None:
        if self.connected.is_set():
            self.connected.clear()
            self._metrics.mqtt_connected.set(0)
            if error is not None:
                log.warning("Broker connection lost", error=error)
        elif error is not None:
            should, repeats = self._errors.should_log(error)
            if should:
                extra = {"repeated": repeats} if repeats else {}
                log.warning("Broker unreachable", error=error, url=self._safe_url(), **extra)

    def _safe_url(self) -> str:
        return f"{'mqtts' if self.settings.tls else 'mqtt'}://{self.settings.host}:{self.settings.port}"

    async def _connect(self, client: aiomqtt.Client) -> None:
        """Enter the client; _Refused when the broker says no or hangs up at CONNECT."""
        watch = ConnectWatch(client)
        entering = asyncio.ensure_future(client.__aenter__())
        closed = asyncio.ensure_future(watch.closed.wait())
        try:
            await asyncio.wait({entering, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not entering.done():
                entering.cancel()
                await asyncio.gather(entering, return_exceptions=True)
        connected = not entering.cancelled() and entering.exception() is None
        if watch.closed.is_set():
            if connected:
                await client.__aexit__(None, None, None)
            raise _Refused(
                f"the broker closed the connection at CONNECT (MQTT {self.settings.protocol})",
                closed=True,
                protocol=True,
            )
        error = None if connected else entering.exception()
        if isinstance(error, MqttConnectError):
            rc: Any = error.rc
            code = int(getattr(rc, "value", rc) or 0)
            raise _Refused(str(error), closed=False, protocol=code in _UNSUPPORTED_PROTOCOL)
        if error is not None:
            raise error

    async def _session(self) -> None:
        client = self._make_client()
        acker = ManualAck(client)
        gate = InflightGate(client, self.settings.receive_maximum, self.pressure)
        # Acknowledgements leave in arrival order (MQTT 5 section 4.6, 3.1.1 section 4.6),
        # each once its uplink is committed; a queue per session, so nothing is acked on a
        # later connection. What is taken in is bounded by `receive_maximum` (the gate):
        # 3.1.1 has no Receive Maximum, some MQTT 5 brokers (Mosquitto 2.0.11) exceed it
        # once acknowledgements flow, and we must not take in more than we can commit.
        acks: asyncio.Queue[tuple[int, int, Awaitable[None] | None]] = asyncio.Queue(
            maxsize=self.settings.receive_maximum
        )
        await self._connect(client)
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_exit(client)
            self._client, self._gate = client, gate
            self._closed_at_connect = 0
            self._errors.reset()
            self._was_connected = True
            self.connected.set()
            self._metrics.mqtt_connected.set(1)
            log.info(
                "Broker connected",
                url=self._safe_url(),
                client_id=self.settings.client_id,
                protocol=self.settings.protocol,
            )
            for topic, subscription in self._filters():
                granted = await client.subscribe(topic, qos=subscription.qos)
                self._check_granted(topic, subscription, granted)
                log.info(
                    "Subscribed", topic=topic, format=subscription.format, qos=subscription.qos
                )
            gate.arm()
            self.consuming.set()
            log.info("Consuming uplinks", subscriptions=len(self.settings.subscriptions))
            ack_task = asyncio.create_task(self._ack_loop(acks, acker, gate))
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
                self._client, self._gate = None, None
                self.pressure.set(False)  # nothing is taken in without a session

    def _check_granted(
        self, topic: str, subscription: Subscription, granted: Sequence[object]
    ) -> None:
        first: Any = granted[0] if granted else 0
        code = int(getattr(first, "value", first))
        if code >= 0x80:
            raise aiomqtt.MqttError(f"the broker refused the subscription to {topic} ({code})")
        if code < subscription.qos:
            log.warning(
                "The broker granted a lower QoS: at most once from the broker",
                topic=topic,
                qos=subscription.qos,
                granted=code,
            )

    async def _consume(
        self,
        client: aiomqtt.Client,
        acks: asyncio.Queue[tuple[int, int, Awaitable[None] | None]],
        stop_task: asyncio.Task[bool],
        ack_task: asyncio.Task[None],
    ) -> None:
        # The reading runs as a task of its own, watched once for the whole session rather
        # than raced against the stop and the ack loop message by message (a future and a
        # wait per uplink; issue #16). Cancelled, it leaves what it read unacknowledged:
        # the broker redelivers it.
        reader = asyncio.create_task(self._read(client, acks), name="mqtt-source-read")
        try:
            await asyncio.wait({reader, stop_task, ack_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not reader.done():
                reader.cancel()
                await asyncio.wait({reader})
        if ack_task.done() and not ack_task.cancelled():
            ack_task.result()  # raises _Reconnect: a commit failed
        if not reader.cancelled():
            reader.result()  # raises MqttError: the connection is lost

    async def _read(
        self, client: aiomqtt.Client, acks: asyncio.Queue[tuple[int, int, Awaitable[None] | None]]
    ) -> None:
        async for message in Messages(client):
            payload = message.payload if isinstance(message.payload, bytes) else b""
            incoming = Incoming(message.topic.value, payload, self._match(message.topic))
            pending = self._handler(incoming)
            # A broker over our quota: this waits for room (the ack loop makes it).
            await acks.put((message.mid, message.qos, pending))

    async def _ack_loop(
        self,
        acks: asyncio.Queue[tuple[int, int, Awaitable[None] | None]],
        acker: ManualAck,
        gate: InflightGate,
    ) -> None:
        while True:
            mid, qos, pending = await acks.get()
            if mid < 0:
                return  # the stop marker, queued after the last message
            if pending is not None:
                try:
                    await pending
                except Exception as exc:
                    if qos == 0:
                        # Nothing to redeliver at QoS 0: reconnecting would not bring it back.
                        log.error("Uplink not committed; lost (QoS 0)", error=str(exc))
                        gate.release()
                        continue
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
            gate.release()

    async def publish(self, topic: str, payload: bytes) -> None:
        """Publish on the source broker (alarm notifications), QoS 1."""
        client = self._client
        if client is None or not self.connected.is_set():
            raise ConnectionError("not connected to the broker")
        await client.publish(topic, payload, qos=1)

    def stop(self) -> None:
        self._stopping.set()
