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
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Any, ClassVar, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from iotflow.backoff import Backoff
from iotflow.errors import RegistryError
from iotflow.registry.db import Conn, Database, Dialect, ForeignKeyViolation, Lock, Row, Tx
from iotflow.registry.sql import SqlStore
from iotflow.registry.store import DEFAULT_MAX_EVENTS, ChangeFeed, ChangeHub
from iotflow.telemetry.logging import get_logger

__all__ = ["CHANNEL", "LISTENER_NAME", "PostgresDatabase", "PostgresStore"]

log = get_logger("iotflow.registry")

CHANNEL = "iotflow_registry"
LISTENER_NAME = "iotflow-registry-listener"  # application_name, to find it in pg_stat_activity

_DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)

_Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"


@contextmanager
def _errors() -> Iterator[None]:
    """Failures of the database itself, as the registry's error type."""
    try:
        yield
    except asyncpg.ForeignKeyViolationError as exc:
        raise ForeignKeyViolation(f"registry database error: {exc}") from exc
    except _DB_ERRORS as exc:
        raise RegistryError(f"registry database error: {exc}") from exc


def _rowcount(status: str) -> int:
    # The command tag: "INSERT 0 1", "UPDATE 2", "DELETE 0".
    last = status.rpartition(" ")[2]
    return int(last) if last.isdigit() else 0


class _Conn:
    """The Conn (and Tx) interface on an asyncpg connection."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.changed = False

    async def execute(self, sql: str, *args: Any) -> int:
        with _errors():
            return _rowcount(await self._conn.execute(sql, *args))

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if rows:
            with _errors():
                await self._conn.executemany(sql, rows)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        with _errors():
            return [tuple(row) for row in await self._conn.fetch(sql, *args)]

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        with _errors():
            row = await self._conn.fetchrow(sql, *args)
        return None if row is None else tuple(row)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        with _errors():
            return await self._conn.fetchval(sql, *args)


class PostgresDatabase(Database):
    dialect: ClassVar[Dialect] = "postgresql"

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        keepalive: float = 30.0,
        retry_max: float = 30.0,
    ) -> None:
        self._dsn = dsn
        self._min_size = min_size
        self._max_size = max_size
        self._keepalive = keepalive
        self._retry_max = retry_max
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._pool_lock = asyncio.Lock()
        self._token = uuid.uuid4().hex  # tells this store's notifications from the others'
        self._hub = ChangeHub(ready=False)  # ready once LISTEN is in place
        self._listener: asyncio.Task[None] | None = None
        self._closed = False

    async def _get_pool(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._closed:
            raise RegistryError("registry is closed")
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self._dsn, min_size=self._min_size, max_size=self._max_size
                    )
        return self._pool

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        with _errors():
            pool = await self._get_pool()
            async with pool.acquire() as conn:
                yield _Conn(conn)

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[Conn]:
        with _errors():
            pool = await self._get_pool()
            async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
                yield _Conn(conn)

    @asynccontextmanager
    async def _transaction(self, lock: Lock | None) -> AsyncIterator[_Conn]:
        with _errors():
            pool = await self._get_pool()
            async with pool.acquire() as conn, conn.transaction():
                if isinstance(lock, int):
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", lock)
                elif lock is not None:
                    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1), $2)", *lock)
                tx = _Conn(conn)
                yield tx
                if tx.changed:
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, self._token)
        if tx.changed:
            self._hub.notify()

    def transaction(self, *, lock: Lock | None = None) -> AbstractAsyncContextManager[Tx]:
        return self._transaction(lock)

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
        # Jittered: the instances of a fleet lose the database together, and should not all
        # come back in the same instant.
        backoff = Backoff(initial=0.5, cap=max(self._retry_max, 0.5), jitter="equal")
        while True:
            try:
                conn: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(
                    self._dsn, server_settings={"application_name": LISTENER_NAME}
                )
            except _DB_ERRORS as exc:
                delay = backoff.next()
                log.warning("Registry change feed cannot connect", error=str(exc), retry_in=delay)
            else:
                try:
                    await self._serve(conn)
                    backoff.reset()  # it worked for a while: reconnect at once
                    continue
                except _DB_ERRORS as exc:
                    delay = backoff.next()
                    log.warning("Registry change feed failed", error=str(exc), retry_in=delay)
                finally:
                    self._hub.set_ready(False)
                    if not conn.is_closed():
                        conn.terminate()  # synchronous: safe while being cancelled
            await asyncio.sleep(delay)

    async def _serve(self, conn: asyncpg.Connection[asyncpg.Record]) -> None:
        """LISTEN on `conn` and return when it is lost."""
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        await conn.add_listener(CHANNEL, self._on_notification)
        self._hub.set_ready(True)
        log.info("Registry change feed listening")
        while not lost.is_set():
            try:
                await asyncio.wait_for(lost.wait(), self._keepalive)
            except TimeoutError:
                # A server that vanished without closing the socket is only noticed when
                # we talk to it.
                await asyncio.wait_for(conn.execute("SELECT 1"), self._keepalive)
        log.warning("Registry change feed lost its connection; reconnecting")

    def _on_notification(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        if payload != self._token:  # our own writes fired the feeds at commit already
            self._hub.notify()


class PostgresStore(SqlStore):
    """The registry in PostgreSQL; see iotflow.registry.store.Store for the contract."""

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
        super().__init__(
            PostgresDatabase(
                dsn,
                min_size=min_size,
                max_size=max_size,
                keepalive=keepalive,
                retry_max=retry_max,
            ),
            max_events_per_connection=max_events_per_connection,
        )
