"""One connection's deliveries: queue, workers, retries, expiry, order and circuit."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from prometheus_client import Counter
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from iotflow import backoff
from iotflow.config.model import DeliverySettings
from iotflow.connectors.common import PROBE_BACKOFF_CAP_SECONDS
from iotflow.connectors.connection import Connection
from iotflow.delivery.circuit import Circuit, Expired
from iotflow.delivery.pressure import IngestPressure
from iotflow.errors import (
    AuthenticationSinkError,
    PermanentSinkError,
    RetryableSinkError,
    SinkError,
)
from iotflow.processors import Pipeline, ProcessorError
from iotflow.sinks import Sink
from iotflow.spool import DeadLetter, Delivery, Spool
from iotflow.states import ConnectionState, Outcome
from iotflow.telemetry.logging import get_logger
from iotflow.telemetry.metrics import Metrics

log = get_logger("iotflow.delivery")

# Characters of an unexpected exception's message kept in a reason (events, lastError).
MAX_REASON = 512
# Characters of a cloud's answer kept in a dead letter: enough to read the error, and a
# cloud that answers megabytes does not fill the disk with them.
MAX_BODY = 2048

# Told when a delivery fed by a replay ends: (replay id, connection id, outcome).
Replayed = Callable[[str, str, str], None]


class EventRecorder(Protocol):
    """Where a worker reports what an operator should see in the connection's event log."""

    def __call__(self, connection_id: str, kind: str, data: dict[str, Any]) -> None: ...


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


@dataclass(slots=True)
class Statistics:
    received: int = 0
    delivered: int = 0
    retried: int = 0
    expired: int = 0
    failed: int = 0
    dropped: int = 0
    filtered: int = 0
    pending: int = 0
    lastError: str | None = None
    lastDeliveryTime: float | None = None

    def document(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "delivered": self.delivered,
            "retried": self.retried,
            "expired": self.expired,
            "failed": self.failed,
            "dropped": self.dropped,
            "filtered": self.filtered,
            "pending": self.pending,
            "lastError": self.lastError,
            "lastDeliveryTime": None
            if self.lastDeliveryTime is None
            else iso(self.lastDeliveryTime),
        }


