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
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import aiosqlite
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_random_exponential

from iotflow.errors import RegistryError
from iotflow.registry.db import Conn, Database, Dialect, ForeignKeyViolation, Lock, Row, Tx
from iotflow.registry.sql import SqlStore
from iotflow.registry.store import DEFAULT_MAX_EVENTS, ChangeFeed, ChangeHub

__all__ = ["MEMORY", "SqliteDatabase", "SqliteStore"]

MEMORY = ":memory:"

_PLACEHOLDER = re.compile(r"\$(\d+)")


@lru_cache(maxsize=256)
def _sql(sql: str) -> str:
    # `?NNN` is SQLite's numbered parameter: `$1` used twice binds the same value twice.
    return _PLACEHOLDER.sub(r"?\1", sql)


def _value(value: Any) -> Any:
    # ISO text with microseconds: it sorts as the instants do, and fromisoformat reads it.
    if isinstance(value, datetime):
        return value.isoformat(timespec="microseconds")
    return value


def _args(args: Sequence[Any]) -> tuple[Any, ...]:
    for value in args:
        if isinstance(value, datetime):
            return tuple(_value(value) for value in args)
    # Most rows hold no time: kept as they are (100,000 bindings written at once, issue #16).
    return tuple(args)


def _locked(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)


@contextmanager
def _errors() -> Iterator[None]:
    """Failures of the database itself, as the registry's error type."""
    try:
        yield
    except sqlite3.IntegrityError as exc:
        if "FOREIGN KEY" in str(exc):
            raise ForeignKeyViolation(f"registry database error: {exc}") from exc
        raise RegistryError(f"registry database error: {exc}") from exc
    except (sqlite3.Error, OSError) as exc:
        raise RegistryError(f"registry database error: {exc}") from exc


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


class _Conn:
    """The Conn (and Tx) interface on the aiosqlite connection."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self.changed = False

    async def execute(self, sql: str, *args: Any) -> int:
        with _errors():
            async with self._db.execute(_sql(sql), _args(args)) as cursor:
                return cursor.rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with _errors():
            await self._db.executemany(_sql(sql), [_args(row) for row in rows])

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        with _errors():
            return [tuple(row) for row in await self._db.execute_fetchall(_sql(sql), _args(args))]

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchrow(sql, *args)
        return None if row is None else row[0]


class SqliteDatabase(Database):
    dialect: ClassVar[Dialect] = "sqlite"

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 5.0) -> None:
        self.path = os.fspath(path)
        self._busy_timeout_ms = int(busy_timeout * 1000)
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._hub = ChangeHub(ready=True)  # nobody else writes to this file
        self._closed = False

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
    async def connection(self) -> AsyncIterator[Conn]:
        async with self._lock:
            with _errors():
                yield _Conn(await self._connection())

    @asynccontextmanager
    async def _transaction(self, begin: str) -> AsyncIterator[_Conn]:
        async with self._lock:
            with _errors():
                db = await self._connection()
                await db.execute(begin)
                tx = _Conn(db)
                try:
                    yield tx
                except BaseException:
                    if db.in_transaction:
                        await db.execute("ROLLBACK")
                    raise
                await db.execute("COMMIT")
        if tx.changed:
            self._hub.notify()

    def snapshot(self) -> AbstractAsyncContextManager[Conn]:
        return self._transaction("BEGIN DEFERRED")

    def transaction(self, *, lock: Lock | None = None) -> AbstractAsyncContextManager[Tx]:
        # One writer at a time already, in this process and (by the file lock) in others.
        del lock
        return self._transaction("BEGIN IMMEDIATE")

    def changes(self) -> ChangeFeed:
        return self._hub.subscribe()

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
            self._hub.close()
            if self._db is not None:
                db, self._db = self._db, None
                with _errors():
                    await db.close()


class SqliteStore(SqlStore):
    """The registry in a SQLite file; see iotflow.registry.store.Store for the contract."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_events_per_connection: int = DEFAULT_MAX_EVENTS,
        busy_timeout: float = 5.0,
    ) -> None:
        self.path = os.fspath(path)
        super().__init__(
            SqliteDatabase(self.path, busy_timeout=busy_timeout),
            max_events_per_connection=max_events_per_connection,
        )
