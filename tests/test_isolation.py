"""One connection that cannot run never stops the others: issue #10, defect 2 (b).

In-process, on a real spool and a real HTTP sink to a local cloud. Whatever fails for one
connection (its sink cannot be made, cannot start, its alarm cannot be scheduled, its stored
document no longer validates), that connection alone is taken out of service: CLOSED, the
reason in `statistics.lastError`, one log line, one `out_of_service` event; the others are
started and deliver.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from iotflow.alarms.evaluator import Alarms
from iotflow.alarms.model import Alarm
from iotflow.config.model import DeliverySettings
from iotflow.connectors.connection import Connection, parse_connection, quarantined
from iotflow.delivery.manager import Deliveries, SinkFactory, make_sink_factory
from iotflow.registry import SqliteStore
from iotflow.sinks import Sink
from iotflow.spool import Spool
from iotflow.states import ConnectionState
from iotflow.telemetry.metrics import Metrics
from support.clouds import FakeCloud

DEV = "0018B2000000C001"


class Events:
    def __init__(self) -> None:
        self.items: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, connection_id: str, kind: str, data: dict[str, Any]) -> None:
        self.items.append((connection_id, kind, data))

    def of(self, kind: str) -> list[tuple[str, dict[str, Any]]]:
        return [(cid, data) for cid, k, data in self.items if k == kind]


def http(cid: str, cloud: FakeCloud, **extra: Any) -> Connection:
    return parse_connection(
        {
            "id": cid,
            "name": cid,
            "connectorId": "actility-http-iot",
            "configuration": {"destinationURL": cloud.url(f"/{cid}")},
            **extra,
        }
    )


class NoStart:
    """A sink whose start fails, as one with unusable TLS material would."""

    async def start(self) -> None:
        raise OSError("no such certificate file")

    async def send(self, delivery: Any) -> None:
        raise AssertionError("never started, never sends")

    async def healthcheck(self) -> bool:
        return False

    async def close(self) -> None:
        return None


def failing_for(bad: str, how: str) -> SinkFactory:
    real = make_sink_factory()

    def make(connection: Connection, settings: DeliverySettings) -> Sink:
        if connection.id == bad:
            if how == "make":
                raise ValueError("the sink cannot be made")
            return NoStart()
        return real(connection, settings)

    return make


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    spool = await Spool.open(str(tmp_path / "spool.db"))
    yield spool
    await spool.close()


async def apply(deliveries: Deliveries, spool: Spool, connections: list[Connection]) -> None:
    """What a refresh of the daemon does: register the connections, complete the change."""
    pending = await spool.pending_counts()
    await deliveries.complete(deliveries.register(connections, None, pending))


async def deliver_one(spool: Spool, deliveries: Deliveries, *targets: str) -> None:
    now = time.time()
    committed = await spool.append(
        b'{"DevEUI_uplink": {"DevEUI": "0018B2000000C001"}}',
        dev_eui=DEV,
        uplink_time=now,
        received_at=now,
        connection_ids=targets,
    )
    deliveries.dispatch(committed)


@pytest.mark.parametrize("how", ["make", "start"])
async def test_a_sink_that_fails_takes_only_its_connection_out_of_service(
    spool: Spool, cloud: FakeCloud, how: str
) -> None:
    events = Events()
    deliveries = Deliveries(
        spool=spool,
        metrics=Metrics(),
        settings=DeliverySettings(),
        record=events,
        sink_factory=failing_for("bad", how),
    )
    connections = [http("bad", cloud), http("good", cloud)]
    with capture_logs() as logs:
        await apply(deliveries, spool, connections)
        await apply(deliveries, spool, connections)  # a later refresh: said once, not again
    try:
        bad, good = deliveries.worker("bad"), deliveries.worker("good")
        assert bad is not None
        assert good is not None
        assert bad.state == ConnectionState.CLOSED
        reason = "could not be set up" if how == "make" else "could not start"
        assert bad.stats.lastError is not None
        assert bad.stats.lastError.startswith(reason)
        assert good.state in (ConnectionState.OPENING, ConnectionState.OPENED)
        assert good.out_of_service is None
        lines = [e for e in logs if e["event"] == "Connection out of service"]
        assert [(e["connection"], e["log_level"]) for e in lines] == [("bad", "error")]
        assert [cid for cid, _ in events.of("out_of_service")] == ["bad"]

        await deliver_one(spool, deliveries, "bad", "good")
        (received,) = await cloud.wait_for(1, path="/good")
        assert received.body
        assert cloud.requests_to("/bad") == []
        # What was routed to the broken one waits in the spool for its repair.
        assert (await spool.pending_counts()).get("bad") == 1
        assert bad.stats.pending == 1

        # Repaired (here: the sink factory works again once the connection is edited).
        deliveries._sink_factory = make_sink_factory()
        await apply(deliveries, spool, [http("bad", cloud, name="repaired"), http("good", cloud)])
        (late,) = await cloud.wait_for(1, path="/bad")
        assert late.body
        repaired = deliveries.worker("bad")
        assert repaired is not None
        assert repaired.out_of_service is None
        assert repaired.stats.lastError is None
    finally:
        await deliveries.stop(5)


async def test_an_alarm_that_cannot_be_scheduled_takes_only_its_connection_out_of_service(
    spool: Spool, cloud: FakeCloud, tmp_path: Path
) -> None:
    store = SqliteStore(str(tmp_path / "registry.db"))
    await store.migrate()
    # As an older version could have stored it: never validated by today's rules.
    edge = Alarm.model_construct(
        startTime=datetime.fromisoformat("9999-12-31T22:00:00-12:00"),
        endTime=datetime.fromisoformat("9999-12-31T23:00:00-12:00"),
        uplinkRateMinPerHour=1.0,
    )
    broken = http("alarmed", cloud).model_copy(update={"alarms": [edge]})
    healthy_alarm = Alarm.model_validate(
        {
            "startTime": "2026-01-05T09:00:00+01:00",
            "endTime": "2026-01-05T18:00:00+01:00",
            "recurrence": [{"frequency": "daily"}],
            "uplinkRateMinPerHour": 1,
        }
    )
    healthy = http("watched", cloud).model_copy(update={"alarms": [healthy_alarm]})
    events = Events()
    alarms = Alarms(store, Metrics(), events)
    deliveries = Deliveries(
        spool=spool, metrics=Metrics(), settings=DeliverySettings(), record=events
    )
    try:
        faults = alarms.watch([broken, healthy])
        assert list(faults) == ["alarmed"]
        assert faults["alarmed"].startswith("alarm 0 cannot be scheduled: OverflowError")
        assert [s["alarm"] for s in alarms.states_of("watched")] == [0]
        assert alarms.states_of("alarmed") == []
        pending = await spool.pending_counts()
        await deliveries.complete(deliveries.register([broken, healthy], None, pending, faults))
        worker = deliveries.worker("alarmed")
        assert worker is not None
        assert worker.state == ConnectionState.CLOSED
        assert worker.stats.lastError == faults["alarmed"]
        other = deliveries.worker("watched")
        assert other is not None
        assert other.out_of_service is None
    finally:
        await deliveries.stop(5)
        await store.close()


async def test_a_quarantined_connection_gets_a_worker_out_of_service(
    spool: Spool, cloud: FakeCloud
) -> None:
    events = Events()
    deliveries = Deliveries(
        spool=spool, metrics=Metrics(), settings=DeliverySettings(), record=events
    )
    broken = quarantined(
        "old", {"name": "old", "connectorId": "gone"}, "stored connection is not valid: x"
    )
    try:
        await apply(deliveries, spool, [broken, http("good", cloud)])
        worker = deliveries.worker("old")
        assert worker is not None
        assert (worker.state, worker.stats.lastError) == (ConnectionState.CLOSED, broken.fault)
        assert events.of("out_of_service") == [("old", {"reason": broken.fault, "state": "CLOSED"})]
        await deliver_one(spool, deliveries, "old", "good")
        await cloud.wait_for(1, path="/good")
    finally:
        await deliveries.stop(5)