def background_share(max_in_flight: int) -> int:
    """How many of a connection's sends may carry replayed or re-sent deliveries at once:
    half of `max_in_flight` (at least 1); the rest is kept for live uplinks."""
    return max(1, max_in_flight // 2)


def _background(delivery: Delivery) -> bool:
    """A replayed uplink or a re-sent dead letter: an old copy, behind live traffic."""
    return delivery.replay is not None or delivery.letter is not None


@dataclass(slots=True)
class _Refill:
    """One lane's reading back from the spool (what did not fit in memory, or was there
    at start). Each lane has its own, so that live deliveries are never read back behind
    thousands of re-sent ones that came before them."""

    spilled: bool = True  # at start, what is pending is in the spool
    dirty: bool = False  # an offer was left in the spool while a read was under way
    last_loaded: int = 0  # the highest id of the lane pushed to the backlog


@dataclass(slots=True)
class _Device:
    """One device's deliveries in memory, per lane, each in id order."""

    live: deque[Delivery] = field(default_factory=deque)
    background: deque[Delivery] = field(default_factory=deque)
    busy: bool = False  # a worker holds one of its deliveries
    queued_live: bool = False  # it has an entry in _Backlog.live_ready
    queued_background: bool = False  # in _Backlog.background_ready


@dataclass(slots=True)
class _Backlog:
    """Deliveries held in memory in two lanes, one FIFO per device and lane.

    Live deliveries are taken first; replayed and re-sent ones (the background lane) only
    when no live device is ready, and at most `share` of them on the wire at once. A device
    has one delivery on the wire at most, whichever its lane: that serialises one device's
    sends while other devices go out in parallel. Within a lane a device's order is kept;
    between lanes, live first (docs/deadletters.md). A ready list may hold entries that no
    longer apply (the device was taken through its other lane): they are skipped.
    """

    share: int = 1
    devices: dict[str, _Device] = field(default_factory=dict)
    live_ready: deque[str] = field(default_factory=deque)
    background_ready: deque[str] = field(default_factory=deque)
    background_busy: int = 0  # background deliveries taken and not released
    size: int = 0  # both lanes
    sizes: dict[bool, int] = field(default_factory=lambda: {False: 0, True: 0})  # by lane
    _waiters: deque[asyncio.Future[None]] = field(default_factory=deque)

    def push(self, delivery: Delivery) -> None:
        device = self.devices.get(delivery.dev_eui)
        if device is None:
            device = self.devices[delivery.dev_eui] = _Device()
        if _background(delivery):
            device.background.append(delivery)
        else:
            device.live.append(delivery)
        self.size += 1
        self.sizes[_background(delivery)] += 1
        if not device.busy:
            self._queue(delivery.dev_eui, device)

    def _queue(self, dev_eui: str, device: _Device) -> None:
        if device.live and not device.queued_live:
            device.queued_live = True
            self.live_ready.append(dev_eui)
            self._wake()
        if device.background and not device.queued_background:
            device.queued_background = True
            self.background_ready.append(dev_eui)
            if self.background_busy < self.share:
                self._wake()

    def _takeable(self) -> bool:
        # May be true of stale entries only: a worker woken for nothing waits again.
        return bool(self.live_ready) or (
            bool(self.background_ready) and self.background_busy < self.share
        )

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _take_now(self) -> Delivery | None:
        while self.live_ready:
            dev_eui = self.live_ready.popleft()
            device = self.devices[dev_eui]
            device.queued_live = False
            if not device.busy and device.live:
                device.busy = True
                return device.live.popleft()
            self._forget(dev_eui, device)
        while self.background_ready and self.background_busy < self.share:
            dev_eui = self.background_ready.popleft()
            device = self.devices[dev_eui]
            device.queued_background = False
            if not device.busy and device.background:
                device.busy = True
                self.background_busy += 1
                return device.background.popleft()
            self._forget(dev_eui, device)
        return None

    def _forget(self, dev_eui: str, device: _Device) -> None:
        """A skipped entry was the last trace of an idle device with nothing left."""
        idle = not (device.busy or device.live or device.background)
        if idle and not (device.queued_live or device.queued_background):
            del self.devices[dev_eui]

    async def take(self) -> Delivery:
        """The next delivery to send: a live one if any device has one ready."""
        while True:
            delivery = self._take_now()
            if delivery is not None:
                self.size -= 1
                self.sizes[_background(delivery)] -= 1
                if self._takeable():
                    self._wake()  # more is ready: another waiting worker goes too
                return delivery
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken, then cancelled: the wake goes to another
                raise

    def release(self, delivery: Delivery) -> None:
        """A worker is done with `delivery`: let its device's next one go."""
        device = self.devices[delivery.dev_eui]
        device.busy = False
        if _background(delivery):
            self.background_busy -= 1
            if self.background_ready and self.background_busy < self.share:
                self._wake()  # a background slot is free for another device
        if device.live or device.background:
            self._queue(delivery.dev_eui, device)
        elif not (device.queued_live or device.queued_background):
            del self.devices[delivery.dev_eui]


class ConnectionWorker:
    """Delivers one connection's deliveries through its sink, `max_in_flight` at a time.

    Memory is bounded: past `memory_queue` deliveries (half for each lane: live, and
    replayed or re-sent) the worker stops holding new ones (they are in the spool anyway)
    and reads them back from the spool as the lane drains.
    """

    def __init__(
        self,
        connection: Connection,
        sink: Sink,
        *,
        spool: Spool,
        metrics: Metrics,
        settings: DeliverySettings,
        record: EventRecorder,
        stats: Statistics | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        replayed: Replayed | None = None,
        pressure: IngestPressure | None = None,
    ) -> None:
        self.connection = connection
        self._replayed = replayed
        # A backlog read back from the spool gives way to ingest (delivery/pressure.py).
        self._pressure = pressure if pressure is not None else IngestPressure()
        self.id = connection.id
        self._sink = sink
        self._spool = spool
        self._metrics = metrics
        self._record = record
        self._clock = clock
        self._sleep = sleep  # between retries; a test gives one that follows its clock
        # Whatever a cloud or an exception says is cleaned of the connection's secrets
        # before it is stored (lastError, events) or logged.
        self._redact = connection.redactor()
        self.settings = settings
        # A worker that replaces another (the connection was edited) carries its statistics on.
        self.stats = stats if stats is not None else Statistics()
        self.startup_time: float | None = None
        self.state = ConnectionState.OPENING if connection.active else ConnectionState.DEACTIVATED
        self.out_of_service: str | None = None  # why, once taken out of service
        self._auth_failed = False
        self._backlog = _Backlog(share=background_share(settings.max_in_flight))
        # Keyed by lane (background or not); each lane holds half of memory_queue at most.
        self._refill = {False: _Refill(), True: _Refill()}
        self._lane_memory = settings.memory_queue // 2
        self._refill_wanted = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sending: set[asyncio.Task[None]] = set()
        # Send tasks are made as devices get ready, up to max_in_flight, and then kept:
        # an idle connection holds none (1,000 connections x 32 idle tasks was tens of MB).
        self._started = False
        self._workers = 0
        self._idle_workers = 0
        self._stopping = False
        validity = connection.validity_seconds
        self._validity = (
            validity if validity is not None else settings.default_time_validity.total_seconds()
        )
        self._circuit = Circuit(
            threshold=settings.circuit_failures,
            initial=settings.retry_initial.total_seconds(),
            cap=PROBE_BACKOFF_CAP_SECONDS[connection.configuration.reconnectStrategy],
            clock=clock,
            on_change=self._circuit_changed,
        )
        # upOperations compiled once per worker (a connection edit makes a new worker);
        # None keeps the path without processors free of any parse.
        self._pipeline = Pipeline(connection.upOperations) if connection.upOperations else None
        self._latency = metrics.latency.labels(self.id)
        # Read at each scrape: no gauge update (a lock each) per offer and per delivery.
        metrics.spool_pending.labels(self.id).set_function(lambda: self.stats.pending)
        # The deliveries counter's child per outcome, looked up once: `labels` takes a lock
        # and builds a key at every call, once per delivery (issue #16).
        self._outcomes: dict[Outcome, Counter] = {}

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start sending what the spool holds for this connection and what is offered."""
        self.startup_time = self._clock()
        self._set_state(self.state)
        if not self.connection.active:
            return
        await self._sink.start()
        # A sink whose session opens at the first delivery (MQTT) stays OPENING until then.
        healthy = await self._sink.healthcheck()
        self._set_state(ConnectionState.OPENED if healthy else ConnectionState.OPENING)
        self._spawn(self._refill_loop())
        self._started = True
        self._more_workers()
        self._refill_wanted.set()

    async def stop(self, deadline: float) -> None:
        """Stop taking deliveries; sends already on the wire get until `deadline` (monotonic)."""
        self._stopping = True
        for task in self._tasks - self._sending:
            task.cancel()
        if self._sending:
            await asyncio.wait(set(self._sending), timeout=max(0.0, deadline - time.monotonic()))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._sink.close()

    @property
    def in_flight(self) -> int:
        """Sends on the wire now (what a stop waits for)."""
        return len(self._sending)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro, name=f"worker:{self.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def nothing_stored(self) -> None:
        """The spool holds nothing of this connection yet (a new worker, with none pending
        when it was made): it need not be read before the first offer. With 1,000
        connections, start-up made 2,000 reads that found nothing (issue #16)."""
        for refill in self._refill.values():
            refill.spilled = False

    # -- intake ----------------------------------------------------------------------------

    def offer(self, delivery: Delivery) -> None:
        """A delivery just committed to the spool for this connection."""
        self.stats.received += 1
        self.stats.pending += 1
        if not self.connection.active or self._stopping:
            return
        lane = _background(delivery)
        refill = self._refill[lane]
        if delivery.id <= refill.last_loaded:
            # The refill read it from the spool between its commit and this offer: it is in
            # the backlog already, and pushing it again would send it twice.
            return
        held = self._backlog.sizes[lane]
        if refill.spilled or held >= self._lane_memory:
            refill.spilled = True
            refill.dirty = True
            if held < self._lane_memory // 4:
                self._refill_wanted.set()
            return
        refill.last_loaded = delivery.id
        self._backlog.push(delivery)
        self._more_workers()

    async def _refill_loop(self) -> None:
        """Read back from the spool what did not fit in memory (or was there at start),
        each lane on its own, live first."""
        limit = max(8, self._lane_memory // 2)
        while True:
            await self._refill_wanted.wait()
            self._refill_wanted.clear()
            read = True
            while read:
                read = False
                for lane, refill in self._refill.items():
                    room = self._lane_memory - self._backlog.sizes[lane]
                    if not refill.spilled or room < limit // 2:
                        continue  # refilled when the lane has drained further
                    read = True
                    refill.dirty = False
                    rows = await self._spool.load(
                        self.id, after_id=refill.last_loaded, limit=room, background=lane
                    )
                    for row in rows:
                        refill.last_loaded = row.id
                        self._backlog.push(row)
                    self._more_workers()
                    # No await between this check and the switch: an offer cannot slip
                    # between.
                    if len(rows) < room and not refill.dirty:
                        refill.spilled = False

    # -- sending ---------------------------------------------------------------------------

    def _more_workers(self) -> None:
        """Make send tasks for the devices that are ready and that no idle task will take."""
        if not self._started or self._stopping:
            return
        backlog = self._backlog
        # Ready entries may be stale (skipped when taken): at worst a task too many, kept.
        ready = len(backlog.live_ready) + min(
            len(backlog.background_ready), max(0, backlog.share - backlog.background_busy)
        )
        wanted = ready - self._idle_workers
        while wanted > 0 and self._workers < self.settings.max_in_flight:
            self._workers += 1
            self._idle_workers += 1  # idle from now: it takes the next ready device
            wanted -= 1
            self._spawn(self._work_loop())

    async def _work_loop(self) -> None:
        backlog = self._backlog
        while not self._stopping:
            try:
                delivery = await backlog.take()
            finally:
                self._idle_workers -= 1
            lane = _background(delivery)
            if self._refill[lane].spilled and backlog.sizes[lane] < self._lane_memory // 4:
                self._refill_wanted.set()
            task = asyncio.current_task()
            assert task is not None
            self._sending.add(task)
            try:
                if self._refill[lane].spilled and self._pressure.high:
                    await self._pressure.give_way()
                await self._deliver(delivery)
            except Exception as exc:
                # _deliver ends every delivery itself; this is the last guard of the worker
                # task, which must outlive any bug so that the connection keeps delivering.
                log.error(
                    "Delivery worker error",
                    connection=self.id,
                    devEUI=delivery.dev_eui,
                    error=self._describe(exc),
                    where=_where(exc),
                )
            finally:
                self._sending.discard(task)
                self._idle_workers += 1
                backlog.release(delivery)

    async def _deliver(self, delivery: Delivery) -> None:
        # A flow's validity, stored with the delivery, wins over the connection's.
        validity = delivery.validity if delivery.validity is not None else self._validity
        # A re-sent dead letter or a replayed uplink counts its validity from the request.
        start = delivery.since if delivery.since is not None else delivery.uplink_time
        deadline = start + validity
        if self._clock() >= deadline:
            self._finish(delivery, Outcome.EXPIRED, "older than uplinkTimeValidity on arrival")
            return
        if self._pipeline is not None:
            # Once per delivery, before the first attempt: retries send the same document.
            try:
                document = self._pipeline.apply_bytes(delivery.document)
            except ProcessorError as exc:
                reason = self._redact(str(exc)[:MAX_REASON])
                self._note_error(reason)
                self._finish(delivery, Outcome.FAILED, reason)
                return
            if document is None:
                self._finish(delivery, Outcome.FILTERED)
                return
            delivery = dataclasses.replace(delivery, document=document, source=delivery.document)
        last: SinkError | None = None
        try:
            try:
                # Most deliveries go out at the first attempt: the retry machinery is built
                # only for those that need it (issue #16).
                await self._attempt(delivery, deadline)
            except RetryableSinkError as exc:
                last = exc
                if self._clock() >= deadline:
                    raise
                # The first retry's wait, as tenacity would have computed it after attempt 1.
                wait = self._wait(exc, 1, deadline)
                self._before_sleep()
                await self._sleep(wait)
                retrying = AsyncRetrying(
                    retry=retry_if_exception_type(RetryableSinkError),
                    # Its attempt 1 is the delivery's attempt 2.
                    wait=lambda state: self._wait(
                        _error(state), state.attempt_number + 1, deadline
                    ),
                    stop=lambda state: self._clock() >= deadline,
                    before_sleep=lambda state: self._before_sleep(),
                    sleep=self._sleep,
                    reraise=True,
                )
                async for attempt in retrying:
                    with attempt:
                        try:
                            await self._attempt(delivery, deadline)
                        except SinkError as error:
                            last = error
                            raise
        except Expired:
            reason = str(last) if last else "validity ran out while the connection was closed"
            self._finish(delivery, Outcome.EXPIRED, reason, last)
        except PermanentSinkError as exc:
            self._finish(delivery, Outcome.FAILED, str(exc), exc)
        except RetryableSinkError as exc:
            self._finish(delivery, Outcome.EXPIRED, str(exc), exc)
        except Exception as exc:
            # Not one of the sink's three answers: a bug, or a value nothing could send (a
            # template, a processor). This delivery fails; the worker and the others go on.
            # CancelledError is not an Exception: a stopping worker leaves it in the spool.
            reason = self._describe(exc)
            self._note_error(reason)
            self._finish(delivery, Outcome.FAILED, reason, unexpected=exc)
        else:
            self._finish(delivery, Outcome.DELIVERED)

    async def _attempt(self, delivery: Delivery, deadline: float) -> None:
        circuit = self._circuit
        # A healthy circuit is asked nothing: no coroutine before or after the send.
        probe = False if circuit.healthy else await circuit.acquire(deadline)
        delivery.attempts += 1
        delivery.last_attempt = self._clock()
        if delivery.first_attempt is None:
            delivery.first_attempt = delivery.last_attempt
        try:
            await self._sink.send(delivery)
        except AuthenticationSinkError as exc:
            self._note_error(exc)
            self._auth_failed = True
            self._set_state(ConnectionState.AUTHENTICATION_FAILED)
            await circuit.failure(probe)
            raise
        except RetryableSinkError as exc:
            self._note_error(exc)
            await circuit.failure(probe)
            raise
        except PermanentSinkError as exc:
            # The cloud answered: it is reachable, this one delivery is what it refuses.
            self._note_error(exc)
            await circuit.success(probe)
            raise
        except BaseException:
            # No answer from the cloud (cancelled, or an error of ours): says nothing about
            # its health, but the probe's slot is freed so that another may go.
            await circuit.release(probe)
            raise
        if probe or not circuit.quiet:
            await circuit.success(probe)
        if self._auth_failed or self.state == ConnectionState.OPENING:
            self._auth_failed = False
            self._set_state(ConnectionState.OPENED)

    def _wait(self, error: BaseException | None, attempt: int, deadline: float) -> float:
        """The wait after failed attempt number `attempt`: exponential backoff with full
        jitter, at least the cloud's Retry-After, and never past the deadline (the last
        attempt happens as the validity runs out)."""
        settings = self.settings
        cap = settings.retry_max.total_seconds()
        if isinstance(error, AuthenticationSinkError):
            top = cap  # credentials rarely fix themselves
        else:
            top = backoff.ceiling(settings.retry_initial.total_seconds(), cap, attempt)
        wait = backoff.jittered(top, "full")
        if isinstance(error, RetryableSinkError) and error.retry_after is not None:
            wait = max(wait, error.retry_after)
        return max(0.0, min(wait, deadline - self._clock()))

    def _before_sleep(self) -> None:
        self.stats.retried += 1
        self._metrics.retries.labels(self.id).inc()

    # -- outcomes --------------------------------------------------------------------------

    def _note_error(self, error: SinkError | str) -> None:
        self.stats.lastError = self._redact(str(error))

    def _describe(self, exc: BaseException) -> str:
        """`"<ExceptionType>: message"`, bounded, without the connection's secrets."""
        try:
            message = str(exc)
        except Exception:  # an exception whose __str__ fails must not fail the worker
            message = "(message unavailable)"
        text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
        return self._redact(text[:MAX_REASON])

    def _finish(
        self,
        delivery: Delivery,
        outcome: Outcome,
        reason: str = "",
        error: SinkError | None = None,
        *,
        unexpected: Exception | None = None,
    ) -> None:
        now = self._clock()
        if delivery.replay is not None and self._replayed is not None:
            self._replayed(delivery.replay, self.id, outcome)
        if outcome in (Outcome.DELIVERED, Outcome.FILTERED):
            if delivery.letter is None and delivery.replay is None:
                self._spool.complete(delivery.id)
            else:  # the letter it re-sent leaves, its replay counts it: with the delete
                self._spool.complete(delivery.id, final=delivery, outcome=outcome)
        self.stats.pending -= 1
        counter = self._outcomes.get(outcome)
        if counter is None:
            counter = self._outcomes[outcome] = self._metrics.deliveries.labels(self.id, outcome)
        counter.inc()
        if outcome == Outcome.DELIVERED:
            self.stats.delivered += 1
            self.stats.lastDeliveryTime = now
            self._latency.observe(max(0.0, now - delivery.received_at))
            return
        if outcome == Outcome.FILTERED:
            # An operator's choice, not a fault: counted (metric, statistics), no event or
            # log line per delivery, which would flood both at the uplink rate.
            self.stats.filtered += 1
            return
        if outcome == Outcome.EXPIRED:
            self.stats.expired += 1
        else:
            self.stats.failed += 1
        reason = self._redact(reason)
        data: dict[str, Any] = {
            "devEUI": delivery.dev_eui,
            "uplinkTime": iso(delivery.uplink_time),
            "attempts": delivery.attempts,
            "reason": reason,
        }
        status: int | None = None
        body: str | None = None
        if error is not None and error.status is not None:
            status = error.status
            body = self._redact(error.body)[:MAX_BODY]
            data["status"] = status
            data["body"] = body
        # Kept as a dead letter, in the same transaction as the delivery's delete.
        self._spool.complete(
            delivery.id,
            final=delivery,
            outcome=outcome,
            letter=DeadLetter(str(outcome), reason, status, body, now),
        )
        where = {"where": _where(unexpected)} if unexpected is not None else {}
        log.warning(
            "Delivery expired" if outcome == Outcome.EXPIRED else "Delivery failed",
            connection=self.id,
            devEUI=delivery.dev_eui,
            attempts=delivery.attempts,
            error=reason,
            **where,
        )
        if unexpected is not None:
            # Where it came from, for a bug report: code locations only, no messages or
            # values, so that no secret can ride along.
            log.debug(
                "Delivery failed with an unexpected error",
                connection=self.id,
                traceback="".join(traceback.format_tb(unexpected.__traceback__)),
            )
        self._record(self.id, f"delivery_{outcome}", data)

    def drop_all(self) -> int:
        """The connection is deleted: what it had pending is dropped, and counted."""
        dropped = self.stats.pending
        if dropped:
            self._metrics.deliveries.labels(self.id, Outcome.DROPPED).inc(dropped)
            self.stats.dropped += dropped
            self.stats.pending = 0
        return dropped

    # -- state -----------------------------------------------------------------------------

    def _circuit_changed(self, healthy: bool) -> None:
        if healthy and self._auth_failed:
            self._set_state(ConnectionState.AUTHENTICATION_FAILED)
        elif healthy:
            self._set_state(ConnectionState.OPENED)
        elif not self._auth_failed:
            self._set_state(ConnectionState.CLOSED)

    def take_out_of_service(self, reason: str) -> str:
        """This connection cannot run (see Deliveries): CLOSED, with the reason as lastError.

        Nothing is sent until the connection is replaced; what is routed to it meanwhile
        waits in the spool. The caller logs it once, so no state-change line here.
        Returns the reason as shown (cleaned of the connection's secrets).
        """
        reason = self._redact(reason)
        self.out_of_service = reason
        self.stats.lastError = reason
        self.state = (
            ConnectionState.CLOSED if self.connection.active else ConnectionState.DEACTIVATED
        )
        self._metrics.set_state(self.id, self.state)
        return reason

    def _set_state(self, state: ConnectionState) -> None:
        previous, self.state = self.state, state
        self._metrics.set_state(self.id, state)
        if previous != state:
            log.info("Connection state changed", connection=self.id, state=state, previous=previous)
            self._record(self.id, "state_changed", {"state": state, "previous": previous})


def _error(state: RetryCallState) -> BaseException | None:
    return state.outcome.exception() if state.outcome else None


def _where(exc: BaseException | None) -> str:
    """The innermost frame an exception was raised in, as `file:line in function`."""
    tb = exc.__traceback__ if exc is not None else None
    if tb is None:
        return "unknown"
    frame = traceback.extract_tb(tb)[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}"
