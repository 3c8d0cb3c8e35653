"""The registry contract, run against both stores: SQLite files and a real PostgreSQL.

Every test that takes `store` runs twice. PostgreSQL tests each get a database of their
own (created from the suite's server, dropped after), so they can migrate from nothing.
"""

from __future__ import annotations

import asyncio
import os
import stat
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg
import orjson
import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from iotflow.config.load import Provisioned
from iotflow.connectors.connection import Connection, parse_connection
from iotflow.errors import ConfigError, ConflictError, NotFoundError, RegistryError
from iotflow.events import EventLog
from iotflow.flows import Flow, parse_flow
from iotflow.registry import (
    AlarmState,
    ChangeFeed,
    DeviceBinding,
    PostgresStore,
    Reconciled,
    SqliteStore,
    Store,
    open_store,
    sqlite_path,
)
from iotflow.registry.db import load_migrations, render
from iotflow.registry.postgres import LISTENER_NAME
from support.ports import free_port
from support.postgres import Postgres

D1 = "0018B20000000B01"
D2 = "0018B20000000B02"
D3 = "0018B20000000B03"
D9 = "0018B20000000B09"
SECRET = "Token secret"
# Generous: a safety net for a stuck test, not a measure. Cross-instance delivery has its
# own bound (one second, docs/architecture.md "Running it").
WAIT = 5.0


def connection(
    connection_id: str, name: str = "x", *, active: bool = True, secret: bool = False
) -> Connection:
    configuration: dict[str, Any] = {}
    if secret:
        configuration = {
            "destinationURL": "http://127.0.0.1:9/x",
            "headers": {"Authorization": SECRET},
        }
    return parse_connection(
        {
            "id": connection_id,
            "name": name,
            "connectorId": "actility-http-iot",
            "brand": "CAYENNE",
            "active": active,
            "configuration": configuration,
        }
    )


def provisioned(connection_id: str, *devices: str, name: str = "x") -> Provisioned:
    return Provisioned(
        connection(connection_id, name).model_copy(update={"provisioned": True}), devices
    )


async def next_change(feed: ChangeFeed, timeout: float = WAIT) -> None:
    await asyncio.wait_for(anext(feed), timeout)


@dataclass
class Backend:
    """One empty database and the stores opened on it (closed at teardown)."""

    kind: str
    url: str
    stores: list[Store] = field(default_factory=list)

    def open(self, **kw: Any) -> Store:
        store = open_store(self.url, **kw)
        self.stores.append(store)
        return store

    async def raw(self, sql: str) -> list[tuple[Any, ...]]:
        """Run SQL behind the store's back (to look at what it wrote, or to spoil it)."""
        if self.kind == "sqlite":
            async with aiosqlite.connect(sqlite_path(self.url)) as db:
                rows = await db.execute_fetchall(sql)
                await db.commit()
                return [tuple(row) for row in rows]
        conn = await asyncpg.connect(self.url)
        try:
            return [tuple(row) for row in await conn.fetch(sql)]
        finally:
            await conn.close()


@asynccontextmanager
async def postgres_backend(server: Postgres) -> AsyncIterator[Backend]:
    """A database of its own on the suite's server, dropped with its stores' connections."""
    name = f"registry_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server.dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        target = Backend("postgres", server.dsn_for(name))
        try:
            yield target
        finally:
            for store in target.stores:
                await store.close()
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest_asyncio.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        # Four slashes: an absolute path, as in the shipped config.
        target = Backend("sqlite", f"sqlite:///{tmp_path}/state/registry.db")
        yield target
        for store in target.stores:
            await store.close()
        return
    # Only PostgreSQL runs pay for the server (a session fixture starts on first use).
    async with postgres_backend(request.getfixturevalue("postgres")) as target:
        yield target


@pytest_asyncio.fixture
async def pg_backend(postgres: Postgres) -> AsyncIterator[Backend]:
    """For what only PostgreSQL does: several instances, one database."""
    async with postgres_backend(postgres) as target:
        yield target


@pytest_asyncio.fixture
async def store(backend: Backend) -> Store:
    store = backend.open()
    await store.migrate()
    return store


# -- migrations


async def test_migrate_is_idempotent_and_returns_the_version(backend: Backend) -> None:
    latest = len(load_migrations("sqlite"))
    assert latest == len(load_migrations("postgresql")), "both dialects at the same version"
    store = backend.open()
    assert await store.migrate() == latest
    await store.create_connection(connection("c1"))
    assert await store.migrate() == latest
    assert await backend.open().migrate() == latest  # a second process, later
    assert [c.id for c in await store.list_connections()] == ["c1"]
    assert await backend.raw("SELECT version FROM schema_migrations ORDER BY version") == [
        (v,) for v in range(1, latest + 1)
    ]


async def test_concurrent_migrations_apply_each_step_once(backend: Backend) -> None:
    stores = [backend.open() for _ in range(4)]
    versions = await asyncio.gather(*(s.migrate() for s in stores))
    assert versions == [len(load_migrations("sqlite"))] * 4
    assert len(await backend.raw("SELECT version FROM schema_migrations")) == versions[0]
    await stores[0].create_connection(connection("c1"))
    assert [c.id for c in await stores[3].list_connections()] == ["c1"]


async def test_a_newer_schema_is_refused(store: Store, backend: Backend) -> None:
    await backend.raw(
        "INSERT INTO schema_migrations (version, name, applied_at)"
        " VALUES (999, 'future', '2030-01-01T00:00:00+00:00')"
    )
    with pytest.raises(RegistryError, match="newer"):
        await store.migrate()


