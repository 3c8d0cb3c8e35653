"""The registry in one SQLite file (WAL): the default, for a single daemon on a gateway host.

One aiosqlite connection, used by one operation at a time (an asyncio lock): a registry
sees a handful of writes a minute, and a shared connection cannot interleave transactions.
Writes take the database lock at BEGIN (IMMEDIATE), so another process (`iotflow migrate`)
is waited for (busy_timeout) instead of failing half-way. The change feed is in-process:
only this daemon writes to its file.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosqlite
import orjson
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_random_exponential

from iotflow.connectors.connection import Connection
from iotflow.errors import ConflictError, NotFoundError, RegistryError
from iotflow.registry.store import (
    DEFAULT_MAX_EVENTS,
    AlarmState,
    ChangeFeed,
    ChangeHub,
    DeviceBinding,
    Event,
    Reconciled,
    check_page,
    group_bindings,
    load_connection,
    load_connections,
    load_device_source,
    load_migrations,
    plan_reconcile,
)
from iotflow.telemetry.logging import get_logger

if TYPE_CHECKING:
    from iotflow.config.load import Provisioned

__all__ = ["SqliteStore"]

log = get_logger("iotflow.registry")

MEMORY = ":memory:"


@dataclass(slots=True)
class _Tx:
    db: aiosqlite.Connection
    changed: bool = False  # set by a write that touched connections or bindings


def _locked(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def _prepare_file(path: Path) -> None:
    """Create the file as 0600 before SQLite does: it holds the connections' secrets.

    SQLite gives its -wal and -shm files the mode of the database file, so they follow.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return  # an existing file keeps the mode its operator gave it
    try:
        os.fchmod(fd, 0o600)  # the umask may only narrow the mode; make it exact
    finally:
        os.close(fd)


@contextmanager
def _errors() -> Iterator[None]:
    """Failures of the database itself, as the registry's error type."""
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        raise RegistryError(f"registry database error: {exc}") from exc


