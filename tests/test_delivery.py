"""Delivery semantics of one connection, against a scripted sink and a real spool."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from iotflow.config.model import DeliverySettings
from iotflow.connectors import parse_connection
from iotflow.delivery.worker import ConnectionWorker
from iotflow.errors import (
    AuthenticationSinkError,
    PermanentSinkError,
    RetryableSinkError,
    SinkError,
)
from iotflow.spool import Delivery, Spool
from iotflow.states import ConnectionState, Outcome
from iotflow.telemetry.metrics import Metrics
from support.clock import ManualClock

Script = Callable[["ScriptedSink", Delivery], SinkError | None]


@dataclass
class ScriptedSink:
    """A sink whose every answer is decided by the test."""

    script: Script = lambda sink, delivery: None
    calls: list[tuple[float, Delivery]] = field(default_factory=list)
    gate: asyncio.Event | None = None  # when set, sends wait for it (a hung cloud)
    in_flight: int = 0
    max_in_flight: int = 0
    jitter: float = 0.0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    clock: Callable[[], float] = time.monotonic  # the worker's, when the test controls it

    async def start(self) -> None:
        pass

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(10), self.changed:
            await self.changed.wait_for(predicate)

    async def send(self, delivery: Delivery) -> None:
        self.calls.append((self.clock(), delivery))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        async with self.changed:
            self.changed.notify_all()
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.jitter:
                # Random service times shuffle completions, to expose ordering bugs.
                await asyncio.sleep(random.uniform(0, self.jitter))
            error = self.script(self, delivery)
        finally:
            self.in_flight -= 1
        if error is not None:
            raise error

    async def healthcheck(self) -> bool:
        return True

    async def close(self) -> None:
        pass


class Outcomes:
    """Watches the spool's completions and the event log: what the worker decided."""

    def __init__(self) -> None:
        self.completed: list[int] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._changed = asyncio.Condition()

    def record(self, connection_id: str, kind: str, data: dict[str, Any]) -> None:
        self.events.append((kind, data))
        asyncio.get_running_loop().create_task(self.notify(None))

    async def completed_count(self, count: int) -> None:
        await self.until(lambda: len(self.completed) >= count)

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(30), self._changed:
            await self._changed.wait_for(predicate)

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [data for k, data in self.events if k == kind]

    async def notify(self, delivery_id: int | None) -> None:
        async with self._changed:
            if delivery_id is not None:
                self.completed.append(delivery_id)
            self._changed.notify_all()


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    spool = await Spool.open(tmp_path / "spool.db")
    yield spool
    await spool.close()


START = 1_700_000_000.0  # the controlled clock's epoch: uplinks are stamped from it


def settings(**overrides: Any) -> DeliverySettings:
    values: dict[str, Any] = {
        "retry_initial": timedelta(milliseconds=5),
        "retry_max": timedelta(milliseconds=50),
        "max_in_flight": 4,
        "circuit_failures": 1000,
    }
    values.update(overrides)
    return DeliverySettings(**values)


def make_worker(
    spool: Spool,
    sink: ScriptedSink,
    outcomes: Outcomes,
    *,
    validity: str = "1h",
    delivery: DeliverySettings | None = None,
    clock: ManualClock | None = None,
) -> ConnectionWorker:
    connection = parse_connection(
        {
            "id": "c1",
            "name": "test",
            "connectorId": "actility-http-iot",
            "configuration": {
                "destinationURL": "http://127.0.0.1:9/",
                "uplinkTimeValidity": validity,
            },
        }
    )
    original = spool.complete

    def complete(delivery_id: int, **final: Any) -> None:
        original(delivery_id, **final)
        asyncio.get_running_loop().create_task(outcomes.notify(delivery_id))

    spool.complete = complete  # type: ignore[method-assign]
    timing: dict[str, Any] = {}
    if clock is not None:
        # Retries then wait on the test's clock: no real time, and every wait is in sleeps.
        timing = {"clock": clock.time, "sleep": clock.sleep}
        sink.clock = clock.time
    return ConnectionWorker(
        connection,
        sink,
        spool=spool,
        metrics=Metrics(),
        settings=delivery or settings(),
        record=outcomes.record,
        **timing,
    )


def state(worker: ConnectionWorker) -> ConnectionState:
    """The worker's state now: a call, so that mypy keeps no narrowing across awaits."""
    return worker.state