def test_a_migration_is_written_once_with_dialect_fragments() -> None:
    sql = (
        "CREATE TABLE t (id {key} PRIMARY KEY, doc {json}, ok {bool}{sqlite: CHECK (ok)})"
        "{sqlite: WITHOUT ROWID};"
    )
    assert render(sql, "sqlite") == (
        "CREATE TABLE t (id TEXT PRIMARY KEY, doc TEXT, ok INTEGER CHECK (ok)) WITHOUT ROWID;"
    )
    assert render(sql, "postgresql") == (
        'CREATE TABLE t (id text COLLATE "C" PRIMARY KEY, doc jsonb, ok boolean);'
    )
    with pytest.raises(RegistryError, match="unknown type"):
        render("CREATE TABLE t (x {blob})", "sqlite")
    assert [m.version for m in load_migrations("sqlite")] == [1, 2, 3, 4, 5]
    assert all("{" not in m.sql for d in ("sqlite", "postgresql") for m in load_migrations(d))


# -- connections


async def test_create_get_and_list_in_id_order(store: Store) -> None:
    # Byte order, whatever the database's locale: upper case before lower case.
    for connection_id in ("b2", "a1", "A1", "a-1"):
        assert await store.create_connection(connection(connection_id)) == connection(connection_id)
    assert [c.id for c in await store.list_connections()] == ["A1", "a-1", "a1", "b2"]
    got = await store.get_connection("a1")
    assert got == connection("a1")
    assert got.provisioned is False


async def test_secrets_round_trip_in_clear(store: Store, backend: Backend) -> None:
    await store.create_connection(connection("c1", secret=True))
    for got in (await store.get_connection("c1"), (await store.list_connections())[0]):
        assert got.document(reveal=True)["configuration"]["headers"]["Authorization"] == SECRET
        assert got.document()["configuration"]["headers"]["Authorization"] == "*****"
    [(document,)] = await backend.raw("SELECT document FROM connections")
    assert SECRET in str(document)


async def test_create_conflicts_and_unknown_ids(store: Store) -> None:
    await store.create_connection(connection("c1", "first"))
    with pytest.raises(ConflictError):
        await store.create_connection(connection("c1", "second"))
    assert (await store.get_connection("c1")).name == "first"
    with pytest.raises(NotFoundError):
        await store.get_connection("nope")
    with pytest.raises(NotFoundError):
        await store.replace_connection(connection("nope"))
    with pytest.raises(NotFoundError):
        await store.delete_connection("nope")


async def test_replace_keeps_the_creation_time(store: Store, backend: Backend) -> None:
    await store.create_connection(connection("c1", "old"))
    [(created, _)] = await backend.raw("SELECT created_at, updated_at FROM connections")
    replaced = connection("c1", "new", active=False, secret=True)
    assert await store.replace_connection(replaced) == replaced
    got = await store.get_connection("c1")
    assert (got.name, got.active) == ("new", False)
    assert got.document(reveal=True) == replaced.document(reveal=True)
    [(created_after, updated_after)] = await backend.raw(
        "SELECT created_at, updated_at FROM connections"
    )
    assert created_after == created
    assert updated_after >= created


async def test_delete_removes_bindings_and_events(store: Store) -> None:
    await store.create_connection(connection("c1"))
    await store.create_connection(connection("c2"))
    await store.set_device(D1, ["c1", "c2"])
    await store.set_device(D2, ["c1"])
    await store.add_event("c1", "alarm", {"n": 1})
    await store.delete_connection("c1")
    assert await store.bindings() == {D1: ["c2"]}
    with pytest.raises(NotFoundError):
        await store.get_device(D2)
    with pytest.raises(NotFoundError):
        await store.list_events("c1")
    with pytest.raises(NotFoundError):
        await store.get_connection("c1")
    # A new connection of the same id starts with an empty log: the events are gone.
    await store.create_connection(connection("c1"))
    assert await store.list_events("c1") == ([], 0)


async def test_provisioned_connections_are_read_only(store: Store) -> None:
    await store.reconcile_provisioned([provisioned("p1", D1)])
    with pytest.raises(ConflictError):
        await store.replace_connection(connection("p1", "edited"))
    with pytest.raises(ConflictError):
        await store.delete_connection("p1")
    got = await store.get_connection("p1")
    assert (got.name, got.provisioned) == ("x", True)


async def test_an_invalid_stored_document_is_quarantined_not_fatal(
    store: Store, backend: Backend
) -> None:
    await store.create_connection(connection("c1", secret=True))
    await store.create_connection(connection("c2"))
    # An older version's document that today's validation refuses (and a name that is no string).
    await backend.raw(
        """UPDATE connections SET document = '{"name": 1, "connectorId": "actility-http-iot",
        "configuration": {"headers": {"Authorization": "Token secret"}},
        "alarms": [{"startTime": "9999-12-31T22:00:00-12:00",
                    "endTime": "9999-12-31T23:00:00-12:00", "uplinkRateMinPerHour": 1}]}'
        WHERE id = 'c1'"""
    )
    listed = await store.list_connections()
    assert [(c.id, c.fault is None) for c in listed] == [("c1", False), ("c2", True)]
    broken = await store.get_connection("c1")
    assert broken == listed[0]
    assert broken.fault is not None
    assert "alarms.0.startTime" in broken.fault
    assert "name" in broken.fault
    # Shown without what cannot be told apart from a secret; kept whole for a PUT to unmask.
    assert broken.document() == {
        "id": "c1",
        "name": "c1",
        "connectorId": "actility-http-iot",
        "active": True,
        "alarms": [],
        "configuration": {},
    }
    assert SECRET not in repr(broken)
    assert broken.document(reveal=True)["configuration"]["headers"]["Authorization"] == SECRET
    # It can be repaired and deleted like any other.
    await store.replace_connection(connection("c1"))
    assert (await store.get_connection("c1")).fault is None
    await store.delete_connection("c1")
    assert [c.id for c in await store.list_connections()] == ["c2"]


# -- reconcile


