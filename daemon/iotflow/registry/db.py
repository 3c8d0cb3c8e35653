"""One database interface over aiosqlite and asyncpg, so that the store's SQL is written once.

As in mautrix-python's `util/async_db`, the store speaks PostgreSQL's `$1` placeholders to a
`Database` (`execute`, `fetch`, `fetchrow`, `fetchval`, `transaction`), and each dialect
(`sqlite.py`, `postgres.py`) runs it. What differs between the two is decided there and
nowhere else: how placeholders and values are passed, how writers exclude one another
(SQLite: BEGIN IMMEDIATE on one connection; PostgreSQL: advisory locks), and how a change
reaches the other instances (SQLite: in-process; PostgreSQL: NOTIFY at commit, LISTEN).

Values: JSON goes in and out as text (jsonb in PostgreSQL, TEXT in SQLite), timestamps go
in as aware datetimes and come out as datetimes or ISO text (`timestamp()` reads both),
booleans come out as bool or 0/1.

Migrations are written once too, `migrations/NNNN_name.sql`, with the column types named
by the dialect (`{json}`, `{time}`, ...) and, where a clause exists in one dialect only,
`{sqlite:<text>}` or `{postgresql:<text>}`.
"""

from __future__ import annotations

import re
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any, ClassVar, Literal, Protocol, TypeAlias

from iotflow.errors import RegistryError
from iotflow.registry.store import ChangeFeed

__all__ = [
    "SCHEMA_MIGRATIONS",
    "Conn",
    "Database",
    "Dialect",
    "ForeignKeyViolation",
    "Lock",
    "Migration",
    "Row",
    "Tx",
    "load_migrations",
    "render",
    "timestamp",
]

Dialect = Literal["sqlite", "postgresql"]
Row: TypeAlias = tuple[Any, ...]
# What a transaction excludes in PostgreSQL, as an advisory lock until commit: a fixed key,
# or (text, number) for one of many objects. SQLite's write transactions exclude each other.
Lock: TypeAlias = int | tuple[str, int]


class ForeignKeyViolation(RegistryError):
    """A row refers to one that does not exist (say, an event of a deleted connection)."""


class Conn(Protocol):
    """One connection: SQL with `$1`... placeholders, rows as tuples."""

    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; the number of rows it wrote."""
        ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def fetchrow(self, sql: str, *args: Any) -> Row | None: ...

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """The first column of the first row; None when there is no row."""
        ...


class Tx(Conn, Protocol):
    """A connection inside a transaction. A write that changes connections or bindings sets
    `changed`: every change feed fires once the transaction commits (and not if it fails)."""

    changed: bool


class Database(ABC):
    """A registry database of one dialect; nothing is opened until first used."""

    dialect: ClassVar[Dialect]

    @abstractmethod
    def connection(self) -> AbstractAsyncContextManager[Conn]:
        """A connection for reads, each statement on its own."""

    @abstractmethod
    def snapshot(self) -> AbstractAsyncContextManager[Conn]:
        """Reads that must agree with each other (a total and its page)."""

    @abstractmethod
    def transaction(self, *, lock: Lock | None = None) -> AbstractAsyncContextManager[Tx]:
        """A write transaction: committed when the block ends, rolled back if it raises."""

    @abstractmethod
    def changes(self) -> ChangeFeed:
        """Subscribe to changes of connections and bindings, by any writer."""

    @abstractmethod
    async def close(self) -> None:
        """Release the database; every change feed ends, later uses raise RegistryError."""


def timestamp(value: datetime | str) -> datetime:
    """A stored timestamp: PostgreSQL gives a datetime, SQLite the ISO text it was given."""
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


# -- migrations

# Column types and literals, by dialect. SQLite's are those of the first migrations' files
# (upper case), so that a new database is the same as one those files created.
_TYPES: dict[Dialect, dict[str, str]] = {
    "sqlite": {
        "key": "TEXT",
        "text": "TEXT",
        "json": "TEXT",
        "time": "TEXT",
        "bool": "INTEGER",
        "false": "0",
        "int": "INTEGER",
        "bigint": "INTEGER",
        "real": "REAL",
    },
    "postgresql": {
        # Identifiers in byte order, whatever the database's locale, as SQLite sorts them.
        "key": 'text COLLATE "C"',
        "text": "text",
        "json": "jsonb",
        "time": "timestamptz",
        "bool": "boolean",
        "false": "false",
        "int": "integer",
        "bigint": "bigint",
        "real": "double precision",
    },
}
_ONLY = re.compile(r"\{(sqlite|postgresql):([^{}]*)\}")
_TYPE = re.compile(r"\{([a-z]+)\}")

# The table of applied migrations (as the first version of iotflow made it).
SCHEMA_MIGRATIONS = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " version {int} PRIMARY KEY, name {text} NOT NULL,"
    " applied_at {time} NOT NULL{postgresql: DEFAULT now()})"
)


def render(sql: str, dialect: Dialect) -> str:
    """Migration SQL for one dialect: its types, and its clauses only."""
    types = _TYPES[dialect]
    sql = _ONLY.sub(lambda m: m.group(2) if m.group(1) == dialect else "", sql)

    def typed(match: re.Match[str]) -> str:
        try:
            return types[match.group(1)]
        except KeyError:
            raise RegistryError(f"unknown type {match.group(0)} in a migration") from None

    return _TYPE.sub(typed, sql)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str  # of one dialect
    # The oldest schema version whose code keeps working once this one is applied: its own
    # version, unless the file says `-- compatible-with: N` (additive changes only).
    oldest_reader: int

    def statements(self) -> list[str]:
        """The SQL split into statements, run one at a time inside the transaction."""
        result: list[str] = []
        current = ""
        for line in self.sql.splitlines(keepends=True):
            current += line
            # complete_statement knows about quotes and triggers; a split on ";" would not.
            if sqlite3.complete_statement(current):
                result.append(current.strip())
                current = ""
        if current.strip() and not _only_comments(current):
            raise RegistryError(f"migration {self.version} ends with an incomplete statement")
        return result


_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_COMPATIBLE = re.compile(r"^-- compatible-with: (\d+)$", re.MULTILINE)


def _only_comments(sql: str) -> bool:
    return all(not line.strip() or line.strip().startswith("--") for line in sql.splitlines())


def load_migrations(dialect: Dialect) -> list[Migration]:
    """The numbered migrations (`migrations/NNNN_name.sql`, package data), in order, as SQL
    of `dialect`. The version numbers are those of the schema_migrations table."""
    folder = resources.files("iotflow.registry").joinpath("migrations")
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            text = entry.read_text("utf-8")
            version = int(match.group(1))
            compatible = _COMPATIBLE.search(text)
            oldest = int(compatible.group(1)) if compatible else version
            found.append(Migration(version, match.group(2), render(text, dialect), oldest))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RegistryError(f"migrations are not numbered 1..n: {versions}")
    return found
