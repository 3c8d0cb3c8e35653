"""The registry in PostgreSQL: for fleets, where several daemons share one database.

Writes to connections and bindings take one transaction-level advisory lock: they are rare
(API calls, reloads), and serialising them makes read-then-write steps (reconcile, set a
device) correct when two instances do them at once, without retry loops.

Change feed: every such write sends `NOTIFY iotflow_registry, '<token of this store>'` in
its transaction, so it is delivered at commit and only then. Each store LISTENs on a
connection of its own (LISTEN belongs to one session, so not a pooled one); it fires its
feeds for the notifications of the other stores, and for its own writes directly at commit,
which keeps local changes visible while the listener reconnects. Whenever the listener
(re)connects, every feed fires once: notifications sent while nobody listened are lost by
PostgreSQL, so consumers reload instead.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

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

__all__ = ["CHANNEL", "LISTENER_NAME", "PostgresStore"]

log = get_logger("iotflow.registry")

CHANNEL = "iotflow_registry"
LISTENER_NAME = "iotflow-registry-listener"  # application_name, to find it in pg_stat_activity
# Advisory lock keys ("iotflow" in ASCII, then a number): fixed, so all instances agree.
_MIGRATE_LOCK = 0x696F74666C6F7701
_WRITE_LOCK = 0x696F74666C6F7702

_DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)


@dataclass(slots=True)
class _Tx:
    conn: Any  # asyncpg.Connection (asyncpg is untyped)
    changed: bool = False  # set by a write that touched connections or bindings


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


async def _init_connection(conn: Any) -> None:
    # jsonb as Python objects both ways, through orjson.
    await conn.set_type_codec(
        "jsonb", encoder=_dumps, decoder=orjson.loads, schema="pg_catalog", format="text"
    )


@contextmanager
def _errors() -> Iterator[None]:
    """Failures of the database itself, as the registry's error type."""
    try:
        yield
    except _DB_ERRORS as exc:
        raise RegistryError(f"registry database error: {exc}") from exc