async def test_reconcile_adds_changes_and_removes(store: Store) -> None:
    result = await store.reconcile_provisioned([provisioned("p1", D1, D2), provisioned("p2", D3)])
    assert result == Reconciled(added=["p1", "p2"])
    assert all(c.provisioned for c in await store.list_connections())
    assert await store.bindings() == {D1: ["p1"], D2: ["p1"], D3: ["p2"]}

    assert not await store.reconcile_provisioned([provisioned("p1", D1, D2), provisioned("p2", D3)])

    result = await store.reconcile_provisioned(
        [provisioned("p1", D1, D2, name="renamed"), provisioned("p2", D1), provisioned("p3")]
    )
    assert result == Reconciled(added=["p3"], changed=["p1", "p2"])
    assert (await store.get_connection("p1")).name == "renamed"
    assert await store.bindings() == {D1: ["p1", "p2"], D2: ["p1"]}

    await store.add_event("p2", "alarm", {})
    result = await store.reconcile_provisioned([provisioned("p1", D2, name="renamed")])
    assert result == Reconciled(changed=["p1"], removed=["p2", "p3"])
    assert [c.id for c in await store.list_connections()] == ["p1"]
    assert await store.bindings() == {D2: ["p1"]}


async def test_reconcile_takes_over_an_api_connection_and_says_so(store: Store) -> None:
    await store.create_connection(connection("x", "from the API"))
    await store.create_connection(connection("api"))
    await store.set_device(D9, ["x"])
    await store.set_device(D1, ["x", "api"])
    result = await store.reconcile_provisioned([provisioned("x", D1, D2, name="from the file")])
    assert result == Reconciled(replaced=["x"])
    got = await store.get_connection("x")
    assert (got.name, got.provisioned) == ("from the file", True)
    # The file decides the provisioned connection's devices; the API binding stays.
    assert await store.bindings() == {D1: ["api", "x"], D2: ["x"]}
    assert not await store.reconcile_provisioned([provisioned("x", D1, D2, name="from the file")])


async def test_a_device_is_bound_to_the_union_of_file_and_api(store: Store) -> None:
    await store.create_connection(connection("api"))
    await store.reconcile_provisioned([provisioned("p1", D1)])
    await store.set_device(D1, ["api", "p1"])
    assert await store.get_device(D1) == ["api", "p1"]
    # The API drops the file's binding; the next reconcile puts it back, and keeps "api".
    await store.set_device(D1, ["api"])
    assert await store.reconcile_provisioned([provisioned("p1", D1)]) == Reconciled(changed=["p1"])
    assert await store.get_device(D1) == ["api", "p1"]
    # The file drops the device; the API binding is left alone.
    assert await store.reconcile_provisioned([provisioned("p1")]) == Reconciled(changed=["p1"])
    assert await store.get_device(D1) == ["api"]
    # An empty file removes every provisioned connection, and nothing else.
    assert await store.reconcile_provisioned([]) == Reconciled(removed=["p1"])
    assert [c.id for c in await store.list_connections()] == ["api"]


# -- devices


async def test_set_get_and_delete_a_device(store: Store) -> None:
    await store.create_connection(connection("c1"))
    await store.create_connection(connection("c2"))
    with pytest.raises(NotFoundError):
        await store.get_device(D1)
    await store.set_device(D1, ["c2", "c1", "c2"])
    assert await store.get_device(D1) == ["c1", "c2"]
    await store.set_device(D1, ["c2"])
    assert await store.get_device(D1) == ["c2"]
    await store.set_device(D1, [])
    with pytest.raises(NotFoundError):
        await store.get_device(D1)
    await store.set_device(D1, [])  # unbinding an unbound device is not an error
    await store.set_device(D1, ["c1"])
    await store.delete_device(D1)
    with pytest.raises(NotFoundError):
        await store.delete_device(D1)


async def test_set_device_with_an_unknown_connection_changes_nothing(store: Store) -> None:
    await store.create_connection(connection("c1"))
    await store.set_device(D1, ["c1"])
    with pytest.raises(NotFoundError, match="ghost"):
        await store.set_device(D1, ["c1", "ghost"])
    assert await store.get_device(D1) == ["c1"]


async def test_list_devices_pages_and_filters(store: Store) -> None:
    for connection_id in ("c1", "c2", "c3"):
        await store.create_connection(connection(connection_id))
    devices = [f"0018B20000000B{i:02X}" for i in range(7)]
    for i, dev_eui in enumerate(devices):
        await store.set_device(dev_eui, ["c1", "c2"] if i % 2 else ["c1"])
    page, total = await store.list_devices(offset=2, limit=3)
    assert total == 7
    assert [b.dev_eui for b in page] == devices[2:5]
    assert page[1].connections == ("c1", "c2")
    assert page[0].connections == ("c1",)
    page, total = await store.list_devices(connection_id="c2", limit=2)
    assert total == 3
    # Filtered by connection, a device still shows all of its connections.
    assert [(b.dev_eui, b.connections) for b in page] == [
        (devices[1], ("c1", "c2")),
        (devices[3], ("c1", "c2")),
    ]
    assert await store.list_devices(connection_id="c3") == ([], 0)
    assert await store.list_devices(connection_id="ghost") == ([], 0)
    assert await store.list_devices(offset=10) == ([], 7)
    assert await store.bindings() == {
        d: ["c1", "c2"] if i % 2 else ["c1"] for i, d in enumerate(devices)
    }


# -- events


async def test_events_newest_first_paginated(store: Store) -> None:
    await store.create_connection(connection("c1"))
    added = [await store.add_event("c1", "alarm", {"n": n}) for n in range(5)]
    assert [e.data for e in added] == [{"n": n} for n in range(5)]
    assert all(e.time.tzinfo is not None and e.connection_id == "c1" for e in added)
    events, total = await store.list_events("c1")
    assert total == 5
    assert events == added[::-1]
    events, total = await store.list_events("c1", offset=1, limit=2)
    assert (total, [e.data["n"] for e in events]) == (5, [3, 2])
    with pytest.raises(NotFoundError):
        await store.add_event("ghost", "alarm", {})
    with pytest.raises(NotFoundError):
        await store.list_events("ghost")