async def feed(
    spool: Spool,
    worker: ConnectionWorker,
    devices: list[str],
    *,
    age: float = 0.0,
    clock: ManualClock | None = None,
) -> list[Delivery]:
    now = time.time() if clock is None else clock.now
    out: list[Delivery] = []
    for n, dev in enumerate(devices):
        document = f'{{"n": {n}}}'.encode()
        for d in await spool.append(
            document, dev_eui=dev, uplink_time=now - age, received_at=now, connection_ids=["c1"]
        ):
            worker.offer(d)
            out.append(d)
    return out


async def test_delivers_everything_once(spool: Spool) -> None:
    sink, outcomes = ScriptedSink(), Outcomes()
    worker = make_worker(spool, sink, outcomes)
    await worker.start()
    sent = await feed(spool, worker, ["A"] * 10 + ["B"] * 10)
    await outcomes.completed_count(20)
    assert sorted(d.id for _, d in sink.calls) == sorted(d.id for d in sent)
    assert worker.stats.delivered == 20
    assert worker.stats.pending == 0
    await worker.stop(time.monotonic())
    await spool.flush()
    assert await spool.pending_counts() == {}


async def test_order_per_device_and_parallelism_across_devices(spool: Spool) -> None:
    sink, outcomes = ScriptedSink(jitter=0.003), Outcomes()
    worker = make_worker(spool, sink, outcomes, delivery=settings(max_in_flight=8))
    await worker.start()
    devices = [f"{d:016X}" for d in range(6)] * 15
    random.Random(4).shuffle(devices)
    sent = await feed(spool, worker, devices)
    await outcomes.completed_count(len(sent))
    for dev in set(devices):
        expected = [d.id for d in sent if d.dev_eui == dev]
        assert [d.id for _, d in sink.calls if d.dev_eui == dev] == expected
    assert sink.max_in_flight > 1
    await worker.stop(time.monotonic())


async def test_retries_until_the_cloud_recovers(spool: Spool) -> None:
    failures = {"left": 3}

    def flaky(sink: ScriptedSink, delivery: Delivery) -> SinkError | None:
        if failures["left"]:
            failures["left"] -= 1
            return RetryableSinkError("HTTP 503", status=503)
        return None

    sink, outcomes, clock = ScriptedSink(flaky), Outcomes(), ManualClock(START)
    worker = make_worker(spool, sink, outcomes, clock=clock)
    await worker.start()
    await feed(spool, worker, ["A"], clock=clock)
    await outcomes.completed_count(1)
    assert len(sink.calls) == 4
    assert worker.stats.delivered == 1
    assert worker.stats.retried == 3
    assert worker.stats.lastError == "HTTP 503"
    # Full jitter under retry_initial * 2^(n-1): 5, 10 and 20 ms.
    assert len(clock.sleeps) == 3
    assert all(
        0 <= wait <= top for wait, top in zip(clock.sleeps, [0.005, 0.01, 0.02], strict=True)
    )
    await worker.stop(time.monotonic())


async def test_retry_after_is_honoured(spool: Spool) -> None:
    def once(sink: ScriptedSink, delivery: Delivery) -> SinkError | None:
        if len(sink.calls) == 1:
            return RetryableSinkError("HTTP 429", status=429, retry_after=0.4)
        return None

    sink, outcomes, clock = ScriptedSink(once), Outcomes(), ManualClock(START)
    worker = make_worker(spool, sink, outcomes, clock=clock)
    await worker.start()
    await feed(spool, worker, ["A"], clock=clock)
    await outcomes.completed_count(1)
    (first, _), (second, _) = sink.calls
    # The backoff alone would retry within 5 ms; the cloud asked for 400 ms.
    assert second - first >= 0.4
    assert clock.sleeps == [0.4]
    await worker.stop(time.monotonic())


async def test_a_retry_after_past_the_validity_is_cut_at_the_deadline(spool: Spool) -> None:
    def busy(sink: ScriptedSink, delivery: Delivery) -> SinkError | None:
        return RetryableSinkError("HTTP 429", status=429, retry_after=30)

    sink, outcomes, clock = ScriptedSink(busy), Outcomes(), ManualClock(START)
    worker = make_worker(spool, sink, outcomes, validity="1s", clock=clock)
    await worker.start()
    await feed(spool, worker, ["A"], clock=clock)
    await outcomes.completed_count(1)
    # One wait, to the deadline and not the 30 s asked, and a last attempt there.
    assert clock.sleeps == [pytest.approx(1.0)]
    assert [at for at, _ in sink.calls] == [START, pytest.approx(START + 1.0)]
    assert worker.stats.expired == 1
    await worker.stop(time.monotonic())


