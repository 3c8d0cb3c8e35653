"""Ingest first (delivery/pressure.py): a backlog read back from the spool gives way while
the source falls behind; live deliveries never wait for it, and a drain never stops."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import paho.mqtt.client as paho
import pytest

import iotflow.delivery.pressure as pressure_module
from iotflow.delivery.pressure import IngestPressure
from iotflow.sources.ack import InflightGate
from iotflow.spool import Delivery, Spool
from test_delivery import Outcomes, ScriptedSink, make_worker, settings


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    spool = await Spool.open(tmp_path / "spool.db")
    yield spool
    await spool.close()


async def pending(spool: Spool, count: int) -> list[Delivery]:
    """What a daemon left in the spool (a cloud that was down): read back at start."""
    now = time.time()
    made = []
    for n in range(count):
        made += await spool.append(
            b"{}", dev_eui=f"D{n:03d}", uplink_time=now, received_at=now, connection_ids=["c1"]
        )
    await spool.flush()
    return made


async def turns(n: int = 50) -> None:
    """Let the loop run everything that is ready (no time passes)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_backlog_from_the_spool_waits_while_ingest_falls_behind(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pressure_module, "HOLD_SECONDS", 3600.0)  # only relief ends a hold
    # More than fits in memory (memory_queue 16: 8 a lane): the rest stays on disk, read back
    # as room is made, as a cloud's hour of backlog is.
    backlog = await pending(spool, 40)
    sink, outcomes = ScriptedSink(), Outcomes()
    worker = make_worker(spool, sink, outcomes, delivery=settings(max_in_flight=4, memory_queue=16))
    pressure = IngestPressure()
    worker._pressure = pressure
    pressure.set(True)
    worker.stats.pending = len(backlog)
    await worker.start()
    async with asyncio.timeout(10):
        while worker._refill[False].last_loaded == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # the spool is read in its thread
    await turns()
    assert sink.calls == []  # read back from the spool, held
    pressure.set(False)
    await outcomes.completed_count(len(backlog))
    assert sorted(d.id for _, d in sink.calls) == [d.id for d in backlog]
    await worker.stop(time.monotonic())


async def test_live_deliveries_do_not_wait_for_the_pressure(spool: Spool) -> None:
    sink, outcomes = ScriptedSink(), Outcomes()
    worker = make_worker(spool, sink, outcomes, delivery=settings(max_in_flight=4))
    pressure = IngestPressure()
    worker._pressure = pressure
    worker.nothing_stored()  # a new connection: nothing to read back
    await worker.start()
    pressure.set(True)
    now = time.time()
    fresh = await spool.append(
        b"{}", dev_eui="D1", uplink_time=now, received_at=now, connection_ids=["c1"]
    )
    worker.offer(fresh[0])
    await outcomes.completed_count(1)  # sent with the pressure high
    assert pressure.high
    await worker.stop(time.monotonic())


async def test_a_drain_slows_but_never_stops(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    # A spool that cannot commit keeps the source's count high; the drain is what frees it.
    monkeypatch.setattr(pressure_module, "HOLD_SECONDS", 0.01)
    backlog = await pending(spool, 40)
    sink, outcomes = ScriptedSink(), Outcomes()
    worker = make_worker(spool, sink, outcomes, delivery=settings(max_in_flight=2, memory_queue=16))
    worker._pressure = IngestPressure()
    worker._pressure.set(True)
    worker.stats.pending = len(backlog)
    await worker.start()
    await outcomes.completed_count(len(backlog))
    await worker.stop(time.monotonic())


async def test_the_gate_says_when_ingest_falls_behind_and_when_it_keeps_up_again() -> None:
    pressure = IngestPressure()
    client = aiomqtt.Client("127.0.0.1")
    client_paho: paho.Client = client._client
    client_paho.on_message = None  # aiomqtt's own handler wants a session; the count is ours
    gate = InflightGate(client, 8, pressure)
    arrived = client_paho.on_message
    assert arrived is not None
    for n in range(4):
        assert not pressure.high, n
        arrived(client_paho, None, paho.MQTTMessage(mid=n, topic=b"t"))
    assert pressure.high  # half of the bound taken, not acknowledged
    gate.release()
    assert pressure.high  # not yet down to a quarter
    gate.release()
    assert not pressure.high