async def test_events_are_pruned_per_connection(backend: Backend) -> None:
    store = backend.open(max_events_per_connection=3)
    await store.migrate()
    await store.create_connection(connection("c1"))
    await store.create_connection(connection("c2"))
    await store.add_event("c2", "kept", {})
    for n in range(7):
        await store.add_event("c1", "alarm", {"n": n})
    events, total = await store.list_events("c1")
    assert (total, [e.data["n"] for e in events]) == (3, [6, 5, 4])
    assert (await store.list_events("c2"))[1] == 1
    [(count,)] = await backend.raw("SELECT count(*) FROM events")
    assert count == 4  # pruned from the table, not only hidden


async def test_events_added_together_are_kept_in_order_and_pruned(backend: Backend) -> None:
    store = backend.open(max_events_per_connection=3)
    await store.migrate()
    await store.create_connection(connection("c1"))
    await store.create_connection(connection("c2"))
    await store.add_events([("c2", "kept", {})] + [("c1", "alarm", {"n": n}) for n in range(7)])
    events, total = await store.list_events("c1")
    assert (total, [e.data["n"] for e in events]) == (3, [6, 5, 4])
    assert [e.kind for e in (await store.list_events("c2"))[0]] == ["kept"]
    [(count,)] = await backend.raw("SELECT count(*) FROM events")
    assert count == 4
    # All or none: a connection that does not exist refuses the whole batch.
    with pytest.raises(NotFoundError):
        await store.add_events([("c2", "lost", {}), ("ghost", "alarm", {})])
    assert [e.kind for e in (await store.list_events("c2"))[0]] == ["kept"]


async def test_the_event_log_writes_what_is_queued_together_and_keeps_it_past_a_ghost(
    store: Store,
) -> None:
    await store.create_connection(connection("c1"))
    log = EventLog(store)
    for n in range(3):
        log("c1", "alarm", {"n": n})
    log("ghost", "alarm", {})  # deleted meanwhile: its batch is written one at a time
    log("c1", "alarm", {"n": 3})
    with capture_logs() as logs:
        log.start()
        await log.close()
    events, _ = await store.list_events("c1")
    assert [e.data["n"] for e in events] == [3, 2, 1, 0]
    assert [(e["event"], e["connection"]) for e in logs] == [("Event not recorded", "ghost")]


# -- change feed


async def test_the_feed_fires_on_every_kind_of_change(store: Store) -> None:
    changes: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("create", lambda: store.create_connection(connection("c1"))),
        ("replace", lambda: store.replace_connection(connection("c1", "new"))),
        ("set device", lambda: store.set_device(D1, ["c1"])),
        ("delete device", lambda: store.delete_device(D1)),
        ("reconcile", lambda: store.reconcile_provisioned([provisioned("p1", D1)])),
        ("unbind", lambda: store.set_device(D1, [])),
        ("delete", lambda: store.delete_connection("c1")),
    ]
    with store.changes() as feed:
        await next_change(feed)  # the first yield: build the index now
        assert not feed.pending
        for what, change in changes:
            await change()
            # A store's own changes are announced by the time the call returns.
            assert feed.pending, what
            await next_change(feed)
        # Events are not routing, and a write that changes nothing is no change.
        await store.add_event("p1", "alarm", {})
        await store.set_device(D2, [])
        await store.reconcile_provisioned([provisioned("p1")])  # D1 was unbound above
        assert not feed.pending


async def test_the_feed_coalesces_but_never_loses_a_change(store: Store) -> None:
    with store.changes() as feed:
        await next_change(feed)
        await store.create_connection(connection("c1"))
        await store.create_connection(connection("c2"))
        await next_change(feed)
        assert not feed.pending  # two changes, one rebuild
        # A change while the consumer rebuilds (after the yield) gives one more yield.
        await store.set_device(D1, ["c1"])
        await next_change(feed)


async def test_feeds_end_when_the_store_closes(backend: Backend) -> None:
    store = backend.open()
    await store.migrate()
    seen = 0

    async def consume(feed: ChangeFeed) -> None:
        nonlocal seen
        async for _ in feed:
            seen += 1

    first = store.changes()
    task = asyncio.create_task(consume(first))
    await store.create_connection(connection("c1"))
    await store.close()
    await asyncio.wait_for(task, WAIT)
    late = store.changes()
    with pytest.raises(StopAsyncIteration):
        await next_change(late)
    with pytest.raises(RegistryError):
        await store.ping()


async def test_a_change_through_another_instance_arrives_within_a_second(
    pg_backend: Backend,
) -> None:
    store = pg_backend.open()
    await store.migrate()
    other = pg_backend.open()
    with other.changes() as feed:
        await next_change(feed)  # LISTEN is in place
        await store.create_connection(connection("c1"))
        await next_change(feed, timeout=1.0)
        assert [c.id for c in await other.list_connections()] == ["c1"]
        await store.set_device(D1, ["c1"])
        await next_change(feed, timeout=1.0)
        assert await other.bindings() == {D1: ["c1"]}
        await store.reconcile_provisioned([provisioned("p1", D2)])
        await next_change(feed, timeout=1.0)
        assert await other.bindings() == {D1: ["c1"], D2: ["p1"]}


async def test_the_feed_fires_after_its_listener_reconnects(pg_backend: Backend) -> None:
    store = pg_backend.open()
    await store.migrate()
    with store.changes() as feed:
        await next_change(feed)
        await pg_backend.raw(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            f" WHERE application_name = '{LISTENER_NAME}' AND datname = current_database()"
        )
        # Notifications sent while nobody listened are lost: the consumer must reload.
        await next_change(feed)
        other = pg_backend.open()
        await other.create_connection(connection("c1"))
        await next_change(feed)
        assert [c.id for c in await store.list_connections()] == ["c1"]


