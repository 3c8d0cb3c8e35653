"""What validation accepts can be used: issue #10, defect 2 (a).

The property: any connection body that `parse_connection` accepts (the API's and the config
file's validation) can be scheduled (every alarm has a first window and answers for any
instant), watched by the alarm evaluator, given a worker, stored in the registry, listed
back unchanged, and read back unchanged by a new store on the same file (a restart). The
bodies are drawn around the edges where that used to break: instants near the ends of the
calendar in every offset, extreme time zones, huge intervals and rates, durations at the
limits of `timedelta`, NUL characters.

In-process and fast: a SQLite registry in a temporary directory per example, no daemon.
"""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from iotflow.alarms.evaluator import Alarms
from iotflow.alarms.model import Alarm
from iotflow.alarms.schedule import Schedule
from iotflow.config.load import load_settings
from iotflow.config.model import DeliverySettings
from iotflow.connectors.connection import Connection, parse_connection
from iotflow.delivery.manager import Deliveries
from iotflow.errors import ConfigError
from iotflow.registry import SqliteStore
from iotflow.spool import Spool
from iotflow.telemetry.metrics import Metrics

ZONES = [
    "UTC",
    "Pacific/Kiritimati",  # +14:00
    "Etc/GMT+12",  # -12:00
    "Pacific/Chatham",  # +12:45 / +13:45
    "America/St_Johns",  # -03:30, DST
    "Australia/Lord_Howe",  # a half-hour DST
    "Europe/Paris",
]
WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
PROPERTY = settings(
    max_examples=500,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@st.composite
def instants(draw: st.DrawFn) -> str:
    """An ISO 8601 instant anywhere in the calendar, in any offset, often near its ends or
    near the bounds of what an alarm may use."""
    minutes = draw(st.integers(-23 * 60 - 59, 23 * 60 + 59))
    zone = timezone(timedelta(minutes=minutes))
    plausible = st.one_of(
        st.datetimes(datetime(2020, 1, 1), datetime(2030, 1, 1)),
        st.datetimes(datetime(1970, 1, 1), datetime(9000, 1, 1)),
        st.datetimes(datetime(1970, 1, 1), datetime(1970, 1, 3)),
        st.datetimes(datetime(8999, 12, 30), datetime(9000, 1, 1)),
    )
    edge = st.one_of(
        st.datetimes(),
        st.datetimes(datetime(9998, 12, 1), datetime(9999, 12, 31, 23, 59)),
        st.datetimes(datetime(1, 1, 1), datetime(1, 2, 1)),
    )
    naive = draw(plausible if draw(st.integers(0, 7)) else edge)
    return naive.replace(tzinfo=zone).isoformat()


def mostly(draw: st.DrawFn, plausible: st.SearchStrategy[Any], edge: st.SearchStrategy[Any]) -> Any:
    """A plausible value seven times in eight, else one from the edges."""
    return draw(plausible if draw(st.integers(0, 7)) else edge)


def later(start: str, minutes: st.SearchStrategy[int], draw: st.DrawFn) -> str:
    try:
        return (datetime.fromisoformat(start) + timedelta(minutes=draw(minutes))).isoformat()
    except OverflowError:
        return draw(instants())


@st.composite
def alarms(draw: st.DrawFn) -> dict[str, Any]:
    start = draw(instants())
    # Usually a window of at most about a month after the start, so that many pass.
    end = mostly(draw, st.just(None), instants()) or later(
        start, st.integers(-10, 32 * 24 * 60), draw
    )
    alarm: dict[str, Any] = {
        "startTime": start,
        "endTime": end,
        "uplinkRateMinPerHour": mostly(
            draw,
            st.integers(0, 100) | st.floats(0, 1000, allow_nan=False),
            st.floats(0, 1e12, allow_nan=False) | st.integers(2**62, 2**70),
        ),
    }
    if draw(st.booleans()):
        alarm["timezone"] = draw(st.sampled_from(ZONES))
    recurrence = []
    for _ in range(draw(st.integers(0, 2))):
        frequency = draw(st.sampled_from(["daily", "weekly", "monthly"]))
        entry: dict[str, Any] = {"frequency": frequency}
        if draw(st.booleans()):
            entry["interval"] = mostly(
                draw, st.integers(1, 40) | st.integers(990, 1000), st.integers(1001, 2**70)
            )
        if frequency == "weekly" and draw(st.booleans()):
            entry["byDays"] = draw(st.lists(st.sampled_from(WEEKDAYS), min_size=1, unique=True))
        if draw(st.booleans()):
            entry["until"] = mostly(draw, st.just(None), instants()) or later(
                start, st.integers(0, 10**10), draw
            )
        recurrence.append(entry)
    if recurrence:
        alarm["recurrence"] = recurrence
    if draw(st.booleans()):
        alarm["message"] = draw(st.text(max_size=20))
    return alarm


DURATIONS = st.one_of(
    st.builds(
        lambda n, unit: f"{n}{unit}",
        st.one_of(st.integers(0, 10), st.integers(999_999_990, 10**12)),
        st.sampled_from(["ms", "s", "m", "h", "d", "w"]),
    ),
    st.sampled_from(["1s", "999ms", "36500d", "36501d", "1.0005s", "1.001s", "5214w", "5215w"]),
    st.builds(
        lambda x, unit: f"{x}{unit}", st.floats(0, 1e6).map(lambda f: f"{f:.4f}"), st.just("s")
    ),
)


@st.composite
def bodies(draw: st.DrawFn) -> dict[str, Any]:
    configuration: dict[str, Any] = {"destinationURL": "http://127.0.0.1:9/x"}
    if draw(st.booleans()):
        configuration["uplinkTimeValidity"] = mostly(
            draw, st.sampled_from(["1s", "5m", "72h", "36500d", "1.001s"]), DURATIONS
        )
    if draw(st.booleans()):
        configuration["downlinkPort"] = mostly(
            draw, st.integers(1, 223), st.integers(-1, 0) | st.integers(224, 2**65)
        )
    if draw(st.booleans()):
        configuration["description"] = draw(st.text(max_size=10))
    return {
        "id": "c1",
        "name": draw(st.text(min_size=1, max_size=12)),
        "connectorId": "actility-http-iot",
        "alarms": draw(st.lists(alarms(), max_size=2)),
        "configuration": configuration,
    }


def check_schedulable(alarm: Alarm) -> None:
    """The first window is the one given, and every instant asked about has an answer."""
    schedule = Schedule(alarm)
    first = schedule.next_window(alarm.startTime - timedelta(microseconds=1))
    assert first is not None
    # Occurrences that touch it merge into it: it may end later than endTime.
    assert first.start == alarm.startTime
    assert first.end >= alarm.endTime
    assert schedule.windows(first.start, first.start + timedelta(days=60))[0] == first
    kiritimati, samoa = timezone(timedelta(hours=14)), timezone(timedelta(hours=-12))
    asked = [
        datetime.now(UTC),
        first.start,
        first.end,
        datetime.min.replace(tzinfo=kiritimati),
        datetime.min.replace(tzinfo=UTC),
        datetime.max.replace(tzinfo=samoa),
        datetime.max.replace(tzinfo=UTC),
    ]
    for at in asked:
        window = schedule.active_window(at)
        if window is not None:
            assert window.start <= at < window.end
        upcoming = schedule.next_window(at)
        if upcoming is not None:
            assert upcoming.start > at
        schedule.windows(at, at + timedelta(days=1) if at.year < 9999 else at)


async def check_usable(connection: Connection, directory: Path) -> None:
    for alarm in connection.alarms:
        check_schedulable(alarm)
    url = directory / "registry.db"
    store = SqliteStore(str(url))
    spool = await Spool.open(str(directory / "spool.db"))
    try:
        await store.migrate()
        alarms = Alarms(store, Metrics(), lambda *_: None)
        assert alarms.watch([connection]) == {}
        deliveries = Deliveries(
            spool=spool, metrics=Metrics(), settings=DeliverySettings(), record=lambda *_: None
        )
        deliveries.register([connection], None, {})
        worker = deliveries.worker(connection.id)
        assert worker is not None
        assert worker.out_of_service is None
        await store.create_connection(connection)
        (listed,) = await store.list_connections()
        assert listed == connection
        assert listed.document(reveal=True) == connection.document(reveal=True)
    finally:
        await store.close()
        await spool.close()
    restarted = SqliteStore(str(url))
    try:
        await restarted.migrate()
        (again,) = await restarted.list_connections()
        assert again.fault is None
        assert again == connection
        assert await restarted.get_connection(connection.id) == connection
    finally:
        await restarted.close()


@PROPERTY
@given(body=bodies())
async def test_every_accepted_connection_is_schedulable_storable_and_survives_a_restart(
    body: dict[str, Any],
) -> None:
    try:
        connection = parse_connection(body)
    except ConfigError as exc:
        problems = exc.problems
    else:
        problems = []
    if problems:
        event("refused")
        assert all(p.path for p in problems)  # a field error, with its path
        return
    event(f"accepted with {len(connection.alarms)} alarm(s)")
    with tempfile.TemporaryDirectory() as directory:
        await check_usable(connection, Path(directory))


@PROPERTY
@given(alarm=alarms())
def test_every_accepted_alarm_is_schedulable(alarm: dict[str, Any]) -> None:
    try:
        parsed = Alarm.model_validate(alarm)
    except ValidationError:
        event("refused")
        return
    event("accepted")
    check_schedulable(parsed)


@pytest.mark.parametrize(
    ("alarm", "path", "message"),
    [
        (
            {"startTime": "9999-12-31T22:00:00-12:00", "endTime": "9999-12-31T23:00:00-12:00"},
            "alarms.0.startTime",
            "must lie between 1970-01-01T00:00:00+00:00 and 9000-01-01T00:00:00+00:00",
        ),
        (
            {"startTime": "0001-01-01T00:00:00+14:00", "endTime": "0001-01-01T01:00:00+14:00"},
            "alarms.0.endTime",
            "must lie between",
        ),
        (
            {
                "startTime": "2026-01-05T09:00:00+01:00",
                "endTime": "2026-01-05T18:00:00+01:00",
                "recurrence": [{"frequency": "daily", "until": "9999-12-31T23:59:59-23:59"}],
            },
            "alarms.0.recurrence.0.until",
            "must lie between",
        ),
        (
            {
                "startTime": "2026-01-05T09:00:00+01:00",
                "endTime": "2026-01-05T18:00:00+01:00",
                "recurrence": [{"frequency": "monthly", "interval": 10**20}],
            },
            "alarms.0.recurrence.0.interval",
            "less than or equal to 1000",
        ),
    ],
)
def test_out_of_range_alarms_are_field_errors(
    alarm: dict[str, Any], path: str, message: str
) -> None:
    body = {
        "id": "c1",
        "name": "x",
        "connectorId": "actility-http-iot",
        "configuration": {"destinationURL": "http://127.0.0.1:9/x"},
        "alarms": [{**alarm, "uplinkRateMinPerHour": 1}],
    }
    with pytest.raises(ConfigError) as caught:
        parse_connection(body)
    assert any(p.path == path and message in p.message for p in caught.value.problems), (
        caught.value.problems
    )


@pytest.mark.parametrize(
    ("configuration", "path", "message"),
    [
        ({"uplinkTimeValidity": "999999999d"}, "configuration.uplinkTimeValidity", "36500d"),
        ({"uplinkTimeValidity": "0s"}, "configuration.uplinkTimeValidity", "between 1s"),
        ({"uplinkTimeValidity": "1.0005s"}, "configuration.uplinkTimeValidity", "milliseconds"),
        ({"description": "a\x00b"}, "configuration.description", "NUL"),
        # yarl (what aiohttp sends with) refuses these at the first delivery.
        ({"destinationURL": "http://h:99999/x"}, "configuration.destinationURL", "port"),
        ({"destinationURL": "http://h:0/x"}, "configuration.destinationURL", "port"),
        ({"destinationURL": "http://[::1/x"}, "configuration.destinationURL", "URL"),
    ],
)
def test_unusable_connection_values_are_field_errors(
    configuration: dict[str, Any], path: str, message: str
) -> None:
    body = {
        "id": "c1",
        "name": "x",
        "connectorId": "actility-http-iot",
        "configuration": {"destinationURL": "http://127.0.0.1:9/x", **configuration},
    }
    with pytest.raises(ConfigError) as caught:
        parse_connection(body)
    assert any(p.path == path and message in p.message for p in caught.value.problems), (
        caught.value.problems
    )


def test_the_config_file_gets_the_same_field_errors(tmp_path: Path) -> None:
    # TOML has native offset datetimes and inf: both reach the same checks as JSON strings.
    path = tmp_path / "iotflow.toml"
    path.write_text(
        """
[[connections]]
id = "edge"
name = "edge"
connectorId = "actility-http-iot"
configuration = { destinationURL = "http://127.0.0.1:9/x" }
[[connections.alarms]]
startTime = 9999-12-31T22:00:00-12:00
endTime = 9999-12-31T23:00:00-12:00
uplinkRateMinPerHour = inf
"""
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    paths = {p.path for p in caught.value.problems}
    assert {
        "connections[0].alarms.0.startTime",
        "connections[0].alarms.0.endTime",
        "connections[0].alarms.0.uplinkRateMinPerHour",
    } <= paths, paths
