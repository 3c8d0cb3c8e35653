"""Dead letters, the journal and replays over a real spool, in process (issue #14): the
bounds, re-sends that end delivered or failed again, deletion, cancelled replays."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ByteSize

import iotflow.delivery.recovery as recovery_module
from iotflow.config.model import DeadLetterSettings, JournalSettings
from iotflow.connectors import parse_connection
from iotflow.delivery.recovery import LetterFilter, Recovery, route_of
from iotflow.routing import RoutingIndex
from iotflow.spool import DeadLetter, Delivery, Spool
from iotflow.telemetry.metrics import Metrics

DEV = "0018B20000000B20"
ROUTE = route_of(frozenset(), None, None)


@dataclass
class Clock:
    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    spool: Spool
    recovery: Recovery
    clock: Clock
    metrics: Metrics
    dispatched: list[Delivery] = field(default_factory=list)
    events: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    async def fail(self, delivery: Delivery, outcome: str = "failed", reason: str = "no") -> None:
        delivery.attempts += 1
        delivery.first_attempt = delivery.first_attempt or self.clock.now
        delivery.last_attempt = self.clock.now
        letter = DeadLetter(outcome, reason, 400, "body", self.clock.now)
        self.spool.complete(delivery.id, final=delivery, outcome=outcome, letter=letter)
        await self.spool.flush()

    async def deliver(self, delivery: Delivery) -> None:
        self.spool.complete(delivery.id, final=delivery, outcome="delivered")
        await self.spool.flush()

    async def append(self, n: int, connection: str | None = "c") -> list[Delivery]:
        made = []
        for i in range(n):
            made += await self.spool.append(
                f'{{"n": {i}}}'.encode(),
                dev_eui=DEV,
                uplink_time=self.clock.now + i,
                received_at=self.clock.now,
                connection_ids=[connection] if connection else [],
                journal=ROUTE,
            )
        return made


def connection(cid: str) -> Any:
    return parse_connection(
        {
            "id": cid,
            "name": cid,
            "connectorId": "actility-http-iot",
            "configuration": {"destinationURL": "http://127.0.0.1:9/"},
        }
    )


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    spool = await Spool.open(tmp_path / "spool.db")
    clock = Clock()
    metrics = Metrics()
    index = RoutingIndex([connection("c"), connection("other")], {DEV: ["c"]})
    holder: dict[str, World] = {}

    def dispatch(deliveries: Sequence[Delivery]) -> None:
        holder["w"].dispatched.extend(deliveries)

    def record(connection_id: str, kind: str, data: dict[str, Any]) -> None:
        holder["w"].events.append((connection_id, kind, data))

    recovery = Recovery(
        spool=spool,
        dispatch=dispatch,
        index=lambda: index,
        metrics=metrics,
        record=record,
        journal=JournalSettings(),
        letters=DeadLetterSettings(max_per_connection=3, retention=timedelta(days=1)),
        window=lambda cid: 2,
        clock=clock,
    )
    holder["w"] = World(spool, recovery, clock, metrics)
    await recovery.start(prune_every=3600)
    yield holder["w"]
    await recovery.close()
    await spool.close()


def gauge(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_a_resent_letter_leaves_once_delivered_and_fails_again_as_the_same_letter(
    world: World,
) -> None:
    first, second = await world.append(2)
    await world.fail(first)
    await world.fail(second, "expired")
    letters, total = await world.recovery.letters("c", LetterFilter(), 0, 10)
    assert total == 2
    assert [x.outcome for x in letters] == ["expired", "failed"]  # newest first (same time: id)
    assert gauge(world.metrics, "iotflow_dead_letters", connection="c") == 2
    world.clock.now += 100
    ids = [x.id for x in letters]
    assert await world.recovery.resend("c", ids=[*ids, 999]) == 2
    assert await world.recovery.resend("c", ids=ids) == 0  # already queued
    again = sorted(world.dispatched, key=lambda d: d.id)
    assert [d.since for d in again] == [world.clock.now] * 2  # validity from the re-send
    assert {d.letter for d in again} == set(ids)
    # The first is delivered: it leaves. The second fails again: the same letter, once.
    await world.deliver(next(d for d in again if d.letter == ids[1]))
    failing = next(d for d in again if d.letter == ids[0])
    await world.fail(failing, reason="still no")
    letters, total = await world.recovery.letters("c", LetterFilter(), 0, 10)
    assert total == 1
    (letter,) = letters
    assert (letter.id, letter.reason, letter.attempts) == (ids[0], "still no", 2)
    assert gauge(world.metrics, "iotflow_dead_letters", connection="c") == 1
    assert ("c", "dead_letters_resent", {"count": 2}) in world.events


async def test_the_bounds_drop_the_oldest_letters_and_count_them(world: World) -> None:
    for delivery in await world.append(5):
        await world.fail(delivery)
        world.clock.now += 1
    counts = await world.recovery.prune()
    assert counts["c"] == 2
    letters, total = await world.recovery.letters("c", LetterFilter(), 0, 10)
    assert total == 3
    assert [x.time for x in letters] == [
        world.clock.now - 1,
        world.clock.now - 2,
        world.clock.now - 3,
    ]
    assert gauge(world.metrics, "iotflow_dead_letters_dropped_total", connection="c") == 2
    assert any(kind == "dead_letters_dropped" for _, kind, _ in world.events)
    world.clock.now += 86400 + 10  # past retention
    await world.recovery.prune()
    assert (await world.recovery.letters("c", LetterFilter(), 0, 10))[1] == 0
    assert gauge(world.metrics, "iotflow_dead_letters", connection="c") == 0


async def test_the_journal_is_pruned_by_retention_and_size_and_off_at_0s(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recovery_module, "_PRUNE_CHUNK", 7)  # several transactions
    await world.append(10, connection=None)
    assert len(await world.spool.read("SELECT id FROM journal")) == 10
    world.clock.now += 3600
    await world.append(10, connection=None)
    world.recovery.journal = JournalSettings(retention=timedelta(minutes=30))
    assert (await world.recovery.prune())["journal"] == 10
    assert len(await world.spool.read("SELECT id FROM journal")) == 10
    big = b'{"pad": "' + b"x" * 1000 + b'"}'
    await asyncio.gather(
        *(
            world.spool.append(
                big,
                dev_eui=DEV,
                uplink_time=world.clock.now,
                received_at=world.clock.now,
                connection_ids=[],
                journal=ROUTE,
            )
            for _ in range(1500)
        )
    )
    world.recovery.journaled(1500 * (len(big) + len(ROUTE)))
    world.recovery.journal = JournalSettings(max_size=ByteSize(1 << 20))
    await world.recovery.prune()
    rows = await world.spool.read("SELECT sum(length(document) + length(route)) FROM journal")
    assert 0.8 * (1 << 20) < rows[0][0] < (1 << 20)  # the oldest went, down to 90%
    world.recovery.journal = JournalSettings(retention=timedelta(0))
    await world.recovery.prune()
    assert await world.spool.read("SELECT id FROM journal") == []


async def test_retention_takes_the_journal_from_its_oldest_end(world: World) -> None:
    """The prune walks the journal in arrival order and stops at the first row young
    enough (`received_at` has no index: a condition on it scanned the whole journal in the
    spool's writer at every turn). A row received before a clock stepped back stays until
    the rows before it have gone."""
    start = world.clock.now
    for received in (start, start + 7200, start - 60, start + 7200):
        await world.spool.append(
            b"{}",
            dev_eui=DEV,
            uplink_time=received,
            received_at=received,
            connection_ids=[],
            journal=ROUTE,
        )
    ids = [r[0] for r in await world.spool.read("SELECT id FROM journal ORDER BY id")]
    world.clock.now = start + 3600 + 1
    world.recovery.journal = JournalSettings(retention=timedelta(hours=1))
    assert (await world.recovery.prune())["journal"] == 1
    assert [r[0] for r in await world.spool.read("SELECT id FROM journal ORDER BY id")] == ids[1:]
    world.clock.now = start + 7200 + 3600 + 1
    assert (await world.recovery.prune())["journal"] == 3
    assert await world.spool.read("SELECT id FROM journal") == []


async def test_deleting_a_connection_removes_its_letters_and_cancels_its_replays(
    world: World,
) -> None:
    (delivery,) = await world.append(1)
    await world.fail(delivery)
    (kept,) = await world.append(1, connection="other")
    await world.fail(kept)
    replay = await world.recovery.start_replay("c", 0, world.clock.now + 10, None)
    await world.spool.drop_connection("c")
    assert (await world.recovery.letters("c", LetterFilter(), 0, 10))[1] == 0
    assert (await world.recovery.letters("other", LetterFilter(), 0, 10))[1] == 1
    row = await world.recovery.replay(replay.id)
    assert row is not None
    assert row.state == "cancelled"


async def test_a_replay_feeds_its_window_in_order_and_can_be_cancelled(world: World) -> None:
    await world.append(6, connection=None)
    start = world.clock.now + 1
    replay = await world.recovery.start_replay("c", start, start + 3, None)
    assert replay.total == 4
    await _until_dispatched(world, 2)  # the window: 2 at a time
    assert len(world.dispatched) == 2
    first = world.dispatched[0]
    assert (first.replay, first.since, first.uplink_time) == (replay.id, world.clock.now, start)
    world.recovery.replayed(replay.id, "c", "delivered")
    await world.deliver(first)
    await _until_dispatched(world, 3)
    row = await world.recovery.cancel_replay(replay.id)
    assert row is not None
    assert (row.state, row.delivered, row.pending) == ("cancelled", 1, 2)
    assert [d.uplink_time for d in world.dispatched] == [start, start + 1, start + 2]
    assert any(kind == "replay_ended" for _, kind, _ in world.events)


async def _until_dispatched(world: World, count: int) -> None:
    # The replay task runs on this loop: yield to it until it has fed `count`.
    for _ in range(1000):
        if len(world.dispatched) >= count:
            return
        await world.spool.flush()
    raise AssertionError(f"dispatched {len(world.dispatched)}, expected {count}")


async def test_a_resend_starts_from_the_document_before_the_processors(world: World) -> None:
    (delivery,) = await world.append(1)
    # The worker's processors rendered another document; that one was refused.
    rendered = Delivery(**{**_fields(delivery), "document": b'{"x": 1}', "source": b'{"n": 0}'})
    await world.fail(rendered)
    (letter,) = (await world.recovery.letters("c", LetterFilter(), 0, 1))[0]
    shown = await world.recovery.letter("c", letter.id)
    assert shown is not None
    assert shown.document == b'{"x": 1}'  # what was to be sent
    assert await world.recovery.resend("c", ids=[letter.id]) == 1
    (again,) = world.dispatched
    assert again.document == b'{"n": 0}'  # processed again from the uplink's document


def _fields(delivery: Delivery) -> dict[str, Any]:
    return {name: getattr(delivery, name) for name in Delivery.__slots__}


async def test_a_pending_uplink_keeps_its_document_when_its_journal_row_is_pruned(
    world: World,
) -> None:
    # A journaled uplink's document is stored once, in its journal row (issue #16).
    pending = await world.append(3)
    stored = await world.spool.read("SELECT length(document) FROM uplinks ORDER BY id")
    assert [r[0] for r in stored] == [0, 0, 0]
    await world.deliver(pending[0])
    world.clock.now += 86400 * 2  # far past the journal's retention
    world.recovery.journal = JournalSettings(retention=timedelta(hours=1))

    assert (await world.recovery.prune())["journal"] == 3

    assert await world.spool.read("SELECT id FROM journal") == []
    loaded = await world.spool.load("c")
    assert [(d.id, d.document) for d in loaded] == [
        (pending[1].id, b'{"n": 1}'),
        (pending[2].id, b'{"n": 2}'),
    ]