async def test_the_listener_reconnects_on_the_backoff_policy() -> None:
    """Waits grow from half a second to `retry_max`, each jittered within [ceiling/2, ceiling]
    (iotflow.backoff, "equal"), so that a fleet that lost its database does not come back
    in one instant."""
    store = PostgresStore(f"postgresql://postgres@127.0.0.1:{free_port()}/none", retry_max=0.6)
    try:
        with capture_logs() as logs, store.changes() as feed:
            async with asyncio.timeout(WAIT):
                while len(logs) < 3:  # noqa: ASYNC110 - watching the listener's own loop
                    await asyncio.sleep(0.05)
            assert not feed.pending  # nothing observed, nothing announced
    finally:
        await store.close()
    waits = [entry["retry_in"] for entry in logs[:3]]
    assert {entry["event"] for entry in logs} == {"Registry change feed cannot connect"}
    assert 0.25 <= waits[0] <= 0.5
    assert 0.3 <= waits[1] <= 0.6
    assert 0.3 <= waits[2] <= 0.6
    assert waits != [0.5, 0.6, 0.6], "jittered, not the bare ceilings"


# -- opening


async def test_ping_says_whether_the_database_answers(store: Store) -> None:
    await store.ping()
    unreachable = open_store(f"postgresql://postgres@127.0.0.1:{free_port()}/none")
    try:
        with pytest.raises(RegistryError):
            await unreachable.ping()
    finally:
        await unreachable.close()


async def test_the_sqlite_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "registry.db"
    store = open_store(f"sqlite:///{path}")
    try:
        await store.migrate()
        await store.create_connection(connection("c1", secret=True))
        for file in (path, path.with_name("registry.db-wal")):
            assert stat.S_IMODE(os.stat(file).st_mode) == 0o600, file
    finally:
        await store.close()


def test_urls_choose_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:///var/registry.db")
    assert isinstance(relative, SqliteStore)
    assert relative.path == "var/registry.db"
    absolute = open_store("sqlite:////var/lib/iotflow/registry.db")
    assert isinstance(absolute, SqliteStore)
    assert absolute.path == "/var/lib/iotflow/registry.db"
    assert sqlite_path("sqlite://") == ":memory:"
    assert isinstance(open_store("postgresql://u@db/iotflow"), PostgresStore)
    assert isinstance(open_store("postgres://u@db/iotflow"), PostgresStore)
    with pytest.raises(ConfigError, match=r"registry\.url"):
        open_store("mysql://db/iotflow")
    with pytest.raises(ConfigError, match=r"registry\.url"):
        open_store("sqlite:relative.db")


async def test_a_relative_sqlite_url_is_under_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///var/registry.db", max_events_per_connection=5)
    try:
        assert await store.migrate() == len(load_migrations("sqlite"))
    finally:
        await store.close()
    assert (tmp_path / "var" / "registry.db").is_file()


# -- alarms: minute counts and raise/clear state -------------------------------------------


async def test_uplink_counts_add_up_per_minute_and_connection(store: Store) -> None:
    await store.create_connection(connection("c1"))
    await store.create_connection(connection("c2"))
    await store.add_uplink_counts({("c1", 100): 3, ("c1", 101): 2, ("c2", 100): 7})
    await store.add_uplink_counts({("c1", 100): 1, ("ghost", 100): 5})  # unknown: ignored
    assert await store.uplink_count("c1", 100, 100) == 4
    assert await store.uplink_count("c1", 41, 101) == 6
    assert await store.uplink_count("c2", 0, 1000) == 7
    assert await store.uplink_count("ghost", 0, 1000) == 0
    await store.prune_uplink_counts(101)
    assert await store.uplink_count("c1", 0, 1000) == 2
    await store.delete_connection("c2")
    assert await store.uplink_count("c2", 0, 1000) == 0


async def test_alarm_state_is_a_compare_and_set(store: Store) -> None:
    await store.create_connection(connection("c1"))
    since = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)
    raised = AlarmState("c1", 0, "fp1", True, since, 3.0, since, since + timedelta(hours=9))
    # Raising expects "not active"; a second instance raising the same alarm loses.
    assert await store.set_alarm_state(raised, expect_active=False) is True
    assert await store.set_alarm_state(raised, expect_active=False) is False
    (stored,) = await store.alarm_states()
    assert stored == raised
    cleared = AlarmState("c1", 0, "fp1", False, since + timedelta(hours=1), 12.0)
    assert await store.set_alarm_state(cleared, expect_active=True) is True
    assert await store.set_alarm_state(cleared, expect_active=True) is False
    assert (await store.alarm_states())[0].active is False
    # An edited alarm (another fingerprint) starts clear, whatever the old row says.
    await store.set_alarm_state(raised, expect_active=False)
    edited = AlarmState("c1", 0, "fp2", True, since, 1.0)
    assert await store.set_alarm_state(edited, expect_active=False) is True
    with pytest.raises(NotFoundError):
        await store.set_alarm_state(
            AlarmState("ghost", 0, "fp", True, since, 0.0), expect_active=False
        )
    await store.delete_connection("c1")
    assert await store.alarm_states() == []


# -- device sources: the network server of each device, for downlinks ----------------------


async def test_device_sources_are_remembered_and_replaced(store: Store, backend: Backend) -> None:
    assert await store.device_source(D1) is None
    chirpstack = {"applicationId": "17c82e96", "devEui": "0018b20000000b01", "tenantId": "t1"}
    await store.remember_device_sources([(D1, "chirpstack", chirpstack)])
    await store.remember_device_sources([(D2, "actility", {})])
    assert await store.device_source(D1) == ("chirpstack", chirpstack)
    assert await store.device_source(D2) == ("actility", {})
    # The device moved to another network server: the latest replaces what was there.
    tts = {"application_id": "app", "device_id": "eui-0018b20000000b01", "tenant_id": "ttn"}
    await store.remember_device_sources([(D1, "tts", tts)])
    await store.remember_device_sources([(D1, "tts", tts)])  # the same again changes nothing
    assert await store.device_source(D1) == ("tts", tts)
    assert await store.device_source(D3) is None
    # Kept in the database: another instance reads it.
    other = backend.open()
    await other.migrate()
    assert await other.device_source(D1) == ("tts", tts)
    assert len(await backend.raw("SELECT dev_eui FROM device_sources")) == 2