class PostgresStore:
    """The Store protocol on PostgreSQL; see iotflow.registry.store.Store for the contract."""

    def __init__(
        self,
        dsn: str,
        *,
        max_events_per_connection: int = DEFAULT_MAX_EVENTS,
        min_size: int = 1,
        max_size: int = 10,
        keepalive: float = 30.0,
        retry_max: float = 30.0,
    ) -> None:
        if max_events_per_connection < 1:
            raise ValueError("max_events_per_connection must be at least 1")
        self._dsn = dsn
        self._max_events = max_events_per_connection
        self._min_size = min_size
        self._max_size = max_size
        self._keepalive = keepalive
        self._retry_max = retry_max
        self._pool: Any = None
        self._pool_lock = asyncio.Lock()
        self._token = uuid.uuid4().hex  # tells this store's notifications from the others'
        self._hub = ChangeHub(ready=False)  # ready once LISTEN is in place
        self._listener: asyncio.Task[None] | None = None
        self._closed = False

    # -- plumbing

    async def _get_pool(self) -> Any:
        if self._closed:
            raise RegistryError("registry is closed")
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self._dsn,
                        min_size=self._min_size,
                        max_size=self._max_size,
                        init=_init_connection,
                    )
        return self._pool

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[Any]:
        with _errors():
            pool = await self._get_pool()
            async with pool.acquire() as conn:
                yield conn

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[_Tx]:
        with _errors():
            pool = await self._get_pool()
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _WRITE_LOCK)
                tx = _Tx(conn)
                yield tx
                if tx.changed:
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, self._token)
        if tx.changed:
            self._hub.notify()

    # -- lifecycle

    async def migrate(self) -> int:
        migrations = load_migrations("postgresql")
        latest = migrations[-1].version
        async with self._read() as conn, conn.transaction():
            # Two instances starting together: the second waits here, then finds nothing
            # to do. Without the lock both would race on CREATE TABLE.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATE_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            applied = {row[0] for row in await conn.fetch("SELECT version FROM schema_migrations")}
            if max(applied, default=0) > latest:
                raise RegistryError(
                    f"registry schema version {max(applied)} is newer than this iotflow "
                    f"knows ({latest}); upgrade iotflow"
                )
            for migration in migrations:
                if migration.version in applied:
                    continue
                await conn.execute(migration.sql)  # several statements: simple protocol
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
                log.info("Registry migrated", version=migration.version, name=migration.name)
        return latest

    async def ping(self) -> None:
        async with self._read() as conn:
            await conn.fetchval("SELECT 1")

    async def close(self) -> None:
        self._closed = True
        self._hub.close()
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            with _errors():
                await pool.close()

    def changes(self) -> ChangeFeed:
        if self._listener is None and not self._closed:
            self._listener = asyncio.get_running_loop().create_task(
                self._listen(), name="registry-listener"
            )
        return self._hub.subscribe()

    async def _listen(self) -> None:
        """Keep one LISTEN connection, reconnecting with backoff; runs until close()."""
        delay = 0.5
        while True:
            try:
                conn = await asyncpg.connect(
                    self._dsn, server_settings={"application_name": LISTENER_NAME}
                )
            except _DB_ERRORS as exc:
                log.warning("Registry change feed cannot connect", error=str(exc), retry_in=delay)
            else:
                try:
                    await self._serve(conn)
                    delay = 0.5  # it worked for a while: reconnect at once
                    continue
                except _DB_ERRORS as exc:
                    log.warning("Registry change feed failed", error=str(exc), retry_in=delay)
                finally:
                    self._hub.set_ready(False)
                    if not conn.is_closed():
                        conn.terminate()  # synchronous: safe while being cancelled
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max)

    async def _serve(self, conn: Any) -> None:
        """LISTEN on `conn` and return when it is lost."""
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        await conn.add_listener(CHANNEL, self._on_notification)
        self._hub.set_ready(True)
        while not lost.is_set():
            try:
                await asyncio.wait_for(lost.wait(), self._keepalive)
            except TimeoutError:
                # A server that vanished without closing the socket is only noticed when
                # we talk to it.
                await asyncio.wait_for(conn.execute("SELECT 1"), self._keepalive)
        log.warning("Registry change feed lost its connection; reconnecting")

    def _on_notification(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if payload != self._token:  # our own writes fired the feeds at commit already
            self._hub.notify()

    # -- connections

    async def list_connections(self) -> list[Connection]:
        async with self._read() as conn:
            rows = await conn.fetch("SELECT id, document, provisioned FROM connections ORDER BY id")
        return load_connections(rows)

    async def get_connection(self, connection_id: str) -> Connection:
        async with self._read() as conn:
            row = await conn.fetchrow(
                "SELECT document, provisioned FROM connections WHERE id = $1", connection_id
            )
        if row is None:
            raise NotFoundError(f"connection {connection_id!r} not found")
        return load_connection(row[0], row[1], connection_id)

    async def create_connection(self, connection: Connection) -> Connection:
        async with self._write() as tx:
            now = datetime.now(UTC)
            inserted = await tx.conn.fetchval(
                "INSERT INTO connections (id, document, provisioned, created_at, updated_at)"
                " VALUES ($1, $2, $3, $4, $4) ON CONFLICT (id) DO NOTHING RETURNING id",
                connection.id,
                connection.document(reveal=True),
                connection.provisioned,
                now,
            )
            if inserted is None:
                raise ConflictError(f"connection {connection.id!r} already exists")
            tx.changed = True
        return connection

    async def replace_connection(self, connection: Connection) -> Connection:
        async with self._write() as tx:
            await _check_writable(tx.conn, connection.id)
            await tx.conn.execute(
                "UPDATE connections SET document = $2, provisioned = $3, updated_at = $4"
                " WHERE id = $1",
                connection.id,
                connection.document(reveal=True),
                connection.provisioned,
                datetime.now(UTC),
            )
            tx.changed = True
        return connection

    async def delete_connection(self, connection_id: str) -> None:
        async with self._write() as tx:
            await _check_writable(tx.conn, connection_id)
            await tx.conn.execute("DELETE FROM connections WHERE id = $1", connection_id)
            tx.changed = True

    async def reconcile_provisioned(self, items: Sequence[Provisioned]) -> Reconciled:
        async with self._write() as tx:
            conn = tx.conn
            stored = {
                row[0]: (row[1], row[2])
                for row in await conn.fetch("SELECT id, document, provisioned FROM connections")
            }
            bound: dict[str, set[str]] = {}
            for row in await conn.fetch(
                "SELECT b.connection_id, b.dev_eui FROM device_bindings b"
                " JOIN connections c ON c.id = b.connection_id WHERE c.provisioned"
            ):
                bound.setdefault(row[0], set()).add(row[1])
            plan = plan_reconcile(items, stored, bound)
            now = datetime.now(UTC)
            if plan.inserts:
                await conn.executemany(
                    "INSERT INTO connections (id, document, provisioned, created_at, updated_at)"
                    " VALUES ($1, $2, true, $3, $3)",
                    [(cid, doc, now) for cid, doc in plan.inserts],
                )
            if plan.updates:
                await conn.executemany(
                    "UPDATE connections SET document = $2, provisioned = true, updated_at = $3"
                    " WHERE id = $1",
                    [(cid, doc, now) for cid, doc in plan.updates],
                )
            for cid, devices in plan.rebind.items():
                await conn.execute("DELETE FROM device_bindings WHERE connection_id = $1", cid)
                await conn.execute(
                    "INSERT INTO device_bindings (dev_eui, connection_id)"
                    " SELECT unnest($1::text[]), $2",
                    devices,
                    cid,
                )
            if plan.deletes:
                await conn.execute(
                    "DELETE FROM connections WHERE id = ANY($1::text[])", plan.deletes
                )
            tx.changed = bool(plan.result)
        return plan.result

    # -- devices

    async def get_device(self, dev_eui: str) -> list[str]:
        async with self._read() as conn:
            rows = await conn.fetch(
                "SELECT connection_id FROM device_bindings WHERE dev_eui = $1"
                " ORDER BY connection_id",
                dev_eui,
            )
        if not rows:
            raise NotFoundError(f"device {dev_eui} is not bound to any connection")
        return [row[0] for row in rows]

    async def set_device(self, dev_eui: str, connection_ids: Sequence[str]) -> None:
        wanted = list(dict.fromkeys(connection_ids))
        async with self._write() as tx:
            conn = tx.conn
            known = {
                row[0]
                for row in await conn.fetch(
                    "SELECT id FROM connections WHERE id = ANY($1::text[])", wanted
                )
            }
            for connection_id in wanted:
                if connection_id not in known:
                    raise NotFoundError(f"connection {connection_id!r} not found")
            rows = await conn.fetch(
                "SELECT connection_id FROM device_bindings WHERE dev_eui = $1", dev_eui
            )
            if {row[0] for row in rows} == set(wanted):
                return  # unchanged: no need to make every instance rebuild
            await conn.execute("DELETE FROM device_bindings WHERE dev_eui = $1", dev_eui)
            await conn.execute(
                "INSERT INTO device_bindings (dev_eui, connection_id)"
                " SELECT $1, unnest($2::text[])",
                dev_eui,
                wanted,
            )
            tx.changed = True

    async def delete_device(self, dev_eui: str) -> None:
        async with self._write() as tx:
            status = await tx.conn.execute(
                "DELETE FROM device_bindings WHERE dev_eui = $1", dev_eui
            )
            if status == "DELETE 0":
                raise NotFoundError(f"device {dev_eui} is not bound to any connection")
            tx.changed = True

    async def list_devices(
        self, connection_id: str | None = None, offset: int = 0, limit: int = 100
    ) -> tuple[list[DeviceBinding], int]:
        check_page(offset, limit)
        if connection_id is None:
            count_sql = "SELECT count(DISTINCT dev_eui) FROM device_bindings"
            page_sql = (
                "SELECT DISTINCT dev_eui FROM device_bindings ORDER BY dev_eui LIMIT $1 OFFSET $2"
            )
            args: tuple[Any, ...] = ()
        else:
            count_sql = "SELECT count(*) FROM device_bindings WHERE connection_id = $1"
            page_sql = (
                "SELECT dev_eui FROM device_bindings WHERE connection_id = $3"
                " ORDER BY dev_eui LIMIT $1 OFFSET $2"
            )
            args = (connection_id,)
        async with self._read() as conn, conn.transaction(isolation="repeatable_read"):
            # One snapshot: the total and the page agree.
            total = await conn.fetchval(count_sql, *args)
            rows = await conn.fetch(
                "SELECT dev_eui, connection_id FROM device_bindings"
                f" WHERE dev_eui IN ({page_sql}) ORDER BY dev_eui, connection_id",
                limit,
                offset,
                *args,
            )
        return group_bindings(rows), int(total)

    async def bindings(self) -> dict[str, list[str]]:
        async with self._read() as conn:
            rows = await conn.fetch(
                "SELECT dev_eui, connection_id FROM device_bindings ORDER BY dev_eui, connection_id"
            )
        result: dict[str, list[str]] = {}
        for dev_eui, connection_id in rows:
            result.setdefault(dev_eui, []).append(connection_id)
        return result

    # -- events

    async def add_event(self, connection_id: str, kind: str, data: Mapping[str, Any]) -> Event:
        # Through JSON once here, so the returned data is what a later read gives.
        stored = orjson.loads(orjson.dumps(dict(data)))
        time = datetime.now(UTC)
        # No advisory lock: events are frequent and independent of routing.
        async with self._read() as conn, conn.transaction():
            try:
                event_id = await conn.fetchval(
                    "INSERT INTO events (connection_id, time, kind, data)"
                    " VALUES ($1, $2, $3, $4) RETURNING id",
                    connection_id,
                    time,
                    kind,
                    stored,
                )
            except asyncpg.ForeignKeyViolationError:
                raise NotFoundError(f"connection {connection_id!r} not found") from None
            # Keep the newest N: one index range walk, and nothing deleted most of the time.
            await conn.execute(
                "DELETE FROM events WHERE connection_id = $1 AND id <= (SELECT id FROM events"
                " WHERE connection_id = $1 ORDER BY id DESC LIMIT 1 OFFSET $2)",
                connection_id,
                self._max_events,
            )
        return Event(int(event_id), connection_id, time, kind, stored)

    async def list_events(
        self, connection_id: str, offset: int = 0, limit: int = 100
    ) -> tuple[list[Event], int]:
        check_page(offset, limit)
        async with self._read() as conn, conn.transaction(isolation="repeatable_read"):
            exists = await conn.fetchval("SELECT 1 FROM connections WHERE id = $1", connection_id)
            if exists is None:
                raise NotFoundError(f"connection {connection_id!r} not found")
            total = await conn.fetchval(
                "SELECT count(*) FROM events WHERE connection_id = $1", connection_id
            )
            rows = await conn.fetch(
                "SELECT id, time, kind, data FROM events WHERE connection_id = $1"
                " ORDER BY id DESC LIMIT $2 OFFSET $3",
                connection_id,
                limit,
                offset,
            )
        events = [Event(int(row[0]), connection_id, row[1], row[2], row[3]) for row in rows]
        return events, int(total)

    # -- alarms

    async def add_uplink_counts(self, counts: Mapping[tuple[str, int], int]) -> None:
        if not counts:
            return
        rows = [(cid, minute, n) for (cid, minute), n in counts.items()]
        async with self._read() as conn, conn.transaction():
            await conn.executemany(
                "INSERT INTO uplink_counts (connection_id, minute, count)"
                " SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM connections WHERE id = $1)"
                " ON CONFLICT (connection_id, minute)"
                " DO UPDATE SET count = uplink_counts.count + excluded.count",
                rows,
            )

    async def uplink_count(self, connection_id: str, first_minute: int, last_minute: int) -> int:
        async with self._read() as conn:
            value = await conn.fetchval(
                "SELECT coalesce(sum(count), 0) FROM uplink_counts"
                " WHERE connection_id = $1 AND minute BETWEEN $2 AND $3",
                connection_id,
                first_minute,
                last_minute,
            )
        return int(value)

    async def prune_uplink_counts(self, before_minute: int) -> None:
        async with self._read() as conn:
            await conn.execute("DELETE FROM uplink_counts WHERE minute < $1", before_minute)

    async def alarm_states(self) -> list[AlarmState]:
        async with self._read() as conn:
            rows = await conn.fetch(
                "SELECT connection_id, alarm, fingerprint, active, since, rate, window_start,"
                " window_end FROM alarm_states ORDER BY connection_id, alarm"
            )
        return [
            AlarmState(
                r["connection_id"],
                r["alarm"],
                r["fingerprint"],
                r["active"],
                r["since"],
                r["rate"],
                r["window_start"],
                r["window_end"],
            )
            for r in rows
        ]

    async def set_alarm_state(self, state: AlarmState, *, expect_active: bool) -> bool:
        async with self._read() as conn, conn.transaction():
            # The row lock (or the key's, while there is no row) serialises the instances.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1), $2)", state.connection_id, state.alarm
            )
            row = await conn.fetchrow(
                "SELECT fingerprint, active FROM alarm_states"
                " WHERE connection_id = $1 AND alarm = $2",
                state.connection_id,
                state.alarm,
            )
            current = bool(row and row["fingerprint"] == state.fingerprint and row["active"])
            if current != expect_active:
                return False
            try:
                await conn.execute(
                    "INSERT INTO alarm_states (connection_id, alarm, fingerprint, active, since,"
                    " rate, window_start, window_end) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                    " ON CONFLICT (connection_id, alarm) DO UPDATE SET"
                    " fingerprint = excluded.fingerprint, active = excluded.active,"
                    " since = excluded.since, rate = excluded.rate,"
                    " window_start = excluded.window_start, window_end = excluded.window_end",
                    state.connection_id,
                    state.alarm,
                    state.fingerprint,
                    state.active,
                    state.since,
                    state.rate,
                    state.window_start,
                    state.window_end,
                )
            except asyncpg.ForeignKeyViolationError:
                raise NotFoundError(f"connection {state.connection_id!r} not found") from None
        return True

    # -- device sources

    async def remember_device_source(
        self, dev_eui: str, fmt: str, source: Mapping[str, str]
    ) -> None:
        # One statement, no advisory lock: it touches neither connections nor bindings,
        # and two instances writing the same device at once both write a true value.
        async with self._read() as conn:
            await conn.execute(
                "INSERT INTO device_sources (dev_eui, format, source, updated_at)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (dev_eui) DO UPDATE SET"
                " format = excluded.format, source = excluded.source,"
                " updated_at = excluded.updated_at",
                dev_eui,
                fmt,
                dict(source),
                datetime.now(UTC),
            )

    async def device_source(self, dev_eui: str) -> tuple[str, dict[str, str]] | None:
        async with self._read() as conn:
            row = await conn.fetchrow(
                "SELECT format, source FROM device_sources WHERE dev_eui = $1", dev_eui
            )
        if row is None:
            return None
        return load_device_source(row["format"], row["source"])


async def _check_writable(conn: Any, connection_id: str) -> None:
    provisioned = await conn.fetchval(
        "SELECT provisioned FROM connections WHERE id = $1", connection_id
    )
    if provisioned is None:
        raise NotFoundError(f"connection {connection_id!r} not found")
    if provisioned:
        raise ConflictError(
            f"connection {connection_id!r} is provisioned by the config file and read-only"
        )