async def test_a_first_attempt_that_fails_past_the_validity_is_not_retried(
    spool: Spool,
) -> None:
    clock = ManualClock(START)

    def slow(sink: ScriptedSink, delivery: Delivery) -> SinkError | None:
        clock.now += 2  # the cloud took longer than the uplink's validity to answer
        return RetryableSinkError("HTTP 504", status=504)

    sink, outcomes = ScriptedSink(slow), Outcomes()
    worker = make_worker(spool, sink, outcomes, validity="1s", clock=clock)
    await worker.start()
    await feed(spool, worker, ["A"], clock=clock)
    await outcomes.completed_count(1)
    assert len(sink.calls) == 1
    assert clock.sleeps == []
    assert (worker.stats.expired, worker.stats.retried) == (1, 0)
    (event,) = outcomes.kinds("delivery_expired")
    assert (event["status"], event["attempts"], event["reason"]) == (504, 1, "HTTP 504")
    await worker.stop(time.monotonic())


async def test_expires_at_validity(spool: Spool) -> None:
    def down(sink: ScriptedSink, delivery: Delivery) -> SinkError | None:
        return RetryableSinkError("HTTP 503", status=503, body="maintenance")

    sink, outcomes, clock = ScriptedSink(down), Outcomes(), ManualClock(START)
    worker = make_worker(spool, sink, outcomes, validity="1s", clock=clock)
    started = clock.now
    # Both in the spool before the start: the controlled clock runs as fast as A's retries
    # go, and B offered later could already be past its validity on arrival.
    await feed(spool, worker, ["A", "B"], clock=clock)
    await worker.start()
    await outcomes.completed_count(2)
    assert clock.now - started >= 1.0  # not before the validity ran out
    # ... nor after: the last wait ends at the deadline, and that last attempt is made.
    assert clock.now == pytest.approx(started + 1.0, abs=1e-6)
    assert sink.calls[-1][0] == pytest.approx(started + 1.0, abs=1e-6)
    assert max(clock.sleeps) <= 0.05  # retry_max
    assert worker.stats.expired == 2
    assert worker.stats.delivered == 0
    (event, _) = outcomes.kinds("delivery_expired")
    assert event["status"] == 503
    assert event["body"] == "maintenance"
    assert event["attempts"] > 1
    await worker.stop(time.monotonic())


async def test_already_expired_uplinks_are_not_sent(spool: Spool) -> None:
    sink, outcomes, clock = ScriptedSink(), Outcomes(), ManualClock(START)
    worker = make_worker(spool, sink, outcomes, validity="1m", clock=clock)
    await worker.start()
    await feed(spool, worker, ["A"], age=120, clock=clock)
    await outcomes.completed_count(1)
    assert sink.calls == []
    assert worker.stats.expired == 1
    await worker.stop(time.monotonic())


async def test_permanent_failure_is_not_retried(spool: Spool) -> None:
    def refuse(sink: ScriptedSink, delivery: Delivery) -> SinkError | None:
        return PermanentSinkError("HTTP 400", status=400, body='{"error":"bad"}')

    sink, outcomes = ScriptedSink(refuse), Outcomes()
    worker = make_worker(spool, sink, outcomes)
    await worker.start()
    await feed(spool, worker, ["A"])
    await outcomes.completed_count(1)
    assert len(sink.calls) == 1
    assert worker.stats.failed == 1
    (event,) = outcomes.kinds("delivery_failed")
    assert event["status"] == 400
    assert worker.state == ConnectionState.OPENED
    await worker.stop(time.monotonic())


async def test_circuit_closes_the_connection_and_probes(spool: Spool) -> None:
    healthy = asyncio.Event()

    def outage(sink: ScriptedSink, delivery: Delivery) -> SinkError | None:
        return None if healthy.is_set() else RetryableSinkError("connection refused")

    sink, outcomes = ScriptedSink(outage), Outcomes()
    worker = make_worker(
        spool, sink, outcomes, delivery=settings(circuit_failures=3, max_in_flight=8)
    )
    await worker.start()
    await feed(spool, worker, [f"{d:016X}" for d in range(20)])
    await outcomes.until(lambda: worker.state == ConnectionState.CLOSED)
    calls_when_closed = len(sink.calls)
    # While CLOSED only one probe at a time goes out, not the 8 workers' worth.
    await sink.until(lambda: len(sink.calls) >= calls_when_closed + 2)
    assert sink.max_in_flight <= 8
    healthy.set()
    await outcomes.completed_count(20)
    assert worker.state == ConnectionState.OPENED
    assert worker.stats.delivered == 20
    states = [e["state"] for e in outcomes.kinds("state_changed")]
    assert states[-2:] == [ConnectionState.CLOSED, ConnectionState.OPENED]
    await worker.stop(time.monotonic())


