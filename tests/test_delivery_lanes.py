"""Live uplinks before replayed and re-sent ones (issue #14): the worker's two lanes.

A scripted sink held by a gate shows what the worker chose to send, in which order, and how
many replayed deliveries were on the wire at once: counts and order, never time.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from iotflow.delivery.recovery import _insert_deliveries
from iotflow.delivery.worker import ConnectionWorker, background_share
from iotflow.spool import Delivery, Spool
from test_delivery import Outcomes, ScriptedSink, make_worker, settings


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    spool = await Spool.open(tmp_path / "spool.db")
    yield spool
    await spool.close()


@dataclass
class LaneSink(ScriptedSink):
    """Counts the background (replayed or re-sent) deliveries on the wire, and their peak."""

    background: int = 0
    max_background: int = 0

    async def send(self, delivery: Delivery) -> None:
        old = delivery.replay is not None or delivery.letter is not None
        if old:
            self.background += 1
            self.max_background = max(self.max_background, self.background)
        try:
            await super().send(delivery)
        finally:
            if old:
                self.background -= 1


def order(sink: ScriptedSink) -> list[Delivery]:
    return [d for _, d in sink.calls]


async def live(spool: Spool, devices: list[str], worker: ConnectionWorker | None) -> list[Delivery]:
    """Live uplinks committed (and offered to `worker`, when there is one), in this order."""
    now = time.time()
    out = []
    for dev in devices:
        for d in await spool.append(
            b"{}", dev_eui=dev, uplink_time=now, received_at=now, connection_ids=["c1"]
        ):
            out.append(d)
            if worker is not None:
                worker.offer(d)
    return out


async def old(
    spool: Spool,
    devices: list[str],
    worker: ConnectionWorker | None,
    *,
    replay: str | None = "r1",
    letter: int | None = None,
) -> list[Delivery]:
    """Deliveries as a replay (or a re-send) writes them, then offers them."""
    now = time.time()
    first = spool.allocate(len(devices))
    made = [
        Delivery(first + i, "c1", dev, now - 3600, now - 3600, b"{}", None, now, letter, replay)
        for i, dev in enumerate(devices)
    ]
    await spool.write(functools.partial(_insert_deliveries, deliveries=made))
    if worker is not None:
        for d in made:
            worker.offer(d)
    return made


def assert_device_order(sent: list[Delivery], expected: list[Delivery]) -> None:
    """Per device, each lane in id order (the order it was queued in)."""
    for dev in {d.dev_eui for d in expected}:
        for lane in (True, False):
            mine = [d.id for d in expected if d.dev_eui == dev and (d.replay is None) == lane]
            assert [d.id for d in sent if d.dev_eui == dev and (d.replay is None) == lane] == mine


async def test_the_spool_reads_back_each_lane_in_id_order(spool: Spool) -> None:
    fresh = await live(spool, ["A", "B"], None)
    replayed = await old(spool, ["A", "C"], None)
    letters = await old(spool, ["B"], None, replay=None, letter=3)
    later = await live(spool, ["C"], None)
    everything = fresh + replayed + letters + later
    assert await spool.load("c1") == everything
    assert await spool.load("c1", background=False) == fresh + later
    assert await spool.load("c1", background=True) == replayed + letters
    assert await spool.load("c1", background=True, after_id=replayed[1].id) == letters
    # A completion not committed yet is left out of either lane.
    spool.complete(replayed[0].id)
    spool.complete(fresh[0].id)
    assert await spool.load("c1", background=True) == [replayed[1], *letters]
    assert await spool.load("c1", background=False, limit=1) == [fresh[1]]


def test_the_share_is_half_of_max_in_flight_and_at_least_one() -> None:
    assert [background_share(n) for n in (1, 2, 3, 32)] == [1, 1, 1, 16]


async def test_live_deliveries_go_before_a_queued_replay_that_keeps_its_share(
    spool: Spool,
) -> None:
    gate = asyncio.Event()
    sink, outcomes = LaneSink(gate=gate), Outcomes()
    worker = make_worker(spool, sink, outcomes, delivery=settings(max_in_flight=8))
    await worker.start()
    # A large replay: 2 uplinks for each of 50 devices, all queued at once.
    replayed = await old(spool, [f"R{d:02d}" for d in range(50)] * 2, worker)
    await sink.until(lambda: sink.in_flight == 4)
    assert sink.background == 4  # its share of 8, the other 4 sends wait for live ones
    # Live uplinks: new devices, and devices whose replayed uplinks wait in the queue.
    fresh = await live(
        spool, [f"L{d}" for d in range(5)] + [f"R{d:02d}" for d in range(10, 15)], worker
    )
    await sink.until(lambda: sink.in_flight == 8)
    assert sink.background == 4
    gate.set()
    await outcomes.completed_count(len(replayed) + len(fresh))
    sent = order(sink)
    assert sorted(d.id for d in sent) == sorted(d.id for d in replayed + fresh)  # each once
    # Every live uplink went before any replayed one queued behind the 4 on the wire.
    last_live = max(i for i, d in enumerate(sent) if d.replay is None)
    assert all(d.replay is not None for d in sent[:4])
    fifth_replayed = [i for i, d in enumerate(sent) if d.replay is not None][4]
    assert last_live < fifth_replayed
    # A device with both: its live uplink first, then its replayed ones in their order.
    for dev in [f"R{d:02d}" for d in range(10, 15)]:
        assert [d.replay is None for d in sent if d.dev_eui == dev] == [True, False, False]
    assert_device_order(sent, replayed + fresh)
    assert sink.max_background == 4
    assert sink.max_in_flight == 8
    await worker.stop(time.monotonic())


async def test_live_deliveries_use_every_send_a_replay_leaves(spool: Spool) -> None:
    gate = asyncio.Event()
    sink, outcomes = LaneSink(gate=gate), Outcomes()
    worker = make_worker(spool, sink, outcomes, delivery=settings(max_in_flight=8))
    await worker.start()
    fresh = await live(spool, [f"L{d}" for d in range(12)], worker)
    await sink.until(lambda: sink.in_flight == 8)  # live traffic alone: all 8
    replayed = await old(spool, [f"R{d}" for d in range(12)], worker)
    gate.set()
    await outcomes.completed_count(len(fresh) + len(replayed))
    sent = order(sink)
    assert all(d.replay is None for d in sent[:12])
    assert sink.max_background <= 4
    await worker.stop(time.monotonic())


async def test_re_sent_letters_share_the_replays_lane(spool: Spool) -> None:
    gate = asyncio.Event()
    sink, outcomes = LaneSink(gate=gate), Outcomes()
    worker = make_worker(spool, sink, outcomes, delivery=settings(max_in_flight=4))
    await worker.start()
    letters = await old(spool, [f"D{d}" for d in range(20)], worker, replay=None, letter=7)
    await sink.until(lambda: sink.in_flight == 2)
    replayed = await old(spool, [f"R{d}" for d in range(20)], worker)
    fresh = await live(spool, [f"L{d}" for d in range(6)], worker)
    await sink.until(lambda: sink.in_flight == 4)
    gate.set()
    await outcomes.completed_count(len(letters) + len(replayed) + len(fresh))
    sent = order(sink)
    # Re-sends and replays together never above the share (2 of 4); live ones go first.
    assert sink.max_background == 2
    last_live = max(i for i, d in enumerate(sent) if d.replay is None and d.letter is None)
    assert sum(1 for d in sent[: last_live + 1] if d.letter is not None or d.replay) <= 4
    await worker.stop(time.monotonic())


@pytest.mark.parametrize("memory_queue", [10_000, 16])
async def test_after_a_restart_the_lanes_come_from_the_spool(
    spool: Spool, memory_queue: int
) -> None:
    # What a daemon left pending: a replay's deliveries, then live ones (higher ids).
    replayed = await old(spool, [f"R{d:02d}" for d in range(30)], None)
    fresh = await live(spool, [f"L{d}" for d in range(5)] + ["R20"], None)
    await spool.flush()
    gate = asyncio.Event()
    sink, outcomes = LaneSink(gate=gate), Outcomes()
    worker = make_worker(
        spool, sink, outcomes, delivery=settings(max_in_flight=8, memory_queue=memory_queue)
    )
    worker.stats.pending = len(replayed) + len(fresh)
    await worker.start()
    await sink.until(lambda: sink.in_flight == 8)
    # Replayed ones have the lower ids, yet each lane is read back on its own (live first,
    # even with room for 8 of each lane only): the 6 live ones went first, and the replay
    # has what is left of the 8, below its share.
    assert [d.replay is None for d in order(sink)].count(True) == 6
    assert sink.background == 2
    gate.set()
    await outcomes.completed_count(len(replayed) + len(fresh))
    sent = order(sink)
    assert [d.replay is None for d in sent if d.dev_eui == "R20"] == [True, False]
    assert sink.max_background <= 4
    await worker.stop(time.monotonic())


async def test_a_spilled_backlog_keeps_its_lanes(spool: Spool) -> None:
    gate = asyncio.Event()
    sink, outcomes = LaneSink(gate=gate), Outcomes()
    worker = make_worker(spool, sink, outcomes, delivery=settings(max_in_flight=8, memory_queue=16))
    await worker.start()
    replayed = await old(spool, [f"R{d % 9}" for d in range(60)], worker)
    # 8 in memory (half of memory_queue for each lane), the rest waits in the spool: 4 go
    # (the share), 4 wait with 4 workers idle.
    await sink.until(lambda: sink.background == 4)
    assert worker._backlog.size == 4
    # Live uplinks are not queued behind the spilled replay: they take the 4 idle workers.
    fresh = await live(spool, [f"L{d}" for d in range(40)], worker)
    await sink.until(lambda: sink.in_flight == 8)
    assert sink.background == 4
    assert worker._backlog.size <= 16
    gate.set()
    await outcomes.completed_count(len(replayed) + len(fresh))
    sent = order(sink)
    assert sorted(d.id for d in sent) == sorted(d.id for d in replayed + fresh)
    assert_device_order(sent, replayed + fresh)
    assert sink.max_background == 4
    await worker.stop(time.monotonic())