async def test_device_sources_outlive_bindings_and_feed_no_change(store: Store) -> None:
    await store.create_connection(connection("c1"))
    await store.set_device(D1, ["c1"])
    with store.changes() as feed:
        await next_change(feed)  # the first yield: the feed observes every writer
        await store.remember_device_sources([(D1, "actility", {})])
        # Routing does not depend on it: no consumer should rebuild for it.
        assert not feed.pending
    await store.delete_device(D1)
    await store.delete_connection("c1")
    # It describes the device, not a route: a device bound again later is addressable.
    assert await store.device_source(D1) == ("actility", {})


async def test_the_events_setting_bounds_the_event_log(backend: Backend, tmp_path: Path) -> None:
    """`[events] max_per_connection` of the config file reaches the store the daemon opens."""
    from iotflow.config.load import load_settings
    from iotflow.registry import open_registry

    path = tmp_path / "iotflow.toml"
    path.write_text(f'[registry]\nurl = "{backend.url}"\n[events]\nmax_per_connection = 2\n')
    store = open_registry(load_settings(path, env={}).config)
    backend.stores.append(store)
    await store.migrate()
    await store.create_connection(connection("c1"))
    for n in range(4):
        await store.add_event("c1", "alarm", {"n": n})
    events, total = await store.list_events("c1")
    assert (total, [e.data["n"] for e in events]) == (2, [3, 2])


# -- upgrading: a registry made by the two stores of before (one SQL file per dialect) -----

PREVIOUS = Path(__file__).parent / "fixtures" / "registry-v3"
T0 = datetime(2026, 11, 30, 8, 15, 0, 123456, tzinfo=UTC)
SINCE = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)  # stored without microseconds, as it was


def previous_migrations(dialect: str) -> list[tuple[int, str, str]]:
    files = sorted(PREVIOUS.glob(f"*.{dialect}.sql"))
    assert [f.name[:4] for f in files] == ["0001", "0002", "0003"]
    return [(int(f.name[:4]), f.name[5:].split(".")[0], f.read_text("utf-8")) for f in files]


def previous_documents() -> dict[str, dict[str, Any]]:
    return {
        "c-api": connection("c-api", "from the API", secret=True).document(reveal=True),
        "p1": provisioned("p1", D1, D2).connection.document(reveal=True),
    }


async def create_previous_sqlite(path: str, *, data: bool) -> None:
    """What the SQLite store of before made: its migrations, and rows as it wrote them."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    script = [
        "PRAGMA journal_mode = WAL;",
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL);",
    ]
    for version, name, sql in previous_migrations("sqlite"):
        script.append(sql)
        script.append(
            "INSERT INTO schema_migrations (version, name, applied_at)"
            f" VALUES ({version}, '{name}', '{T0.isoformat(timespec='microseconds')}');"
        )
    async with aiosqlite.connect(path, isolation_level=None) as db:
        await db.executescript("\n".join(script))
        if not data:
            return
        await db.execute("PRAGMA foreign_keys = ON")
        time = T0.isoformat(timespec="microseconds")
        for cid, document in previous_documents().items():
            await db.execute(
                "INSERT INTO connections VALUES (?, ?, ?, ?, ?)",
                (
                    cid,
                    orjson.dumps(document, option=orjson.OPT_SORT_KEYS).decode(),
                    int(cid == "p1"),
                    time,
                    time,
                ),
            )
        await db.executemany(
            "INSERT INTO device_bindings VALUES (?, ?)",
            [(D1, "c-api"), (D1, "p1"), (D2, "p1")],
        )
        for n in range(4):
            await db.execute(
                "INSERT INTO events (connection_id, time, kind, data) VALUES (?, ?, ?, ?)",
                (
                    "c-api",
                    (T0 + timedelta(seconds=n)).isoformat(timespec="microseconds"),
                    "alarm",
                    orjson.dumps({"n": n}).decode(),
                ),
            )
        await db.execute("DELETE FROM events WHERE id = 4")  # pruned: its id is not reused
        await db.executemany(
            "INSERT INTO uplink_counts VALUES (?, ?, ?)", [("c-api", 100, 3), ("c-api", 101, 2)]
        )
        await db.execute(
            "INSERT INTO alarm_states VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                "c-api",
                0,
                "fp1",
                1,
                SINCE.isoformat(),
                3.0,
                SINCE.isoformat(),
                (SINCE + timedelta(hours=9)).isoformat(),
            ),
        )
        await db.execute(
            "INSERT INTO alarm_states VALUES (?, ?, ?, ?, ?, ?, NULL, NULL)",
            ("p1", 0, "fp2", 0, SINCE.isoformat(), 12.0),
        )
        await db.execute(
            "INSERT INTO device_sources VALUES (?, ?, ?, ?)",
            (D1, "chirpstack", '{"applicationId":"app-1","devEui":"0018b20000000b01"}', time),
        )


async def create_previous_postgres(url: str, *, data: bool, schema: str = "public") -> None:
    """What the PostgreSQL store of before made: its migrations, and rows as it wrote them."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(f'SET search_path = "{schema}"')
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for version, name, sql in previous_migrations("postgresql"):
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
            )
        if not data:
            return
        for cid, document in previous_documents().items():
            await conn.execute(
                "INSERT INTO connections VALUES ($1, $2::text::jsonb, $3, $4, $4)",
                cid,
                orjson.dumps(document).decode(),
                cid == "p1",
                T0,
            )
        await conn.executemany(
            "INSERT INTO device_bindings VALUES ($1, $2)",
            [(D1, "c-api"), (D1, "p1"), (D2, "p1")],
        )
        for n in range(4):
            await conn.execute(
                "INSERT INTO events (connection_id, time, kind, data)"
                " VALUES ($1, $2, $3, $4::text::jsonb)",
                "c-api",
                T0 + timedelta(seconds=n),
                "alarm",
                orjson.dumps({"n": n}).decode(),
            )
        await conn.execute("DELETE FROM events WHERE id = 4")  # pruned: its id is not reused
        await conn.executemany(
            "INSERT INTO uplink_counts VALUES ($1, $2, $3)", [("c-api", 100, 3), ("c-api", 101, 2)]
        )
        await conn.execute(
            "INSERT INTO alarm_states VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            "c-api",
            0,
            "fp1",
            True,
            SINCE,
            3.0,
            SINCE,
            SINCE + timedelta(hours=9),
        )
        await conn.execute(
            "INSERT INTO alarm_states VALUES ($1, $2, $3, $4, $5, $6, NULL, NULL)",
            "p1",
            0,
            "fp2",
            False,
            SINCE,
            12.0,
        )
        await conn.execute(
            "INSERT INTO device_sources VALUES ($1, $2, $3::text::jsonb, $4)",
            D1,
            "chirpstack",
            '{"applicationId":"app-1","devEui":"0018b20000000b01"}',
            T0,
        )
    finally:
        await conn.close()