async def test_refused_credentials_set_authentication_failed(spool: Spool) -> None:
    fixed = asyncio.Event()

    def auth(sink: ScriptedSink, delivery: Delivery) -> SinkError | None:
        return None if fixed.is_set() else AuthenticationSinkError("HTTP 401", status=401)

    sink, outcomes, clock = ScriptedSink(auth), Outcomes(), ManualClock(START)
    worker = make_worker(spool, sink, outcomes, clock=clock)
    await worker.start()
    await feed(spool, worker, ["A"], clock=clock)
    await outcomes.until(lambda: worker.state == ConnectionState.AUTHENTICATION_FAILED)
    fixed.set()
    await outcomes.completed_count(1)
    assert worker.state == ConnectionState.OPENED
    # Refused credentials retry slowly: under retry_max from the first retry on.
    assert clock.sleeps
    assert all(0 <= wait <= 0.05 for wait in clock.sleeps)
    await worker.stop(time.monotonic())


async def test_memory_is_bounded_and_the_spool_fills_in(spool: Spool) -> None:
    gate = asyncio.Event()
    sink, outcomes = ScriptedSink(gate=gate), Outcomes()
    worker = make_worker(spool, sink, outcomes, delivery=settings(memory_queue=16))
    await worker.start()
    devices = [f"{d % 7:016X}" for d in range(200)]
    sent = await feed(spool, worker, devices)
    assert worker._backlog.size <= 16  # the rest waits in the spool only
    assert worker.stats.pending == 200
    gate.set()
    await outcomes.completed_count(200)
    ids = [d.id for _, d in sink.calls]
    assert sorted(ids) == sorted(d.id for d in sent)  # each exactly once
    for dev in set(devices):
        assert [d.id for _, d in sink.calls if d.dev_eui == dev] == [
            d.id for d in sent if d.dev_eui == dev
        ]
    await worker.stop(time.monotonic())


async def test_pending_deliveries_resume_from_the_spool(spool: Spool) -> None:
    now = time.time()
    for _ in range(5):
        await spool.append(
            b"{}", dev_eui="A", uplink_time=now, received_at=now, connection_ids=["c1"]
        )
    sink, outcomes = ScriptedSink(), Outcomes()
    worker = make_worker(spool, sink, outcomes)
    worker.stats.pending = 5
    await worker.start()
    await outcomes.completed_count(5)
    assert len(sink.calls) == 5
    assert worker.stats.pending == 0
    await worker.stop(time.monotonic())


async def test_stop_lets_in_flight_sends_finish(spool: Spool) -> None:
    gate = asyncio.Event()
    sink, outcomes = ScriptedSink(gate=gate), Outcomes()
    worker = make_worker(spool, sink, outcomes)
    await worker.start()
    await feed(spool, worker, ["A", "B"])
    await sink.until(lambda: sink.in_flight == 2)
    stopping = asyncio.create_task(worker.stop(time.monotonic() + 30))
    await asyncio.sleep(0)  # let stop() begin: it must now wait for the two sends
    gate.set()
    await stopping
    assert worker.stats.delivered == 2


async def test_any_exception_fails_one_delivery_and_the_worker_goes_on(spool: Spool) -> None:
    """A bug or a bad value in a sink (here a ValueError, as aiohttp raises for a header
    with a line break) ends that delivery as failed; the one worker delivers the next."""

    def poisoned(sink: ScriptedSink, delivery: Delivery) -> SinkError | None:
        if len(sink.calls) == 1:
            raise ValueError("Newline or carriage return character detected in HTTP header")
        return None

    sink, outcomes = ScriptedSink(poisoned), Outcomes()
    worker = make_worker(spool, sink, outcomes, delivery=settings(max_in_flight=1))
    await worker.start()
    await feed(spool, worker, ["A", "A", "B"])
    await outcomes.completed_count(3)
    assert (worker.stats.failed, worker.stats.delivered, worker.stats.pending) == (1, 2, 0)
    reason = "ValueError: Newline or carriage return character detected in HTTP header"
    assert worker.stats.lastError == reason
    (event,) = outcomes.kinds("delivery_failed")
    assert event["reason"] == reason
    assert event["attempts"] == 1
    failed = worker._metrics.registry.get_sample_value(
        "iotflow_deliveries_total", {"connection": "c1", "outcome": Outcome.FAILED}
    )
    assert failed == 1
    assert worker.state == ConnectionState.OPENED
    await worker.stop(time.monotonic())


