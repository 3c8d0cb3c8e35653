"""The source broker: MQTT 5 or 3.1.1, a persistent session, manual acknowledgement in
arrival order for QoS 1, a bound on what is taken in, and a quick return after a blip."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import time
from collections import deque
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
from iotflow.sources.ack import ConnectWatch, InflightGate, ManualAck, disconnection
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


class _Commits:
    """Whether the spool's commits are failing: an episode is logged at its start and at its
    end, not at every reconnect it causes."""

    def __init__(self, stopping: asyncio.Event) -> None:
        self.failing = False
        self._stopping = stopping

    def failed(self, error: BaseException) -> None:
        if not self.failing and not self._stopping.is_set():
            self.failing = True
            log.warning(
                "Uplink not committed; reconnecting for redelivery",
                error=str(error),
                # A bug: its traceback (the exception's own: none is being handled here).
                exc_info=False if isinstance(error, IotflowError) else error,
            )

    def committed(self) -> None:
        self.failing = False
        log.info("Uplinks committed again")


class _Acks:
    """One session's messages waiting for their commit, acknowledged in arrival order (MQTT
    5 section 4.6, 3.1.1 section 4.6), each once its uplink is committed.

    No task waits on each commit in turn: a commit that ends wakes `flush`, which takes
    every message at the head whose commit has ended and writes their PUBACKs at once. A
    group commit ends hundreds together, and they leave in one `send` (issue #16). A commit
    that failed ends the session (`failed`) without acknowledging it or anything after it:
    the broker redelivers them to the next one. Closed with its session: a commit that ends
    later acknowledges nothing on another connection.
    """

    def __init__(self, commits: _Commits, acker: ManualAck) -> None:
        self._commits = commits
        self._acker = acker
        self._gate: InflightGate | None = None
        self._waiting: deque[tuple[int, int, asyncio.Future[None] | None]] = deque()
        self.failed = asyncio.Event()
        self.error: _Reconnect | None = None
        self.drained = asyncio.Event()
        self.drained.set()
        self.closed = False
        self.arrived: list[tuple[bytes, bytes, int, int]] = []  # read, not handled yet

    def bind(self, gate: InflightGate) -> None:
        self._gate = gate

    def add(self, mid: int, qos: int, pending: Awaitable[None] | None) -> None:
        future = None if pending is None else asyncio.ensure_future(pending)
        self._waiting.append((mid, qos, future))
        self.drained.clear()
        if future is None or future.done():
            self.flush()
        else:
            future.add_done_callback(self._ended)

    def close(self) -> None:
        self.closed = True

    def _ended(self, _: asyncio.Future[None]) -> None:
        self.flush()

    def flush(self) -> None:
        if self.closed:
            return
        waiting, commits = self._waiting, self._commits
        mids: list[int] = []
        done = 0
        while waiting:
            mid, qos, pending = waiting[0]
            if pending is not None:
                if not pending.done():
                    break
                error = (
                    asyncio.CancelledError("the commit was cancelled")
                    if pending.cancelled()
                    else pending.exception()
                )
                if error is not None:
                    if qos != 0:
                        self._fail(error)
                        break
                    # Nothing to redeliver at QoS 0: reconnecting would not bring it back.
                    log.error("Uplink not committed; lost (QoS 0)", error=str(error))
                elif commits.failing:
                    commits.committed()
            waiting.popleft()
            done += 1
            if qos == 1:
                mids.append(mid)
            elif qos == 2:  # never subscribed to (0 or 1); should a broker send it: paho's way
                self._acker.ack_many(mids)
                mids = []
                self._acker.ack(mid, qos)
        if mids:
            self._acker.ack_many(mids)
        if done and self._gate is not None:
            self._gate.release(done)
        if not waiting:
            self.drained.set()

    def _fail(self, error: BaseException) -> None:
        """A commit failed: not acknowledged; the broker redelivers it on the next session."""
        self.closed = True
        self._commits.failed(error)
        self.error = _Reconnect(str(error))
        self.error.__cause__ = error
        self.failed.set()


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
        self._commits = _Commits(self._stopping)  # one per source: outlives its sessions
        self._gate: InflightGate | None = None
        self._errors = _ErrorLog()
        self._closed_at_connect = 0  # consecutive sessions closed before their CONNACK
        self._was_connected = False  # the last session got its CONNACK
        # A topic as read -> its name and subscription (_incoming).
        self._matches: dict[bytes, tuple[str, Subscription | None]] = {}

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

    def _match(self, name: str) -> Subscription | None:
        try:
            topic = aiomqtt.Topic(name)
        except ValueError:  # not a topic a broker should send (empty, wildcards): no match
            return None
        for subscription in self.settings.subscriptions:
            if topic.matches(subscription.topic):
                return subscription
        return None

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
        # Each message is acknowledged once its uplink is committed, in arrival order, on
        # this session's connection only (_Acks). What is taken in is bounded by
        # `receive_maximum` (the gate): 3.1.1 has no Receive Maximum, some MQTT 5 brokers
        # (Mosquitto 2.0.11) exceed it once acknowledgements flow, and we must not take in
        # more than we can commit.
        acks = _Acks(self._commits, acker)
        gate = InflightGate(
            client,
            self.settings.receive_maximum,
            self.pressure,
            on_message=functools.partial(self._arrived, acks),
        )
        acks.bind(gate)
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
            try:
                await self._consume(client, acks, gate)
            finally:
                acks.close()
                self._client, self._gate = None, None
                self.pressure.set(False)  # nothing is taken in without a session

    def _arrived(self, acks: _Acks, topic: bytes, payload: bytes, mid: int, qos: int) -> None:
        """One message, as it is read: handled once the read that brought it is done.

        Handled inside paho's read, in the reader's callback, the live uplinks' latency
        at 3,500/s went from about 8 to 12 ms at the median; handled in one callback after
        it, 6 ms (`bench_routing.py --rate 3500`, docs/performance.md, "Round 5")."""
        if not acks.arrived:
            asyncio.get_running_loop().call_soon(self._handle_arrived, acks)
        acks.arrived.append((topic, payload, mid, qos))

    def _handle_arrived(self, acks: _Acks) -> None:
        arrived, acks.arrived = acks.arrived, []
        if acks.closed:
            return  # the session ended: the broker redelivers them, unacknowledged
        for topic, payload, mid, qos in arrived:
            self._handle(acks, topic, payload, mid, qos)

    def _handle(self, acks: _Acks, topic: bytes, payload: bytes, mid: int, qos: int) -> None:
        """One message: handed to the daemon, then waits for its commit to be acknowledged."""
        incoming = self._incoming(topic, payload)
        try:
            pending = self._handler(incoming)
        except Exception as exc:
            # A bug: redelivered, it would fail again at every session. It is acknowledged
            # (lost, and said so) so that the messages after it go on.
            log.error(
                "Uplink not handled; acknowledged without a commit",
                topic=incoming.topic,
                error=f"{type(exc).__name__}: {exc}",
                exc_info=True,
            )
            pending = None
        acks.add(mid, qos, pending)

    def _incoming(self, topic: bytes, payload: bytes) -> Incoming:
        try:
            name, subscription = self._matches[topic]
        except KeyError:
            try:
                name = topic.decode()
            except UnicodeDecodeError:  # MQTT requires UTF-8; a broker may not check
                return Incoming(topic.decode("utf-8", "replace"), payload, None)
            subscription = self._match(name)
            # A device publishes on the same topic every time: its match is remembered
            # (aiomqtt parses the filter again at every `matches`). Bounded: forgotten
            # whole past MATCH_CACHE topics, and remade by the next uplinks.
            if len(self._matches) >= MATCH_CACHE:
                self._matches.clear()
            self._matches[topic] = (name, subscription)
        return Incoming(name, payload, subscription)

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

    async def _consume(self, client: aiomqtt.Client, acks: _Acks, gate: InflightGate) -> None:
        """Until the connection is lost, a commit fails, or the source stops."""
        lost: asyncio.Future[Any] = disconnection(client)
        failed: asyncio.Future[Any] = asyncio.ensure_future(acks.failed.wait())
        stopping: asyncio.Future[Any] = asyncio.ensure_future(self._stopping.wait())
        drained: asyncio.Future[Any] | None = None
        try:
            await asyncio.wait({lost, failed, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if stopping.done() and not (lost.done() or failed.done()):
                # Stop: read no more; commits under way finish and are acknowledged first.
                gate.stop_reading()
                drained = asyncio.ensure_future(acks.drained.wait())
                await asyncio.wait(
                    {drained, lost, failed}, timeout=10, return_when=asyncio.FIRST_COMPLETED
                )
        finally:
            for waiter in (failed, stopping, drained):
                if waiter is not None:
                    waiter.cancel()
        if acks.error is not None:
            raise acks.error
        if lost.done():
            cause = None if lost.cancelled() else lost.exception()  # retrieved, stopping too
            if not self._stopping.is_set():
                raise aiomqtt.MqttError("Disconnected during message iteration") from cause

    async def publish(self, topic: str, payload: bytes) -> None:
        """Publish on the source broker (alarm notifications), QoS 1."""
        client = self._client
        if client is None or not self.connected.is_set():
            raise ConnectionError("not connected to the broker")
        await client.publish(topic, payload, qos=1)

    def stop(self) -> None:
        self._stopping.set()
