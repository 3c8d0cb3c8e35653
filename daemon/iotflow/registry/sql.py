"""The registry's one store: the SQL of every Store method, written once for both databases.

It runs on a `Database` (iotflow.registry.db) of either dialect: `SqliteStore` and
`PostgresStore` are this class on SQLite and on PostgreSQL. Writes to connections and
bindings are serialised (`_WRITE_LOCK`) and set `tx.changed`, which fires the change feeds
at commit; events, minute counts and device sources are not routing and change nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from iotflow.connectors.connection import Connection
from iotflow.errors import ConfigError, ConflictError, NotFoundError, Problem, RegistryError
from iotflow.flows.model import Flow, parse_flow
from iotflow.registry.db import (
    SCHEMA_MIGRATIONS,
    Conn,
    Database,
    ForeignKeyViolation,
    load_migrations,
    render,
    timestamp,
)
from iotflow.registry.store import (
    DEFAULT_MAX_EVENTS,
    AlarmState,
    ChangeFeed,
    DeviceBinding,
    Event,
    Instance,
    Reconciled,
    check_page,
    group_bindings,
    load_connection,
    load_connections,
    load_device_source,
    plan_reconcile,
)
from iotflow.telemetry.logging import get_logger

if TYPE_CHECKING:
    from iotflow.config.load import Provisioned

__all__ = ["SqlStore"]

log = get_logger("iotflow.registry")

# PostgreSQL advisory lock keys ("iotflow" in ASCII, then a number): fixed, so that every
# instance, of this version or an older one, agrees.
_MIGRATE_LOCK = 0x696F74666C6F7701
_WRITE_LOCK = 0x696F74666C6F7702
# The migration that created the schema_compatibility table.
_COMPATIBILITY_SINCE = 5


def _dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def _now() -> datetime:
    return datetime.now(UTC)


def _optional_time(value: datetime | str | None) -> datetime | None:
    return None if value is None else timestamp(value)


def _marks(count: int) -> str:
    return ", ".join(f"${n}" for n in range(1, count + 1))


class SqlStore:
    """The Store protocol on a Database; see iotflow.registry.store.Store for the contract."""

    def __init__(
        self, database: Database, *, max_events_per_connection: int = DEFAULT_MAX_EVENTS
    ) -> None:
        if max_events_per_connection < 1:
            raise ValueError("max_events_per_connection must be at least 1")
        self._db = database
        self._max_events = max_events_per_connection

    # -- lifecycle

    async def migrate(self) -> int:
        dialect = self._db.dialect
        migrations = load_migrations(dialect)
        latest = migrations[-1].version
        # Two instances starting together: the second waits here, then finds nothing to do.
        async with self._db.transaction(lock=_MIGRATE_LOCK) as tx:
            await tx.execute(render(SCHEMA_MIGRATIONS, dialect))
            applied = {
                int(row[0]) for row in await tx.fetch("SELECT version FROM schema_migrations")
            }
            newest = max(applied, default=0)
            if newest > latest:
                # A rolling upgrade: a newer instance migrated the registry. Keep working
                # if that schema says code of our version still works on it.
                oldest = await tx.fetchval(
                    "SELECT oldest_reader FROM schema_compatibility WHERE version = $1", newest
                )
                if oldest is None or int(oldest) > latest:
                    raise RegistryError(
                        f"registry schema version {newest} is newer than this iotflow "
                        f"knows ({latest}); upgrade iotflow"
                    )
                log.warning(
                    "Registry schema is newer than this iotflow; it is compatible",
                    schema_version=newest,
                    known=latest,
                    fix="upgrade this instance (a rolling upgrade is in progress)",
                )
                return latest
            for migration in migrations:
                if migration.version in applied:
                    continue
                for statement in migration.statements():
                    await tx.execute(statement)
                await tx.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    _now(),
                )
                log.info("Registry migrated", version=migration.version, name=migration.name)
            if latest >= _COMPATIBILITY_SINCE:
                await tx.executemany(
                    "INSERT INTO schema_compatibility (version, oldest_reader) VALUES ($1, $2)"
                    " ON CONFLICT (version) DO NOTHING",
                    [(m.version, m.oldest_reader) for m in migrations],
                )
        return latest

    async def ping(self) -> None:
        async with self._db.connection() as conn:
            await conn.fetchval("SELECT 1")

    async def close(self) -> None:
        await self._db.close()

    def changes(self) -> ChangeFeed:
        return self._db.changes()

    # -- connections

    async def list_connections(self) -> list[Connection]:
        async with self._db.connection() as conn:
            rows = await conn.fetch("SELECT id, document, provisioned FROM connections ORDER BY id")
        return load_connections((row[0], orjson.loads(row[1]), row[2]) for row in rows)

    async def get_connection(self, connection_id: str) -> Connection:
        async with self._db.connection() as conn:
            row = await conn.fetchrow(
                "SELECT document, provisioned FROM connections WHERE id = $1", connection_id
            )
        if row is None:
            raise NotFoundError(f"connection {connection_id!r} not found")
        return load_connection(orjson.loads(row[0]), bool(row[1]), connection_id)

    async def create_connection(self, connection: Connection) -> Connection:
        async with self._db.transaction(lock=_WRITE_LOCK) as tx:
            inserted = await tx.execute(
                "INSERT INTO connections (id, document, provisioned, created_at, updated_at)"
                " VALUES ($1, $2, $3, $4, $4) ON CONFLICT (id) DO NOTHING",
                connection.id,
                _dumps(connection.document(reveal=True)),
                connection.provisioned,
                _now(),
            )
            if not inserted:
                raise ConflictError(f"connection {connection.id!r} already exists")
            tx.changed = True
        return connection

    async def replace_connection(self, connection: Connection) -> Connection:
        async with self._db.transaction(lock=_WRITE_LOCK) as tx:
            await _check_writable(tx, connection.id)
            await tx.execute(
                "UPDATE connections SET document = $2, provisioned = $3, updated_at = $4"
                " WHERE id = $1",
                connection.id,
                _dumps(connection.document(reveal=True)),
                connection.provisioned,
                _now(),
            )
            tx.changed = True
        return connection

    async def delete_connection(self, connection_id: str) -> None:
        async with self._db.transaction(lock=_WRITE_LOCK) as tx:
            await _check_writable(tx, connection_id)
            flows = [
                row[0]
                for row in await tx.fetch(
                    "SELECT flow_id FROM flow_connections WHERE connection_id = $1"
                    " ORDER BY flow_id LIMIT 11",
                    connection_id,
                )
            ]
            if flows:
                shown = ", ".join(repr(f) for f in flows[:10]) + (
                    ", ..." if len(flows) > 10 else ""
                )
                raise ConflictError(
                    f"connection {connection_id!r} is used by flows {shown}; "
                    "change or delete them first"
                )
            await tx.execute("DELETE FROM connections WHERE id = $1", connection_id)
            tx.changed = True

    async def reconcile_provisioned(self, items: Sequence[Provisioned]) -> Reconciled:
        async with self._db.transaction(lock=_WRITE_LOCK) as tx:
            stored = {
                row[0]: (orjson.loads(row[1]), bool(row[2]))
                for row in await tx.fetch("SELECT id, document, provisioned FROM connections")
            }
            bound: dict[str, set[str]] = {}
            for row in await tx.fetch(
                "SELECT b.connection_id, b.dev_eui FROM device_bindings b"
                " JOIN connections c ON c.id = b.connection_id WHERE c.provisioned"
            ):
                bound.setdefault(row[0], set()).add(row[1])
            plan = plan_reconcile(items, stored, bound)
            now = _now()
            await tx.executemany(
                "INSERT INTO connections (id, document, provisioned, created_at, updated_at)"
                " VALUES ($1, $2, true, $3, $3)",
                [(cid, _dumps(doc), now) for cid, doc in plan.inserts],
            )
            await tx.executemany(
                "UPDATE connections SET document = $2, provisioned = true, updated_at = $3"
                " WHERE id = $1",
                [(cid, _dumps(doc), now) for cid, doc in plan.updates],
            )
            # Two statements for every connection rebound, not two each (1,000 connections
            # provisioned with their devices: 2 round trips, not 2,000; issue #16).
            await tx.executemany(
                "DELETE FROM device_bindings WHERE connection_id = $1",
                [(cid,) for cid in plan.rebind],
            )
            await tx.executemany(
                "INSERT INTO device_bindings (dev_eui, connection_id) VALUES ($1, $2)",
                [(dev_eui, cid) for cid, devices in plan.rebind.items() for dev_eui in devices],
            )
            await tx.executemany(
                "DELETE FROM connections WHERE id = $1", [(cid,) for cid in plan.deletes]
            )
            tx.changed = bool(plan.result)
        return plan.result

    # -- flows

    async def list_flows(self) -> list[Flow]:
        async with self._db.connection() as conn:
            rows = await conn.fetch("SELECT id, document, provisioned FROM flows ORDER BY id")
        return [_load_flow(row[0], orjson.loads(row[1]), bool(row[2])) for row in rows]

    async def get_flow(self, flow_id: str) -> Flow:
        async with self._db.connection() as conn:
            row = await conn.fetchrow(
                "SELECT document, provisioned FROM flows WHERE id = $1", flow_id
            )
        if row is None:
            raise NotFoundError(f"flow {flow_id!r} not found")
        return _load_flow(flow_id, orjson.loads(row[0]), bool(row[1]))

    async def create_flow(self, flow: Flow) -> Flow:
        async with self._db.transaction(lock=_WRITE_LOCK) as tx:
            await _check_flow_connections(tx, flow)
            inserted = await tx.execute(
                "INSERT INTO flows (id, document, provisioned, created_at, updated_at)"
                " VALUES ($1, $2, $3, $4, $4) ON CONFLICT (id) DO NOTHING",
                flow.id,
                _dumps(flow.document()),
                flow.provisioned,
                _now(),
            )
            if not inserted:
                raise ConflictError(f"flow {flow.id!r} already exists")
            await _link_flow(tx, flow)
            tx.changed = True
        return flow

    async def replace_flow(self, flow: Flow) -> Flow:
        async with self._db.transaction(lock=_WRITE_LOCK) as tx:
            await _check_flow_writable(tx, flow.id)
            await _check_flow_connections(tx, flow)
            await tx.execute(
                "UPDATE flows SET document = $2, provisioned = $3, updated_at = $4 WHERE id = $1",
                flow.id,
                _dumps(flow.document()),
                flow.provisioned,
                _now(),
            )
            await tx.execute("DELETE FROM flow_connections WHERE flow_id = $1", flow.id)
            await _link_flow(tx, flow)
            tx.changed = True
        return flow

    async def delete_flow(self, flow_id: str) -> None:
        async with self._db.transaction(lock=_WRITE_LOCK) as tx:
            await _check_flow_writable(tx, flow_id)
            await tx.execute("DELETE FROM flows WHERE id = $1", flow_id)
            tx.changed = True

    async def reconcile_flows(self, flows: Sequence[Flow]) -> Reconciled:
        result = Reconciled()
        async with self._db.transaction(lock=_WRITE_LOCK) as tx:
            stored = {
                row[0]: (orjson.loads(row[1]), bool(row[2]))
                for row in await tx.fetch("SELECT id, document, provisioned FROM flows")
            }
            wanted = {f.id for f in flows}
            now = _now()
            for flow in flows:
                document = flow.document()
                old = stored.get(flow.id)
                if old is not None and old == (document, True):
                    continue
                if old is None:
                    await tx.execute(
                        "INSERT INTO flows (id, document, provisioned, created_at, updated_at)"
                        " VALUES ($1, $2, true, $3, $3)",
                        flow.id,
                        _dumps(document),
                        now,
                    )
                    result.added.append(flow.id)
                else:
                    await tx.execute(
                        "UPDATE flows SET document = $2, provisioned = true, updated_at = $3"
                        " WHERE id = $1",
                        flow.id,
                        _dumps(document),
                        now,
                    )
                    (result.changed if old[1] else result.replaced).append(flow.id)
                await tx.execute("DELETE FROM flow_connections WHERE flow_id = $1", flow.id)
                await _link_flow(tx, flow)
            for flow_id, (_, was_provisioned) in stored.items():
                if was_provisioned and flow_id not in wanted:
                    await tx.execute("DELETE FROM flows WHERE id = $1", flow_id)
                    result.removed.append(flow_id)
            for ids in (result.added, result.changed, result.removed, result.replaced):
                ids.sort()
            tx.changed = bool(result)
        return result

    # -- devices

    async def get_device(self, dev_eui: str) -> list[str]:
        async with self._db.connection() as conn:
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
        async with self._db.transaction(lock=_WRITE_LOCK) as tx:
            if wanted:
                known = {
                    row[0]
                    for row in await tx.fetch(
                        f"SELECT id FROM connections WHERE id IN ({_marks(len(wanted))})", *wanted
                    )
                }
                for connection_id in wanted:
                    if connection_id not in known:
                        raise NotFoundError(f"connection {connection_id!r} not found")
            rows = await tx.fetch(
                "SELECT connection_id FROM device_bindings WHERE dev_eui = $1", dev_eui
            )
            if {row[0] for row in rows} == set(wanted):
                return  # unchanged: no need to make every consumer rebuild
            await tx.execute("DELETE FROM device_bindings WHERE dev_eui = $1", dev_eui)
            await tx.executemany(
                "INSERT INTO device_bindings (dev_eui, connection_id) VALUES ($1, $2)",
                [(dev_eui, connection_id) for connection_id in wanted],
            )
            tx.changed = True

    async def delete_device(self, dev_eui: str) -> None:
        async with self._db.transaction(lock=_WRITE_LOCK) as tx:
            deleted = await tx.execute("DELETE FROM device_bindings WHERE dev_eui = $1", dev_eui)
            if not deleted:
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
            count_sql = "SELECT count(*) FROM device_bindings WHERE connection_id = $1"
            page_sql = "SELECT dev_eui FROM device_bindings WHERE connection_id = $3"
            args = (connection_id,)
        async with self._db.snapshot() as conn:
            total = await conn.fetchval(count_sql, *args)
            rows = await conn.fetch(
                "SELECT dev_eui, connection_id FROM device_bindings WHERE dev_eui IN"
                f" ({page_sql} ORDER BY dev_eui LIMIT $1 OFFSET $2)"
                " ORDER BY dev_eui, connection_id",
                limit,
                offset,
                *args,
            )
        return group_bindings(rows), int(total)

    async def bindings(self) -> dict[str, list[str]]:
        async with self._db.connection() as conn:
            rows = await conn.fetch(
                "SELECT dev_eui, connection_id FROM device_bindings ORDER BY dev_eui, connection_id"
            )
        result: dict[str, list[str]] = {}
        for dev_eui, connection_id in rows:
            result.setdefault(dev_eui, []).append(connection_id)
        return result

    # -- events

    async def add_event(self, connection_id: str, kind: str, data: Mapping[str, Any]) -> Event:
        encoded = _dumps(dict(data))
        time = _now()
        # Not the write lock: events are frequent and independent of routing.
        async with self._db.transaction() as tx:
            event_id = await self._insert_event(tx, connection_id, time, kind, encoded)
        # Through JSON once, so the returned data is what a later read gives.
        return Event(int(event_id), connection_id, time, kind, orjson.loads(encoded))

    async def add_events(self, events: Sequence[tuple[str, str, Mapping[str, Any]]]) -> None:
        if not events:
            return
        time = _now()
        async with self._db.transaction() as tx:
            try:
                await tx.executemany(
                    "INSERT INTO events (connection_id, time, kind, data) VALUES ($1, $2, $3, $4)",
                    [(cid, time, kind, _dumps(dict(data))) for cid, kind, data in events],
                )
            except ForeignKeyViolation:
                raise NotFoundError("a connection of these events was not found") from None
            # Each log keeps its newest N, as add_event does, once per connection.
            await tx.executemany(
                "DELETE FROM events WHERE connection_id = $1 AND id <= (SELECT id FROM events"
                " WHERE connection_id = $1 ORDER BY id DESC LIMIT 1 OFFSET $2)",
                [(cid, self._max_events) for cid in dict.fromkeys(e[0] for e in events)],
            )

    async def _insert_event(
        self, tx: Conn, connection_id: str, time: datetime, kind: str, encoded: str
    ) -> int:
        try:
            event_id = await tx.fetchval(
                "INSERT INTO events (connection_id, time, kind, data)"
                " VALUES ($1, $2, $3, $4) RETURNING id",
                connection_id,
                time,
                kind,
                encoded,
            )
        except ForeignKeyViolation:
            raise NotFoundError(f"connection {connection_id!r} not found") from None
        # Keep the newest N: one index range walk, and nothing deleted most of the time.
        await tx.execute(
            "DELETE FROM events WHERE connection_id = $1 AND id <= (SELECT id FROM events"
            " WHERE connection_id = $1 ORDER BY id DESC LIMIT 1 OFFSET $2)",
            connection_id,
            self._max_events,
        )
        return int(event_id)

    async def list_events(
        self, connection_id: str, offset: int = 0, limit: int = 100
    ) -> tuple[list[Event], int]:
        check_page(offset, limit)
        async with self._db.snapshot() as conn:
            if (
                await conn.fetchval("SELECT 1 FROM connections WHERE id = $1", connection_id)
                is None
            ):
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
        events = [
            Event(int(row[0]), connection_id, timestamp(row[1]), row[2], orjson.loads(row[3]))
            for row in rows
        ]
        return events, int(total)

    # -- alarms

    async def add_uplink_counts(self, counts: Mapping[tuple[str, int], int]) -> None:
        if not counts:
            return
        async with self._db.transaction() as tx:
            await tx.executemany(
                "INSERT INTO uplink_counts (connection_id, minute, count)"
                " SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM connections WHERE id = $1)"
                " ON CONFLICT (connection_id, minute)"
                " DO UPDATE SET count = uplink_counts.count + excluded.count",
                [(cid, minute, n) for (cid, minute), n in counts.items()],
            )

    async def uplink_count(self, connection_id: str, first_minute: int, last_minute: int) -> int:
        async with self._db.connection() as conn:
            value = await conn.fetchval(
                "SELECT coalesce(sum(count), 0) FROM uplink_counts"
                " WHERE connection_id = $1 AND minute BETWEEN $2 AND $3",
                connection_id,
                first_minute,
                last_minute,
            )
        return int(value)

    async def prune_uplink_counts(self, before_minute: int) -> None:
        async with self._db.transaction() as tx:
            await tx.execute("DELETE FROM uplink_counts WHERE minute < $1", before_minute)

    async def alarm_states(self) -> list[AlarmState]:
        async with self._db.connection() as conn:
            rows = await conn.fetch(
                "SELECT connection_id, alarm, fingerprint, active, since, rate, window_start,"
                " window_end FROM alarm_states ORDER BY connection_id, alarm"
            )
        return [
            AlarmState(
                r[0],
                int(r[1]),
                r[2],
                bool(r[3]),
                timestamp(r[4]),
                float(r[5]),
                _optional_time(r[6]),
                _optional_time(r[7]),
            )
            for r in rows
        ]

    async def set_alarm_state(
        self,
        state: AlarmState,
        *,
        expect_active: bool,
        event: tuple[str, Mapping[str, Any]] | None = None,
    ) -> bool:
        # The alarm's own lock serialises the instances, even while it has no row.
        async with self._db.transaction(lock=(state.connection_id, state.alarm)) as tx:
            row = await tx.fetchrow(
                "SELECT fingerprint, active FROM alarm_states"
                " WHERE connection_id = $1 AND alarm = $2",
                state.connection_id,
                state.alarm,
            )
            current = bool(row and row[0] == state.fingerprint and row[1])
            if current != expect_active:
                return False
            try:
                await tx.execute(
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
            except ForeignKeyViolation:
                raise NotFoundError(f"connection {state.connection_id!r} not found") from None
            if event is not None:
                kind, data = event
                await self._insert_event(tx, state.connection_id, _now(), kind, _dumps(dict(data)))
        return True

    # -- device sources

    async def remember_device_sources(
        self, sources: Sequence[tuple[str, str, Mapping[str, str]]]
    ) -> None:
        if not sources:
            return
        now = _now()
        # Not the write lock: it touches neither connections nor bindings, and two
        # instances writing the same device at once both write a true value.
        async with self._db.transaction() as tx:
            await tx.executemany(
                "INSERT INTO device_sources (dev_eui, format, source, updated_at)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (dev_eui) DO UPDATE SET"
                " format = excluded.format, source = excluded.source,"
                " updated_at = excluded.updated_at",
                [(dev_eui, fmt, _dumps(dict(source)), now) for dev_eui, fmt, source in sources],
            )

    async def device_source(self, dev_eui: str) -> tuple[str, dict[str, str]] | None:
        async with self._db.connection() as conn:
            row = await conn.fetchrow(
                "SELECT format, source FROM device_sources WHERE dev_eui = $1", dev_eui
            )
        if row is None:
            return None
        return load_device_source(row[0], orjson.loads(row[1]))

    # -- fleet

    async def publish_instance(
        self, instance: Instance, statistics: Mapping[str, Mapping[str, Any]]
    ) -> None:
        # Not routing: no change feed fires, and no lock (each instance writes its own rows).
        async with self._db.transaction() as tx:
            updated = await tx.execute(
                "UPDATE instances SET api_url = $2, version = $3, schema_version = $4,"
                " started_at = $5, seen_at = $6 WHERE id = $1",
                *_instance_row(instance),
            )
            if not updated:
                await tx.execute(
                    "INSERT INTO instances"
                    " (id, api_url, version, schema_version, started_at, seen_at)"
                    " VALUES ($1, $2, $3, $4, $5, $6)",
                    *_instance_row(instance),
                )
            await tx.execute("DELETE FROM instance_statistics WHERE instance_id = $1", instance.id)
            await tx.executemany(
                "INSERT INTO instance_statistics (instance_id, connection_id, document)"
                " VALUES ($1, $2, $3)",
                [(instance.id, cid, _dumps(dict(doc))) for cid, doc in statistics.items()],
            )

    async def list_instances(self) -> list[Instance]:
        async with self._db.connection() as conn:
            rows = await conn.fetch(
                "SELECT id, api_url, version, schema_version, started_at, seen_at"
                " FROM instances ORDER BY id"
            )
        return [
            Instance(row[0], row[1], row[2], int(row[3]), timestamp(row[4]), timestamp(row[5]))
            for row in rows
        ]

    async def instance_statistics(self) -> dict[str, dict[str, dict[str, Any]]]:
        async with self._db.connection() as conn:
            rows = await conn.fetch(
                "SELECT connection_id, instance_id, document FROM instance_statistics"
                " ORDER BY connection_id, instance_id"
            )
        result: dict[str, dict[str, dict[str, Any]]] = {}
        for connection_id, instance_id, document in rows:
            result.setdefault(connection_id, {})[instance_id] = orjson.loads(document)
        return result

    async def remove_instance(
        self, instance_id: str, *, seen_before: datetime | None = None
    ) -> bool:
        async with self._db.transaction() as tx:
            if seen_before is None:
                removed = await tx.execute("DELETE FROM instances WHERE id = $1", instance_id)
            else:
                removed = await tx.execute(
                    "DELETE FROM instances WHERE id = $1 AND seen_at < $2",
                    instance_id,
                    seen_before,
                )
        return removed > 0


def _instance_row(instance: Instance) -> tuple[Any, ...]:
    return (
        instance.id,
        instance.api_url,
        instance.version,
        instance.schema_version,
        instance.started_at,
        instance.seen_at,
    )


async def _check_writable(conn: Conn, connection_id: str) -> None:
    provisioned = await conn.fetchval(
        "SELECT provisioned FROM connections WHERE id = $1", connection_id
    )
    if provisioned is None:
        raise NotFoundError(f"connection {connection_id!r} not found")
    if provisioned:
        raise ConflictError(
            f"connection {connection_id!r} is provisioned by the config file and read-only"
        )


def _load_flow(flow_id: str, document: Any, provisioned: bool) -> Flow:
    # Stored documents were validated on the way in; a newer iotflow's may not be: the
    # error names the flow rather than failing the whole refresh with a bare traceback.
    try:
        return parse_flow(document, provisioned=provisioned)
    except ConfigError as exc:
        raise RegistryError(f"stored flow {flow_id!r} does not validate: {exc}") from None


async def _check_flow_connections(conn: Conn, flow: Flow) -> None:
    """Every connection a flow names exists, with the connector it says: 422 otherwise."""
    wanted = flow.connection_ids
    rows = await conn.fetch(
        f"SELECT id, document FROM connections WHERE id IN ({_marks(len(wanted))})", *wanted
    )
    connectors = {row[0]: orjson.loads(row[1]).get("connectorId") for row in rows}
    problems = []
    for i, c in enumerate(flow.connectors):
        if c.connectionId not in connectors:
            problems.append(Problem(f"connectors.{i}.connectionId", "no such connection"))
        elif c.id is not None and c.id != connectors[c.connectionId]:
            problems.append(
                Problem(
                    f"connectors.{i}.id",
                    f"the connection's connector is {connectors[c.connectionId]!r}",
                )
            )
    if problems:
        raise ConfigError(problems)


async def _link_flow(conn: Conn, flow: Flow) -> None:
    await conn.executemany(
        "INSERT INTO flow_connections (flow_id, connection_id) VALUES ($1, $2)",
        [(flow.id, cid) for cid in flow.connection_ids],
    )


async def _check_flow_writable(conn: Conn, flow_id: str) -> None:
    provisioned = await conn.fetchval("SELECT provisioned FROM flows WHERE id = $1", flow_id)
    if provisioned is None:
        raise NotFoundError(f"flow {flow_id!r} not found")
    if provisioned:
        raise ConflictError(f"flow {flow_id!r} is provisioned by the config file and read-only")
