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


@dataclass(slots=True)
class _Backlog:
    """Deliveries held in memory, one FIFO per device so that a device's order is kept.

    A device is in `ready` at most once, and only while no worker holds it: that is what
    serialises one device's deliveries while other devices go out in parallel.
    """

    devices: dict[str, deque[Delivery]] = field(default_factory=dict)
    ready: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    size: int = 0

    def push(self, delivery: Delivery) -> None:
        queue = self.devices.get(delivery.dev_eui)
        if queue is None:
            self.devices[delivery.dev_eui] = deque((delivery,))
            self.ready.put_nowait(delivery.dev_eui)
        else:
            queue.append(delivery)
        self.size += 1

    def release(self, dev_eui: str) -> None:
        """A worker is done with one delivery of `dev_eui`: let the device's next one go."""
        if self.devices[dev_eui]:
            self.ready.put_nowait(dev_eui)
        else:
            del self.devices[dev_eui]


class ConnectionWorker:
    """Delivers one connection's deliveries through its sink, `max_in_flight` at a time.

    Memory is bounded: past `memory_queue` deliveries the worker stops holding new ones
    (they are in the spool anyway) and reads them back from the spool as it drains.
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
    ) -> None:
        self.connection = connection
        self._replayed = replayed
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
        self._backlog = _Backlog()
        self._spilled = True  # at start, what is pending is in the spool
        self._dirty = False
        self._last_loaded = 0
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
        self._pending_gauge = metrics.spool_pending.labels(self.id)
        # The deliveries counter's child per outcome, looked up once: `labels` takes a lock
        # and builds a key at every call, once per delivery (issue #16).
        self._outcomes: dict[Outcome, Counter] = {}

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start sending what the spool holds for this connection and what is offered."""
        self._pending_gauge.set(self.stats.pending)
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

    # -- intake ----------------------------------------------------------------------------

    def offer(self, delivery: Delivery) -> None:
        """A delivery just committed to the spool for this connection."""
        self.stats.received += 1
        self.stats.pending += 1
        self._pending_gauge.inc()
        if not self.connection.active or self._stopping:
            return
        if delivery.id <= self._last_loaded:
            # The refill read it from the spool between its commit and this offer: it is in
            # the backlog already, and pushing it again would send it twice.
            return
        if self._spilled or self._backlog.size >= self.settings.memory_queue:
            self._spilled = True
            self._dirty = True
            if self._backlog.size < self.settings.memory_queue // 4:
                self._refill_wanted.set()
            return
        self._last_loaded = delivery.id
        self._backlog.push(delivery)
        self._more_workers()

    async def _refill_loop(self) -> None:
        """Read back from the spool what did not fit in memory (or was there at start)."""
        limit = max(16, self.settings.memory_queue // 2)
        while True:
            await self._refill_wanted.wait()
            self._refill_wanted.clear()
            while self._spilled:
                room = self.settings.memory_queue - self._backlog.size
                if room < limit // 2:
                    break  # refilled when the backlog has drained further
                self._dirty = False
                rows = await self._spool.load(self.id, after_id=self._last_loaded, limit=room)
                for row in rows:
                    self._last_loaded = row.id
                    self._backlog.push(row)
                self._more_workers()
                # No await between this check and the switch: an offer cannot slip between.
                if len(rows) < room and not self._dirty:
                    self._spilled = False

    # -- sending ---------------------------------------------------------------------------

    def _more_workers(self) -> None:
        """Make send tasks for the devices that are ready and that no idle task will take."""
        if not self._started or self._stopping:
            return
        wanted = self._backlog.ready.qsize() - self._idle_workers
        while wanted > 0 and self._workers < self.settings.max_in_flight:
            self._workers += 1
            self._idle_workers += 1  # idle from now: it takes the next ready device
            wanted -= 1
            self._spawn(self._work_loop())

    async def _work_loop(self) -> None:
        backlog = self._backlog
        while not self._stopping:
            try:
                dev_eui = await backlog.ready.get()
            finally:
                self._idle_workers -= 1
            delivery = backlog.devices[dev_eui].popleft()
            backlog.size -= 1
            if self._spilled and backlog.size < self.settings.memory_queue // 4:
                self._refill_wanted.set()
            task = asyncio.current_task()
            assert task is not None
            self._sending.add(task)
            try:
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
                backlog.release(dev_eui)

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
        probe = await self._circuit.acquire(deadline)
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
            await self._circuit.failure(probe)
            raise
        except RetryableSinkError as exc:
            self._note_error(exc)
            await self._circuit.failure(probe)
            raise
        except PermanentSinkError as exc:
            # The cloud answered: it is reachable, this one delivery is what it refuses.
            self._note_error(exc)
            await self._circuit.success(probe)
            raise
        except BaseException:
            # No answer from the cloud (cancelled, or an error of ours): says nothing about
            # its health, but the probe's slot is freed so that another may go.
            await self._circuit.release(probe)
            raise
        await self._circuit.success(probe)
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
        self._pending_gauge.dec()
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
        self._pending_gauge.set(self.stats.pending)
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