async def test_a_registry_of_the_previous_stores_opens_without_loss(backend: Backend) -> None:
    if backend.kind == "sqlite":
        await create_previous_sqlite(sqlite_path(backend.url), data=True)
    else:
        await create_previous_postgres(backend.url, data=True)
    applied_before = await backend.raw("SELECT version, applied_at FROM schema_migrations")
    store = backend.open()
    assert await store.migrate() == 5
    after = await backend.raw("SELECT version, applied_at FROM schema_migrations")
    # The previous steps are not applied again; only 0004 (flows) and 0005 are new.
    assert sorted(after)[: len(applied_before)] == sorted(applied_before), "nothing migrated again"
    assert [row[0] for row in sorted(after)][len(applied_before) :] == [4, 5]
    assert await store.list_flows() == []
    # Everything reads back as it was written.
    documents = previous_documents()
    listed = await store.list_connections()
    assert [(c.id, c.provisioned, c.fault) for c in listed] == [
        ("c-api", False, None),
        ("p1", True, None),
    ]
    assert [c.document(reveal=True) for c in listed] == [documents["c-api"], documents["p1"]]
    assert await store.bindings() == {D1: ["c-api", "p1"], D2: ["p1"]}
    assert await store.list_devices(connection_id="p1") == (
        [DeviceBinding(D1, ("c-api", "p1")), DeviceBinding(D2, ("p1",))],
        2,
    )
    events, total = await store.list_events("c-api")
    assert total == 3
    assert [(e.id, e.time, e.kind, e.data) for e in events] == [
        (n + 1, T0 + timedelta(seconds=n), "alarm", {"n": n}) for n in (2, 1, 0)
    ]
    assert await store.uplink_count("c-api", 0, 1000) == 5
    assert await store.alarm_states() == [
        AlarmState("c-api", 0, "fp1", True, SINCE, 3.0, SINCE, SINCE + timedelta(hours=9)),
        AlarmState("p1", 0, "fp2", False, SINCE, 12.0),
    ]
    assert await store.device_source(D1) == (
        "chirpstack",
        {"applicationId": "app-1", "devEui": "0018b20000000b01"},
    )
    # And it goes on from there.
    assert (await store.add_event("c-api", "alarm", {"n": 4})).id == 5
    raised = AlarmState("c-api", 0, "fp1", True, T0, 1.0)
    assert await store.set_alarm_state(raised, expect_active=False) is False  # raised already
    cleared = AlarmState("c-api", 0, "fp1", False, T0, 1.0)
    assert await store.set_alarm_state(cleared, expect_active=True) is True
    await store.add_uplink_counts({("c-api", 101): 1})
    assert await store.uplink_count("c-api", 101, 101) == 3
    # The file's connection is unchanged: reconciling with it rewrites nothing.
    assert not await store.reconcile_provisioned([provisioned("p1", D1, D2)])
    [(created,)] = await backend.raw("SELECT created_at FROM connections WHERE id = 'c-api'")
    await store.replace_connection(connection("c-api", "renamed"))
    assert await backend.raw("SELECT created_at FROM connections WHERE id = 'c-api'") == [
        (created,)
    ]
    assert (await store.get_connection("c-api")).name == "renamed"


def _normalised(sql: str) -> str:
    without_comments = "\n".join(line.split("--")[0] for line in sql.splitlines())
    return " ".join(without_comments.split())


async def sqlite_schema(path: str) -> list[tuple[Any, ...]]:
    async with aiosqlite.connect(path) as db:
        rows = await db.execute_fetchall(
            "SELECT type, name, tbl_name, sql FROM sqlite_master"
            " WHERE name NOT LIKE 'sqlite_%' ORDER BY name"
        )
    return [(kind, name, table, _normalised(sql or "")) for kind, name, table, sql in rows]


async def postgres_schema(url: str, schema: str) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(url, server_settings={"search_path": schema})
    try:
        columns = await conn.fetch(
            "SELECT table_name, column_name, ordinal_position, data_type, collation_name,"
            " is_nullable, column_default, is_identity, identity_generation"
            " FROM information_schema.columns WHERE table_schema = $1 ORDER BY 1, 3",
            schema,
        )
        constraints = await conn.fetch(
            "SELECT cl.relname, con.conname, con.contype, pg_get_constraintdef(con.oid)"
            " FROM pg_constraint con JOIN pg_class cl ON cl.oid = con.conrelid"
            " JOIN pg_namespace n ON n.oid = con.connamespace WHERE n.nspname = $1"
            " ORDER BY 1, 2",
            schema,
        )
        indexes = await conn.fetch(
            "SELECT tablename, indexname, replace(indexdef, $1, '') FROM pg_indexes"
            " WHERE schemaname = $2 ORDER BY 1, 2",
            f"{schema}.",
            schema,
        )
    finally:
        await conn.close()
    return [tuple(row) for row in (*columns, *constraints, *indexes)]


