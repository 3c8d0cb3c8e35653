"""All connection workers: started, replaced and stopped as the registry changes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from iotflow.config.model import DeliverySettings
from iotflow.config.types import format_duration
from iotflow.connectors.common import CommonConfig
from iotflow.connectors.connection import Connection
from iotflow.delivery.pressure import IngestPressure
from iotflow.delivery.worker import ConnectionWorker, EventRecorder, Replayed
from iotflow.downlinks import DownlinkHandler
from iotflow.errors import PermanentSinkError
from iotflow.sinks import Sink, SinkContext, create_sink
from iotflow.spool import Delivery, Spool, SpoolUnavailableError
from iotflow.states import Outcome
from iotflow.telemetry.logging import get_logger
from iotflow.telemetry.metrics import Metrics

log = get_logger("iotflow.delivery")

SinkFactory = Callable[[Connection, DeliverySettings], Sink]


def make_sink_factory(
    downlink: DownlinkHandler | None = None, shared_group: str = ""
) -> SinkFactory:
    """Sinks made with the delivery settings of the moment and the daemon's downlink path."""

    def make(connection: Connection, settings: DeliverySettings) -> Sink:
        context = SinkContext(
            timeout=settings.timeout.total_seconds(),
            max_in_flight=settings.max_in_flight,
            downlink=downlink,
            shared_group=shared_group,
        )
        return create_sink(connection, context)

    return make


class _OutOfServiceSink:
    """The sink of a connection taken out of service: its worker is never started."""

    def __init__(self, reason: str) -> None:
        self._reason = reason

    async def start(self) -> None:
        return None

    async def send(self, delivery: Delivery) -> None:
        raise PermanentSinkError(self._reason)

    async def healthcheck(self) -> bool:
        return False

    async def close(self) -> None:
        return None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@dataclass
class Transition:
    """What `register` changed and `complete` still has to carry out."""

    removed: list[ConnectionWorker] = field(default_factory=list)
    started: list[ConnectionWorker] = field(default_factory=list)
    replaced: list[tuple[ConnectionWorker, ConnectionWorker]] = field(default_factory=list)
    orphans: dict[str, int] = field(default_factory=dict)