async def test_a_late_offer_of_what_the_refill_read_is_not_sent_twice(spool: Spool) -> None:
    """The refill may read a delivery from the spool between its commit and its offer (a
    race the suite hit now and then): the offer must not queue it a second time."""
    now = time.time()
    (late,) = await spool.append(
        b"{}", dev_eui="A", uplink_time=now, received_at=now, connection_ids=["c1"]
    )
    sink, outcomes = ScriptedSink(), Outcomes()
    worker = make_worker(spool, sink, outcomes)
    await worker.start()
    await outcomes.completed_count(1)  # read back from the spool and sent
    worker.offer(late)  # ... and only now its offer arrives
    await feed(spool, worker, ["A"])
    await outcomes.completed_count(2)
    await spool.flush()
    assert [d.id for _, d in sink.calls] == [late.id, late.id + 1]
    await worker.stop(time.monotonic())


async def test_a_probe_that_raises_frees_the_circuit_for_the_next(spool: Spool) -> None:
    """CLOSED, one probe at a time: a probe ended by an arbitrary exception must give its
    slot back, or every later delivery would wait for it until it expires."""

    def script(sink: ScriptedSink, delivery: Delivery) -> SinkError | None:
        if len(sink.calls) == 1:
            return RetryableSinkError("connection refused")  # opens the circuit
        if len(sink.calls) == 2:
            raise RuntimeError("bug in the sink")  # the probe
        return None

    sink, outcomes = ScriptedSink(script), Outcomes()
    worker = make_worker(
        spool, sink, outcomes, validity="20s", delivery=settings(circuit_failures=1)
    )
    await worker.start()
    await feed(spool, worker, ["A"])
    await outcomes.completed_count(1)
    assert worker.state == ConnectionState.CLOSED
    assert worker.stats.failed == 1
    await feed(spool, worker, ["A"])
    await outcomes.completed_count(2)
    assert worker.stats.delivered == 1
    assert state(worker) == ConnectionState.OPENED
    await worker.stop(time.monotonic())


async def test_a_deliverys_own_validity_wins_over_the_connections(spool: Spool) -> None:
    """A flow's uplinkTimeValidity, stored with the delivery (issue #13), decides expiry."""

    def busy(sink: ScriptedSink, delivery: Delivery) -> SinkError | None:
        return RetryableSinkError("HTTP 429", status=429, retry_after=30)

    sink, outcomes, clock = ScriptedSink(busy), Outcomes(), ManualClock(START)
    worker = make_worker(spool, sink, outcomes, validity="1h", clock=clock)
    await worker.start()
    # Two hours old: past the connection's hour, within the flow's three days.
    (kept,) = await spool.append(
        b"{}",
        dev_eui="A",
        uplink_time=clock.now - 7200,
        received_at=clock.now,
        connection_ids=["c1"],
        validity={"c1": 3 * 86400.0},
    )
    worker.offer(kept)
    (old,) = await spool.append(
        b"{}",
        dev_eui="B",
        uplink_time=clock.now - 7200,
        received_at=clock.now,
        connection_ids=["c1"],
    )
    worker.offer(old)
    await outcomes.completed_count(1)
    assert worker.stats.expired == 1
    (expired,) = outcomes.kinds("delivery_expired")
    assert expired["reason"] == "older than uplinkTimeValidity on arrival"
    assert {d.dev_eui for _, d in sink.calls} == {"A"}  # only the flow's delivery is tried
    await worker.stop(time.monotonic())


async def test_send_tasks_are_made_as_devices_get_ready_up_to_max_in_flight(
    spool: Spool,
) -> None:
    # An idle connection holds no send task (1,000 connections x max_in_flight idle tasks
    # were tens of MB, issue #16); a burst over many devices makes max_in_flight of them.
    gate = asyncio.Event()
    sink, outcomes = ScriptedSink(gate=gate), Outcomes()
    worker = make_worker(spool, sink, outcomes, delivery=settings(max_in_flight=8))
    await worker.start()
    await spool.flush()
    assert len(worker._tasks) == 1  # the refill loop alone
    sent = await feed(spool, worker, [f"{d:016X}" for d in range(20)])
    await sink.until(lambda: sink.in_flight == 8)
    assert len(worker._tasks) == 1 + 8
    gate.set()
    await outcomes.completed_count(len(sent))
    assert len(worker._tasks) == 1 + 8
    await worker.stop(time.monotonic())