async def test_the_migrations_make_the_schema_of_the_previous_files(backend: Backend) -> None:
    store = backend.open()
    await store.migrate()
    if backend.kind == "sqlite":
        path = sqlite_path(backend.url)
        await create_previous_sqlite(path + ".previous", data=False)
        previous, now = await sqlite_schema(path + ".previous"), await sqlite_schema(path)
    else:
        await create_previous_postgres(backend.url, data=False, schema="previous")
        previous = await postgres_schema(backend.url, "previous")
        now = await postgres_schema(backend.url, "public")
    assert len(now) >= 9  # 7 tables with their indexes, at least
    # 0004 (flows) and 0005 (instances) came after the previous files: their tables are
    # new, the rest the same.
    table = 2 if backend.kind == "sqlite" else 0
    new = {"flows", "flow_connections", "instances", "instance_statistics"}
    new.add("schema_compatibility")
    assert {row[table] for row in now} >= new
    assert [row for row in now if row[table] not in new] == previous


# -- flows


def flow(flow_id: str, *connection_ids: str, **extra: Any) -> Flow:
    return parse_flow(
        {
            "id": flow_id,
            "name": f"flow {flow_id}",
            "matchers": [{"type": "thing", "tags": ["Floor=1"]}, {"type": "key", "key": D1}],
            "connectors": [{"connectionId": c} for c in connection_ids or ("c1",)],
            **extra,
        }
    )


async def test_flows_create_get_list_replace_delete(store: Store) -> None:
    await store.create_connection(connection("c1"))
    await store.create_connection(connection("c2"))
    await store.create_flow(flow("f2", "c1"))
    created = await store.create_flow(flow("f1", "c1", "c2", description="d"))
    assert await store.get_flow("f1") == created
    assert [f.id for f in await store.list_flows()] == ["f1", "f2"]
    assert (await store.get_flow("f1")).document()["matchers"][0]["tags"] == ["floor=1"]
    with pytest.raises(ConflictError):
        await store.create_flow(flow("f1", "c1"))
    await store.replace_flow(flow("f1", "c2"))
    assert (await store.get_flow("f1")).connection_ids == ["c2"]
    await store.delete_flow("f1")
    with pytest.raises(NotFoundError):
        await store.get_flow("f1")
    with pytest.raises(NotFoundError):
        await store.delete_flow("f1")
    with pytest.raises(NotFoundError):
        await store.replace_flow(flow("nope", "c1"))


async def test_a_flow_naming_an_unknown_connection_changes_nothing(store: Store) -> None:
    await store.create_connection(connection("c1"))
    with pytest.raises(ConfigError) as caught:
        await store.create_flow(flow("f1", "c1", "gone"))
    assert [p.path for p in caught.value.problems] == ["connectors.1.connectionId"]
    assert await store.list_flows() == []
    wrong = parse_flow(
        {
            "id": "f1",
            "name": "x",
            "matchers": [{"type": "key", "key": D1}],
            "connectors": [{"id": "aws-iot", "connectionId": "c1"}],
        }
    )
    with pytest.raises(ConfigError, match="connector"):
        await store.create_flow(wrong)


async def test_a_connection_that_flows_name_cannot_be_deleted(store: Store) -> None:
    await store.create_connection(connection("c1"))
    await store.create_flow(flow("f1", "c1"))
    with pytest.raises(ConflictError, match="f1"):
        await store.delete_connection("c1")
    await store.delete_flow("f1")
    await store.delete_connection("c1")  # nothing names it any more


async def test_provisioned_flows_are_reconciled_and_read_only(store: Store) -> None:
    await store.reconcile_provisioned([provisioned("p1")])
    await store.create_flow(flow("api", "p1"))
    first = await store.reconcile_flows([flow("f1", "p1"), flow("api", "p1")])
    assert (first.added, first.replaced) == (["f1"], ["api"])
    assert all(f.provisioned for f in await store.list_flows())
    with pytest.raises(ConflictError, match="provisioned"):
        await store.delete_flow("f1")
    with pytest.raises(ConflictError, match="provisioned"):
        await store.replace_flow(flow("f1", "p1"))
    assert not await store.reconcile_flows([flow("f1", "p1"), flow("api", "p1")])
    again = await store.reconcile_flows([flow("f1", "p1", description="new")])
    assert (again.changed, again.removed) == (["f1"], ["api"])
    assert [f.id for f in await store.list_flows()] == ["f1"]


async def test_the_feed_fires_on_flow_changes(store: Store) -> None:
    await store.create_connection(connection("c1"))
    changes: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("create", lambda: store.create_flow(flow("f1"))),
        ("replace", lambda: store.replace_flow(flow("f1", description="x"))),
        ("delete", lambda: store.delete_flow("f1")),
        ("reconcile", lambda: store.reconcile_flows([flow("p")])),
    ]
    with store.changes() as feed:
        await next_change(feed)
        for what, change in changes:
            await change()
            assert feed.pending, what
            await next_change(feed)
        await store.reconcile_flows([flow("p")])  # unchanged: no change
        assert not feed.pending


async def test_a_flow_change_through_another_instance_arrives_within_a_second(
    pg_backend: Backend,
) -> None:
    store = pg_backend.open()
    await store.migrate()
    other = pg_backend.open()
    await store.create_connection(connection("c1"))
    with other.changes() as feed:
        await next_change(feed)
        await store.create_flow(flow("f1"))
        await next_change(feed, timeout=1.0)
        assert [f.id for f in await other.list_flows()] == ["f1"]
        await store.delete_flow("f1")
        await next_change(feed, timeout=1.0)
        assert await other.list_flows() == []