class Deliveries:
    """The set of running connection workers, kept equal to the registry's connections."""

    def __init__(
        self,
        *,
        spool: Spool,
        metrics: Metrics,
        settings: DeliverySettings,
        record: EventRecorder,
        sink_factory: SinkFactory | None = None,
        pressure: IngestPressure | None = None,
    ) -> None:
        self._spool = spool
        # Shared by every worker: the source's, so that a backlog gives way to ingest.
        self.pressure = pressure if pressure is not None else IngestPressure()
        self._metrics = metrics
        self._settings = settings
        self._record = record
        self._sink_factory = sink_factory or make_sink_factory()
        self.workers: dict[str, ConnectionWorker] = {}
        # Told when a replayed delivery ends (set by the daemon's Recovery).
        self.replayed: Replayed | None = None
        self._lock = asyncio.Lock()  # transitions complete one at a time, in order

    def worker(self, connection_id: str) -> ConnectionWorker | None:
        return self.workers.get(connection_id)

    def dispatch(self, deliveries: Iterable[Delivery]) -> None:
        """Hand committed deliveries to their connections' workers."""
        for delivery in deliveries:
            worker = self.workers.get(delivery.connection_id)
            if worker is not None:
                worker.offer(delivery)
            else:
                # Deleted between routing and commit: nobody will ever send it.
                if delivery.letter is None and delivery.replay is None:
                    self._spool.complete(delivery.id)
                else:  # a re-sent letter stays a letter; a replay counts it
                    self._spool.complete(delivery.id, final=delivery, outcome=Outcome.DROPPED)
                self._metrics.deliveries.labels(delivery.connection_id, Outcome.DROPPED).inc()

    def register(
        self,
        connections: Sequence[Connection],
        settings: DeliverySettings | None,
        pending: dict[str, int],
        faults: Mapping[str, str] | None = None,
    ) -> Transition:
        """Put the new workers in place at once, without waiting for anything.

        After this returns, every connection of `connections` has a worker to hand its
        deliveries to (a new one holds them in the spool until `complete` starts it), so the
        routing index may switch to `connections` right away. `complete` does the slow part.

        A connection that cannot run (its `fault`, one in `faults` such as an alarm that
        cannot be scheduled, or a sink that cannot be made) gets a worker taken out of
        service instead: never one connection's problem stops the others.
        """
        faults = faults or {}
        settings_changed = settings is not None and settings != self._settings
        if settings is not None:
            self._settings = settings
        wanted = {c.id: c for c in connections}
        transition = Transition(
            removed=[self.workers.pop(cid) for cid in list(self.workers) if cid not in wanted],
            orphans={cid: n for cid, n in pending.items() if cid not in wanted},
        )
        for connection in connections:
            fault = connection.fault or faults.get(connection.id)
            old = self.workers.get(connection.id)
            if old is None:
                worker = self._make(connection, fault=fault)
                worker.stats.pending = pending.get(connection.id, 0)
                if not worker.stats.pending:
                    # Nothing stored: whatever is committed for it from now on is offered
                    # to it (dispatch), so a first read of the spool would find nothing.
                    worker.nothing_stored()
                self.workers[connection.id] = worker
                transition.started.append(worker)
            elif (
                old.connection != connection
                or settings_changed
                or (fault is not None and old.out_of_service is None)
            ):
                new = self._make(connection, old, fault=fault)
                new.startup_time = old.startup_time
                if new.out_of_service is None and old.out_of_service is not None:
                    new.stats.lastError = None  # repaired: the reason is no longer true
                # New offers go to the successor, which holds them in the spool until it starts.
                self.workers[connection.id] = new
                transition.replaced.append((old, new))
        return transition

    async def complete(self, transition: Transition) -> None:
        """Stop what went, drain what was replaced, start what is new: one at a time.

        A replaced worker finishes its in-flight sends first; its successor reads what is
        left from the spool, so an edit never drops or duplicates a pending delivery.
        """
        async with self._lock:
            for worker in transition.removed:
                try:
                    await self._remove(worker)
                except Exception as exc:
                    # One worker that fails to stop must not keep the others from changing.
                    log.error(
                        "Connection not removed cleanly", connection=worker.id, error=str(exc)
                    )
            for worker in transition.started:
                if self.workers.get(worker.id) is worker:  # not superseded meanwhile
                    await self._start(worker)
            for old, new in transition.replaced:
                await self._stop(
                    old, time.monotonic() + self._settings.drain_timeout.total_seconds()
                )
                # What the old worker finished is gone before we reload. While the spool
                # cannot commit, its completes wait in memory and `load` leaves them out
                # already: the new worker may start all the same.
                with contextlib.suppress(SpoolUnavailableError):
                    await self._spool.flush()
                if self.workers.get(new.id) is new:
                    await self._start(new)
                    log.info("Connection reconfigured", connection=new.id)
            # Deliveries of connections that no longer exist (deleted while we were down).
            for connection_id, count in transition.orphans.items():
                if connection_id in self.workers:
                    continue
                dropped = await self._spool.drop_connection(connection_id)
                self._metrics.deliveries.labels(connection_id, Outcome.DROPPED).inc(dropped)
                log.warning(
                    "Dropped deliveries of a deleted connection",
                    connection=connection_id,
                    count=count,
                )

    def _make(
        self,
        connection: Connection,
        old: ConnectionWorker | None = None,
        *,
        fault: str | None = None,
    ) -> ConnectionWorker:
        if fault is None:
            try:
                return self._worker(connection, self._sink_factory(connection, self._settings), old)
            except Exception as exc:
                fault = f"could not be set up: {_describe(exc)}"
        return self._out_of_service(connection, fault, old)

    def _worker(
        self, connection: Connection, sink: Sink, old: ConnectionWorker | None
    ) -> ConnectionWorker:
        return ConnectionWorker(
            connection,
            sink,
            spool=self._spool,
            metrics=self._metrics,
            settings=self._settings,
            record=self._record,
            stats=old.stats if old is not None else None,
            replayed=self._on_replayed,
            pressure=self.pressure,
        )

    def _on_replayed(self, replay_id: str, connection_id: str, outcome: str) -> None:
        if self.replayed is not None:
            self.replayed(replay_id, connection_id, outcome)

    def max_in_flight(self, connection_id: str) -> int:
        """The connection's max_in_flight (the delivery settings of the moment)."""
        return self._settings.max_in_flight

    def _out_of_service(
        self, connection: Connection, reason: str, old: ConnectionWorker | None
    ) -> ConnectionWorker:
        """A worker that holds the connection's place (routing, statistics, the API) and
        sends nothing: built on the common defaults, so that nothing of the connection
        that failed can fail again here."""
        inert = connection.model_copy(update={"configuration": CommonConfig(), "alarms": []})
        worker = self._worker(inert, _OutOfServiceSink(reason), old)
        worker.connection = connection  # compared by `register`: replaced once edited
        self._take_out_of_service(worker, reason)
        return worker

    def _take_out_of_service(self, worker: ConnectionWorker, reason: str) -> None:
        reason = worker.take_out_of_service(reason)
        log.error("Connection out of service", connection=worker.id, error=reason)
        self._record(worker.id, "out_of_service", {"reason": reason, "state": worker.state})

    async def _start(self, worker: ConnectionWorker) -> None:
        if worker.out_of_service is not None:
            return
        try:
            await worker.start()
        except Exception as exc:
            # A sink that cannot even start (bad TLS material, say) must not stop the others.
            self._take_out_of_service(worker, f"could not start: {_describe(exc)}")

    async def _stop(self, worker: ConnectionWorker, deadline: float) -> None:
        try:
            await worker.stop(deadline)
        except Exception as exc:
            log.error("Connection not stopped cleanly", connection=worker.id, error=str(exc))

    async def _remove(self, worker: ConnectionWorker) -> None:
        connection_id = worker.id
        await self._stop(worker, time.monotonic())
        if connection_id in self.workers:
            return  # deleted and created again: what is pending belongs to the new one
        dropped = await self._spool.drop_connection(connection_id)
        worker.drop_all()
        self._metrics.forget_connection(connection_id)
        log.info("Connection removed", connection=connection_id, dropped=dropped)

    async def stop(self, drain: float) -> None:
        """SIGTERM: every worker finishes its in-flight sends within `drain` seconds."""
        deadline = time.monotonic() + drain
        async with self._lock:
            busy = {cid: w.in_flight for cid, w in self.workers.items() if w.in_flight}
            if busy:
                # A stop that takes `drain` seconds says why, and for whom.
                log.info(
                    "Waiting for in-flight deliveries",
                    connections=busy,
                    in_flight=sum(busy.values()),
                    timeout=format_duration(timedelta(seconds=drain)),
                )
            await asyncio.gather(*(self._stop(w, deadline) for w in self.workers.values()))
