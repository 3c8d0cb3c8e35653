"""The alarm evaluator on a manual clock and a real registry."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest

from iotflow.alarms.clock import Clock
from iotflow.alarms.evaluator import Alarms
from iotflow.connectors import Connection, parse_connection
from iotflow.registry import AlarmState, SqliteStore, Store
from iotflow.telemetry.metrics import Metrics

START = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)  # a Monday, 09:00 in Paris


class ManualClock(Clock):
    def __init__(self, at: datetime) -> None:
        super().__init__()
        self.at = at.timestamp()

    def now(self) -> float:
        return self.at

    def minute(self) -> int:
        return int(self.at // 60)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = SqliteStore(tmp_path / "registry.db")
    await store.migrate()
    yield store
    await store.close()


def watched(end_hour: int = 18, threshold: float = 10) -> Connection:
    return parse_connection(
        {
            "id": "c1",
            "name": "watched",
            "connectorId": "actility-http-iot",
            "configuration": {"destinationURL": "http://127.0.0.1:9/"},
            "alarms": [
                {
                    "startTime": "2026-11-23T09:00:00+01:00",
                    "endTime": f"2026-11-23T{end_hour}:00:00+01:00",
                    "timezone": "Europe/Paris",
                    "uplinkRateMinPerHour": threshold,
                    "message": "quiet",
                }
            ],
        }
    )


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.notes: list[dict[str, Any]] = []

    def __call__(self, connection_id: str, kind: str, data: dict[str, Any]) -> None:
        self.events.append((kind, data))

    async def notify(self, message: dict[str, Any]) -> None:
        self.notes.append(message)


class Spied:
    """The store, telling the recorder which events its alarm changes wrote (they go to the
    registry with the change, in one transaction, not through the record callback)."""

    def __init__(self, store: Store, recorder: Recorder) -> None:
        self._store = store
        self._recorder = recorder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def set_alarm_state(
        self,
        state: AlarmState,
        *,
        expect_active: bool,
        event: tuple[str, Mapping[str, Any]] | None = None,
    ) -> bool:
        done = await self._store.set_alarm_state(state, expect_active=expect_active, event=event)
        if done and event is not None:
            self._recorder.events.append((event[0], dict(event[1])))
        return done


async def make(store: Store, clock: ManualClock, recorder: Recorder) -> Alarms:
    connection = watched()
    if not await store.list_connections():
        await store.create_connection(connection)
    spied = cast(Store, Spied(store, recorder))
    alarms = Alarms(spied, Metrics(), recorder, notify=recorder.notify, clock=clock)
    alarms.watch([connection])
    return alarms


async def run_minutes(alarms: Alarms, clock: ManualClock, minutes: int, per_minute: int) -> None:
    """Advance the clock minute by minute, routing `per_minute` uplinks in each."""
    for _ in range(minutes):
        alarms.count(["c1"] * per_minute)
        clock.at += 60
        await alarms._flush()
        await alarms.evaluate(clock.minute())


async def test_observes_an_hour_then_raises_and_clears(store: Store) -> None:
    clock, recorder = ManualClock(START), Recorder()
    alarms = await make(store, clock, recorder)
    await run_minutes(alarms, clock, 59, 0)
    assert recorder.events == []  # less than an hour observed: nothing said yet
    assert alarms.states_of("c1")[0]["state"] == "OBSERVING"
    await run_minutes(alarms, clock, 1, 0)
    ((kind, data),) = recorder.events
    assert kind == "alarm_raised"
    assert data["rate"] == 0
    assert data["threshold"] == 10
    assert [a["connectionId"] for a in alarms.active()] == ["c1"]
    assert recorder.notes[0]["type"] == "alarm_raised"
    # Still low for an hour: raised once, not again every minute.
    await run_minutes(alarms, clock, 60, 0)
    assert len(recorder.events) == 1
    # Ten uplinks in the trailing hour: back at the threshold, cleared.
    await run_minutes(alarms, clock, 10, 1)
    assert [k for k, _ in recorder.events] == ["alarm_raised", "alarm_cleared"]
    assert recorder.events[1][1]["rate"] == 10
    assert alarms.active() == []


async def test_the_rate_is_the_trailing_sixty_minutes(store: Store) -> None:
    clock, recorder = ManualClock(START), Recorder()
    alarms = await make(store, clock, recorder)
    await run_minutes(alarms, clock, 50, 0)
    await run_minutes(alarms, clock, 10, 1)  # ten uplinks, in the last ten minutes
    assert recorder.events == []  # exactly at the threshold: not low
    await run_minutes(alarms, clock, 50, 0)  # they are still within the hour
    assert recorder.events == []
    await run_minutes(alarms, clock, 1, 0)  # the first of them leaves the hour
    assert [k for k, _ in recorder.events] == ["alarm_raised"]
    assert recorder.events[0][1]["rate"] == 9


async def test_the_end_of_the_window_clears(store: Store) -> None:
    clock, recorder = ManualClock(START), Recorder()
    alarms = await make(store, clock, recorder)
    await run_minutes(alarms, clock, 61, 0)
    assert [k for k, _ in recorder.events] == ["alarm_raised"]
    await run_minutes(alarms, clock, 9 * 60, 0)  # past 18:00 Paris
    assert [k for k, _ in recorder.events] == ["alarm_raised", "alarm_cleared"]
    assert recorder.events[1][1]["reason"] == "window ended"
    assert alarms.states_of("c1")[0]["state"] == "OUTSIDE_WINDOW"


async def test_two_instances_raise_once_and_count_together(store: Store) -> None:
    clock = ManualClock(START)
    first, second = Recorder(), Recorder()
    a = await make(store, clock, first)
    b = await make(store, clock, second)
    for _ in range(70):
        # Each instance receives half of the uplinks (a shared subscription): 6 an hour
        # each, 12 together, above the threshold of 10.
        a.count(["c1"] * (1 if clock.minute() % 10 == 0 else 0))
        b.count(["c1"] * (1 if clock.minute() % 10 == 5 else 0))
        clock.at += 60
        await a._flush()
        await b._flush()
        await a.evaluate(clock.minute())
        await b.evaluate(clock.minute())
    assert first.events == second.events == []
    for _ in range(60):  # one instance's share stops: 6 an hour, low
        a.count(["c1"] * (1 if clock.minute() % 10 == 0 else 0))
        clock.at += 60
        await a._flush()
        await b._flush()
        await b.evaluate(clock.minute())
        await a.evaluate(clock.minute())
    raised = [k for k, _ in first.events + second.events]
    assert raised == ["alarm_raised"]  # announced by exactly one instance
    assert a.active() == b.active() != []


async def test_a_restart_keeps_a_raised_alarm(store: Store) -> None:
    clock, recorder = ManualClock(START), Recorder()
    alarms = await make(store, clock, recorder)
    await run_minutes(alarms, clock, 61, 0)
    assert len(recorder.events) == 1
    again = await make(store, clock, recorder)
    await again._load_states()
    assert [a["connectionId"] for a in again.active()] == ["c1"]
    await run_minutes(again, clock, 61, 0)  # observed anew, still low
    assert len(recorder.events) == 1
