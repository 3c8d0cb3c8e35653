"""The registry: connections, device bindings and event logs, in SQLite or PostgreSQL.

One store (`sql.SqlStore`) over a database of either dialect (`db.Database`);
`SqliteStore` and `PostgresStore` are that store on each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from iotflow.errors import ConfigError, Problem
from iotflow.registry.sqlite import MEMORY, SqliteStore
from iotflow.registry.store import (
    AlarmState,
    ChangeFeed,
    DeviceBinding,
    Event,
    Instance,
    Reconciled,
    Store,
)

if TYPE_CHECKING:
    from iotflow.config.model import Config
    from iotflow.registry.postgres import PostgresStore

__all__ = [
    "AlarmState",
    "ChangeFeed",
    "DeviceBinding",
    "Event",
    "Instance",
    "PostgresStore",
    "Reconciled",
    "SqliteStore",
    "Store",
    "open_registry",
    "open_store",
    "sqlite_path",
]


def __getattr__(name: str) -> Any:
    # PostgreSQL's driver is imported when asked for: a SQLite registry never loads it
    # (60 ms of CPU at every start, issue #16).
    if name == "PostgresStore":
        from iotflow.registry.postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def sqlite_path(url: str) -> str:
    """The file of a `sqlite:` URL, as SQLAlchemy reads it.

    `sqlite:///var/registry.db` is relative to the working directory (three slashes),
    `sqlite:////var/lib/iotflow/registry.db` is absolute (four); `sqlite://` and
    `sqlite:///:memory:` are an in-memory database.
    """
    rest = url.removeprefix("sqlite://")
    if rest in ("", "/", "/" + MEMORY):
        return MEMORY
    if not rest.startswith("/"):
        raise ConfigError(
            [
                Problem(
                    "registry.url", "expected sqlite:///relative/path or sqlite:////absolute/path"
                )
            ]
        )
    return rest[1:]


def open_store(url: str, **kw: Any) -> Store:
    """The store for a registry URL; nothing is opened until its first use (`migrate`).

    Keyword arguments go to the store's constructor (`max_events_per_connection`, ...).
    """
    scheme = url.partition(":")[0].lower()
    if scheme == "sqlite":
        return SqliteStore(sqlite_path(url), **kw)
    if scheme in ("postgresql", "postgres"):
        from iotflow.registry.postgres import PostgresStore

        return PostgresStore(url, **kw)
    raise ConfigError(
        [Problem("registry.url", f"unsupported scheme {scheme!r}; use sqlite: or postgresql:")]
    )


def open_registry(config: Config) -> Store:
    """The daemon's registry, as its config file says (URL, event log bound)."""
    return open_store(
        config.registry.url, max_events_per_connection=config.events.max_per_connection
    )