class SqliteStore:
    """The Store protocol on SQLite; see iotflow.registry.store.Store for the contract."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_events_per_connection: int = DEFAULT_MAX_EVENTS,
        busy_timeout: float = 5.0,
    ) -> None:
        if max_events_per_connection < 1:
            raise ValueError("max_events_per_connection must be at least 1")
        self.path = os.fspath(path)
        self._max_events = max_events_per_connection
        self._busy_timeout_ms = int(busy_timeout * 1000)
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._hub = ChangeHub(ready=True)
        self._closed = False

    # -- plumbing

    async def _connection(self) -> aiosqlite.Connection:
        """The connection, opened on first use (the caller holds the lock)."""
        if self._closed:
            raise RegistryError("registry is closed")
        if self._db is None:
            if self.path != MEMORY:
                await asyncio.to_thread(_prepare_file, Path(self.path))
            db = await aiosqlite.connect(self.path, isolation_level=None)
            try:
                await db.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
                # Switching a new file to WAL takes an exclusive lock, and SQLite answers
                # "database is locked" at once instead of waiting (no busy handler there):
                # two processes opening a new registry together must retry.
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception(_locked),
                    stop=stop_after_delay(self._busy_timeout_ms / 1000),
                    wait=wait_random_exponential(multiplier=0.01, max=0.2),
                    reraise=True,
                ):
                    with attempt:
                        await db.execute("PRAGMA journal_mode = WAL")
                # NORMAL is durable against a crash of the process under WAL; the registry
                # is small and rewritten from the API or the config file if a power cut
                # loses its last transaction (the spool, which cannot, uses FULL).
                await db.execute("PRAGMA synchronous = NORMAL")
                await db.execute("PRAGMA foreign_keys = ON")
            except BaseException:
                await db.close()
                raise
            self._db = db
        return self._db

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            with _errors():
                yield await self._connection()

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[_Tx]:
        async with self._lock:
            with _errors():
                db = await self._connection()
                await db.execute("BEGIN IMMEDIATE")
                tx = _Tx(db)
                try:
                    yield tx
                except BaseException:
                    if db.in_transaction:
                        await db.execute("ROLLBACK")
                    raise
                await db.execute("COMMIT")
        if tx.changed:
            self._hub.notify()

    # -- lifecycle

    async def migrate(self) -> int:
        migrations = load_migrations("sqlite")
        latest = migrations[-1].version
        async with self._write() as tx:
            await tx.db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
            rows = await tx.db.execute_fetchall("SELECT version FROM schema_migrations")
            applied = {int(row[0]) for row in rows}
            if max(applied, default=0) > latest:
                raise RegistryError(
                    f"registry schema version {max(applied)} is newer than this iotflow "
                    f"knows ({latest}); upgrade iotflow"
                )
            for migration in migrations:
                if migration.version in applied:
                    continue
                for statement in migration.statements():
                    await tx.db.execute(statement)
                await tx.db.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, _now()),
                )
                log.info("Registry migrated", version=migration.version, name=migration.name)
        return latest

    async def ping(self) -> None:
        async with self._read() as db:
            await db.execute_fetchall("SELECT 1")

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
            self._hub.close()
            if self._db is not None:
                db, self._db = self._db, None
                with _errors():
                    await db.close()

    def changes(self) -> ChangeFeed:
        return self._hub.subscribe()

    # -- connections

    async def list_connections(self) -> list[Connection]:
        async with self._read() as db:
            rows = await db.execute_fetchall(
                "SELECT id, document, provisioned FROM connections ORDER BY id"
            )
        return load_connections((row[0], orjson.loads(row[1]), row[2]) for row in rows)

    async def get_connection(self, connection_id: str) -> Connection:
        async with self._read() as db:
            rows = list(
                await db.execute_fetchall(
                    "SELECT document, provisioned FROM connections WHERE id = ?", (connection_id,)
                )
            )
        if not rows:
            raise NotFoundError(f"connection {connection_id!r} not found")
        return load_connection(orjson.loads(rows[0][0]), bool(rows[0][1]), connection_id)

    async def create_connection(self, connection: Connection) -> Connection:
        async with self._write() as tx:
            if await _provisioned(tx.db, connection.id) is not None:
                raise ConflictError(f"connection {connection.id!r} already exists")
            now = _now()
            await tx.db.execute(
                "INSERT INTO connections (id, document, provisioned, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    connection.id,
                    _dumps(connection.document(reveal=True)),
                    connection.provisioned,
                    now,
                    now,
                ),
            )
            tx.changed = True
        return connection

    async def replace_connection(self, connection: Connection) -> Connection:
        async with self._write() as tx:
            await _check_writable(tx.db, connection.id)
            await tx.db.execute(
                "UPDATE connections SET document = ?, provisioned = ?, updated_at = ? WHERE id = ?",
                (
                    _dumps(connection.document(reveal=True)),
                    connection.provisioned,
                    _now(),
                    connection.id,
                ),
            )
            tx.changed = True
        return connection

    async def delete_connection(self, connection_id: str) -> None:
        async with self._write() as tx:
            await _check_writable(tx.db, connection_id)
            await tx.db.execute("DELETE FROM connections WHERE id = ?", (connection_id,))
            tx.changed = True

    async def reconcile_provisioned(self, items: Sequence[Provisioned]) -> Reconciled:
        async with self._write() as tx:
            db = tx.db
            stored = {
                row[0]: (orjson.loads(row[1]), bool(row[2]))
                for row in await db.execute_fetchall(
                    "SELECT id, document, provisioned FROM connections"
                )
            }
            bound: dict[str, set[str]] = {}
            for row in await db.execute_fetchall(
                "SELECT b.connection_id, b.dev_eui FROM device_bindings b"
                " JOIN connections c ON c.id = b.connection_id WHERE c.provisioned = 1"
            ):
                bound.setdefault(row[0], set()).add(row[1])
            plan = plan_reconcile(items, stored, bound)
            now = _now()
            await db.executemany(
                "INSERT INTO connections (id, document, provisioned, created_at, updated_at)"
                " VALUES (?, ?, 1, ?, ?)",
                [(cid, _dumps(doc), now, now) for cid, doc in plan.inserts],
            )
            await db.executemany(
                "UPDATE connections SET document = ?, provisioned = 1, updated_at = ? WHERE id = ?",
                [(_dumps(doc), now, cid) for cid, doc in plan.updates],
            )
            for cid, devices in plan.rebind.items():
                await db.execute("DELETE FROM device_bindings WHERE connection_id = ?", (cid,))
                await db.executemany(
                    "INSERT INTO device_bindings (dev_eui, connection_id) VALUES (?, ?)",
                    [(dev_eui, cid) for dev_eui in devices],
                )
            await db.executemany(
                "DELETE FROM connections WHERE id = ?", [(cid,) for cid in plan.deletes]
            )
            tx.changed = bool(plan.result)
        return plan.result

    # -- devices

    async def get_device(self, dev_eui: str) -> list[str]:
        async with self._read() as db:
            rows = await db.execute_fetchall(
                "SELECT connection_id FROM device_bindings WHERE dev_eui = ?"
                " ORDER BY connection_id",
                (dev_eui,),
            )
        ids = [row[0] for row in rows]
        if not ids:
            raise NotFoundError(f"device {dev_eui} is not bound to any connection")
        return ids

    async def set_device(self, dev_eui: str, connection_ids: Sequence[str]) -> None:
        wanted = list(dict.fromkeys(connection_ids))
        async with self._write() as tx:
            db = tx.db
            if wanted:
                marks = ",".join("?" * len(wanted))
                rows = await db.execute_fetchall(
                    f"SELECT id FROM connections WHERE id IN ({marks})", wanted
                )
                known = {row[0] for row in rows}
                for connection_id in wanted:
                    if connection_id not in known:
                        raise NotFoundError(f"connection {connection_id!r} not found")
            rows = await db.execute_fetchall(
                "SELECT connection_id FROM device_bindings WHERE dev_eui = ?", (dev_eui,)
            )
            if {row[0] for row in rows} == set(wanted):
                return  # unchanged: no need to make every consumer rebuild
            await db.execute("DELETE FROM device_bindings WHERE dev_eui = ?", (dev_eui,))
            await db.executemany(
                "INSERT INTO device_bindings (dev_eui, connection_id) VALUES (?, ?)",
                [(dev_eui, connection_id) for connection_id in wanted],
            )
            tx.changed = True

    async def delete_device(self, dev_eui: str) -> None:
        async with self._write() as tx:
            cursor = await tx.db.execute(
                "DELETE FROM device_bindings WHERE dev_eui = ?", (dev_eui,)
            )
            if cursor.rowcount == 0:
                raise NotFoundError(f"device {dev_eui} is not bound to any connection")
            tx.changed = True

    async def list_devices(
        self, connection_id: str | None = None, offset: int = 0, limit: int = 100
    ) -> tuple[list[DeviceBinding], int]:
        check_page(offset, limit)
        if connection_id is None:
            count_sql = "SELECT count(DISTINCT dev_eui) FROM device_bindings"
            page_sql = "SELECT DISTINCT dev_eui FROM device_bindings"
            args: tuple[Any, ...] = ()
        else:
            count_sql = "SELECT count(*) FROM device_bindings WHERE connection_id = ?"
            page_sql = "SELECT dev_eui FROM device_bindings WHERE connection_id = ?"
            args = (connection_id,)
        async with self._read() as db:
            total_rows = list(await db.execute_fetchall(count_sql, args))
            rows = await db.execute_fetchall(
                "SELECT dev_eui, connection_id FROM device_bindings WHERE dev_eui IN"
                f" ({page_sql} ORDER BY dev_eui LIMIT ? OFFSET ?)"
                " ORDER BY dev_eui, connection_id",
                (*args, limit, offset),
            )
        return group_bindings(rows), int(total_rows[0][0])

    async def bindings(self) -> dict[str, list[str]]:
        async with self._read() as db:
            rows = await db.execute_fetchall(
                "SELECT dev_eui, connection_id FROM device_bindings ORDER BY dev_eui, connection_id"
            )
        result: dict[str, list[str]] = {}
        for dev_eui, connection_id in rows:
            result.setdefault(dev_eui, []).append(connection_id)
        return result

    # -- events

    async def add_event(self, connection_id: str, kind: str, data: Mapping[str, Any]) -> Event:
        encoded = _dumps(dict(data))
        time = datetime.now(UTC)
        async with self._write() as tx:
            try:
                cursor = await tx.db.execute(
                    "INSERT INTO events (connection_id, time, kind, data) VALUES (?, ?, ?, ?)",
                    (connection_id, time.isoformat(timespec="microseconds"), kind, encoded),
                )
            except sqlite3.IntegrityError:
                raise NotFoundError(f"connection {connection_id!r} not found") from None
            event_id = cursor.lastrowid
            # Keep the newest N: one index range walk, and nothing deleted most of the time.
            await tx.db.execute(
                "DELETE FROM events WHERE connection_id = ? AND id <= (SELECT id FROM events"
                " WHERE connection_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (connection_id, connection_id, self._max_events),
            )
        assert event_id is not None
        return Event(event_id, connection_id, time, kind, orjson.loads(encoded))

    async def list_events(
        self, connection_id: str, offset: int = 0, limit: int = 100
    ) -> tuple[list[Event], int]:
        check_page(offset, limit)
        async with self._read() as db:
            if await _provisioned(db, connection_id) is None:
                raise NotFoundError(f"connection {connection_id!r} not found")
            total_rows = list(
                await db.execute_fetchall(
                    "SELECT count(*) FROM events WHERE connection_id = ?", (connection_id,)
                )
            )
            rows = await db.execute_fetchall(
                "SELECT id, time, kind, data FROM events WHERE connection_id = ?"
                " ORDER BY id DESC LIMIT ? OFFSET ?",
                (connection_id, limit, offset),
            )
        events = [
            Event(
                row[0], connection_id, datetime.fromisoformat(row[1]), row[2], orjson.loads(row[3])
            )
            for row in rows
        ]
        return events, int(total_rows[0][0])

    # -- alarms

    async def add_uplink_counts(self, counts: Mapping[tuple[str, int], int]) -> None:
        if not counts:
            return
        rows = [(cid, minute, n, cid) for (cid, minute), n in counts.items()]
        async with self._write() as tx:
            await tx.db.executemany(
                "INSERT INTO uplink_counts (connection_id, minute, count)"
                " SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM connections WHERE id = ?)"
                " ON CONFLICT (connection_id, minute) DO UPDATE SET count = count + excluded.count",
                rows,
            )

    async def uplink_count(self, connection_id: str, first_minute: int, last_minute: int) -> int:
        async with self._read() as db:
            rows = list(
                await db.execute_fetchall(
                    "SELECT coalesce(sum(count), 0) FROM uplink_counts"
                    " WHERE connection_id = ? AND minute BETWEEN ? AND ?",
                    (connection_id, first_minute, last_minute),
                )
            )
        return int(rows[0][0])

    async def prune_uplink_counts(self, before_minute: int) -> None:
        async with self._write() as tx:
            await tx.db.execute("DELETE FROM uplink_counts WHERE minute < ?", (before_minute,))

    async def alarm_states(self) -> list[AlarmState]:
        async with self._read() as db:
            rows = await db.execute_fetchall(
                "SELECT connection_id, alarm, fingerprint, active, since, rate, window_start,"
                " window_end FROM alarm_states ORDER BY connection_id, alarm"
            )
        return [
            AlarmState(
                r[0],
                int(r[1]),
                r[2],
                bool(r[3]),
                datetime.fromisoformat(r[4]),
                float(r[5]),
                _time(r[6]),
                _time(r[7]),
            )
            for r in rows
        ]

    async def set_alarm_state(self, state: AlarmState, *, expect_active: bool) -> bool:
        async with self._write() as tx:
            rows = list(
                await tx.db.execute_fetchall(
                    "SELECT fingerprint, active FROM alarm_states"
                    " WHERE connection_id = ? AND alarm = ?",
                    (state.connection_id, state.alarm),
                )
            )
            current = bool(rows and rows[0][0] == state.fingerprint and rows[0][1])
            if current != expect_active:
                return False
            try:
                await tx.db.execute(
                    "INSERT INTO alarm_states (connection_id, alarm, fingerprint, active, since,"
                    " rate, window_start, window_end) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (connection_id, alarm) DO UPDATE SET"
                    " fingerprint = excluded.fingerprint, active = excluded.active,"
                    " since = excluded.since, rate = excluded.rate,"
                    " window_start = excluded.window_start, window_end = excluded.window_end",
                    (
                        state.connection_id,
                        state.alarm,
                        state.fingerprint,
                        int(state.active),
                        state.since.isoformat(),
                        state.rate,
                        _iso(state.window_start),
                        _iso(state.window_end),
                    ),
                )
            except sqlite3.IntegrityError:
                raise NotFoundError(f"connection {state.connection_id!r} not found") from None
        return True

    # -- device sources

    async def remember_device_source(
        self, dev_eui: str, fmt: str, source: Mapping[str, str]
    ) -> None:
        async with self._write() as tx:
            await tx.db.execute(
                "INSERT INTO device_sources (dev_eui, format, source, updated_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (dev_eui) DO UPDATE SET"
                " format = excluded.format, source = excluded.source,"
                " updated_at = excluded.updated_at",
                (dev_eui, fmt, _dumps(dict(source)), _now()),
            )

    async def device_source(self, dev_eui: str) -> tuple[str, dict[str, str]] | None:
        async with self._read() as db:
            rows = list(
                await db.execute_fetchall(
                    "SELECT format, source FROM device_sources WHERE dev_eui = ?", (dev_eui,)
                )
            )
        if not rows:
            return None
        return load_device_source(rows[0][0], orjson.loads(rows[0][1]))


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


async def _provisioned(db: aiosqlite.Connection, connection_id: str) -> bool | None:
    """The provisioned flag of a connection, None when there is no such connection."""
    rows = list(
        await db.execute_fetchall(
            "SELECT provisioned FROM connections WHERE id = ?", (connection_id,)
        )
    )
    return bool(rows[0][0]) if rows else None


async def _check_writable(db: aiosqlite.Connection, connection_id: str) -> None:
    provisioned = await _provisioned(db, connection_id)
    if provisioned is None:
        raise NotFoundError(f"connection {connection_id!r} not found")
    if provisioned:
        raise ConflictError(
            f"connection {connection_id!r} is provisioned by the config file and read-only"
        )
