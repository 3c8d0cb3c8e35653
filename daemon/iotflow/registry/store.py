"""The registry's contract: the Store protocol, kept in SQLite or PostgreSQL by one store
(iotflow.registry.sql) over a database of either dialect (iotflow.registry.db).

The records it returns live here too, with how a stored document becomes a Connection
again, the reconcile plan, and the change feed that tells the routing index to rebuild.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from iotflow.connectors.connection import Connection, parse_connection, quarantined
from iotflow.errors import ConfigError
from iotflow.telemetry.logging import get_logger

if TYPE_CHECKING:
    # Only the shape is used; importing at run time would tie the registry to the config loader.
    from iotflow.config.load import Provisioned
    from iotflow.flows.model import Flow

__all__ = [
    "DEFAULT_MAX_EVENTS",
    "ChangeFeed",
    "ChangeHub",
    "DeviceBinding",
    "Event",
    "Instance",
    "Reconciled",
    "Store",
    "load_connection",
    "load_connections",
]

DEFAULT_MAX_EVENTS = 1000

log = get_logger("iotflow.registry")


@dataclass(frozen=True, slots=True)
class DeviceBinding:
    """A device and every connection it is bound to (ids in order)."""

    dev_eui: str
    connections: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of a connection's event log."""

    id: int
    connection_id: str
    time: datetime
    kind: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AlarmState:
    """Whether an alarm of a connection is raised, since when, and why."""

    connection_id: str
    alarm: int  # index in the connection's alarms
    fingerprint: str  # of the alarm's definition
    active: bool
    since: datetime
    rate: float
    window_start: datetime | None = None
    window_end: datetime | None = None


@dataclass(frozen=True, slots=True)
class Instance:
    """One daemon of a fleet sharing the registry, as its last heartbeat left it."""

    id: str
    api_url: str | None
    version: str
    schema_version: int
    started_at: datetime
    seen_at: datetime


@dataclass(frozen=True, slots=True)
class Reconciled:
    """What a reconciliation with the config file did, by connection id (each list sorted).

    `replaced` are connections created through the API whose id the config file now claims:
    they were overwritten by the file's definition, which an operator should hear about.
    """

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed or self.replaced)


class Store(Protocol):
    """Connections, device bindings, event logs, alarm state and the network servers of
    devices, in SQLite or PostgreSQL.

    Errors: NotFoundError and ConflictError as documented per method; any failure of the
    database itself is a RegistryError. DevEUIs are expected normalised (16 upper-case hex).
    """

    async def migrate(self) -> int:
        """Apply pending migrations; return the schema version. Idempotent, race-safe."""
        ...

    async def ping(self) -> None:
        """Raise RegistryError unless the database answers (readiness)."""
        ...

    async def close(self) -> None:
        """Release the database; every change feed ends."""
        ...

    async def list_connections(self) -> list[Connection]:
        """Every connection, ordered by id."""
        ...

    async def get_connection(self, connection_id: str) -> Connection:
        """NotFoundError when there is no such connection."""
        ...

    async def create_connection(self, connection: Connection) -> Connection:
        """ConflictError when the id is taken."""
        ...

    async def replace_connection(self, connection: Connection) -> Connection:
        """Replace the connection of the same id, keeping its creation time.

        NotFoundError when there is none; ConflictError when it is provisioned (read-only).
        """
        ...

    async def delete_connection(self, connection_id: str) -> None:
        """Delete a connection with its device bindings and events.

        NotFoundError when there is none; ConflictError when it is provisioned (read-only)
        or when flows name it (they would silently stop routing to it: change them first).
        """
        ...

    async def reconcile_provisioned(self, items: Sequence[Provisioned]) -> Reconciled:
        """Make the provisioned connections, and their devices, those of the config file."""
        ...

    async def list_flows(self) -> list[Flow]:
        """Every flow, by id."""
        ...

    async def get_flow(self, flow_id: str) -> Flow:
        """NotFoundError when there is none."""
        ...

    async def create_flow(self, flow: Flow) -> Flow:
        """ConflictError on a duplicate id; ConfigError (key paths) when a connection it
        names does not exist or has another connector than its `id` says."""
        ...

    async def replace_flow(self, flow: Flow) -> Flow:
        """NotFoundError, ConflictError when provisioned, ConfigError as `create_flow`."""
        ...

    async def delete_flow(self, flow_id: str) -> None:
        """NotFoundError, ConflictError when provisioned."""
        ...

    async def reconcile_flows(self, flows: Sequence[Flow]) -> Reconciled:
        """Make the provisioned flows those of the config file (after the connections)."""
        ...

    async def get_device(self, dev_eui: str) -> list[str]:
        """The ids of the connections a device is bound to; NotFoundError if none."""
        ...

    async def set_device(self, dev_eui: str, connection_ids: Sequence[str]) -> None:
        """Replace a device's bindings (empty: unbind); NotFoundError names an unknown id."""
        ...

    async def delete_device(self, dev_eui: str) -> None:
        """Unbind a device; NotFoundError when it has no binding."""
        ...

    async def list_devices(
        self, connection_id: str | None = None, offset: int = 0, limit: int = 100
    ) -> tuple[list[DeviceBinding], int]:
        """Bound devices by DevEUI (only those bound to `connection_id` if given), and their
        total count. A device lists all its connections, even when filtered; an unknown
        `connection_id` gives none."""
        ...

    async def bindings(self) -> dict[str, list[str]]:
        """Every binding: DevEUI to connection ids (for the routing index)."""
        ...

    async def add_event(self, connection_id: str, kind: str, data: Mapping[str, Any]) -> Event:
        """Append to a connection's event log, keeping only the newest events."""
        ...

    async def add_events(self, events: Sequence[tuple[str, str, Mapping[str, Any]]]) -> None:
        """Append (connection id, kind, data) events in one transaction, as `add_event`
        does each; all or none: NotFoundError if a connection does not exist."""
        ...

    async def list_events(
        self, connection_id: str, offset: int = 0, limit: int = 100
    ) -> tuple[list[Event], int]:
        """A connection's events, newest first, and their total; NotFoundError if no such
        connection."""
        ...

    async def add_uplink_counts(self, counts: Mapping[tuple[str, int], int]) -> None:
        """Add uplinks counted per (connection id, minute since the epoch); counts of
        connections that no longer exist are ignored."""
        ...

    async def uplink_count(self, connection_id: str, first_minute: int, last_minute: int) -> int:
        """Uplinks of a connection in the minutes [first_minute, last_minute]."""
        ...

    async def prune_uplink_counts(self, before_minute: int) -> None:
        """Forget the counts of minutes before `before_minute`."""
        ...

    async def alarm_states(self) -> list[AlarmState]:
        """Every stored alarm state."""
        ...

    async def set_alarm_state(
        self,
        state: AlarmState,
        *,
        expect_active: bool,
        event: tuple[str, Mapping[str, Any]] | None = None,
    ) -> bool:
        """Store `state` if the alarm's stored state is `expect_active` (no row, or a row of
        another fingerprint, counts as not active); False, and nothing written, otherwise.
        This compare-and-set is what lets several instances evaluate one alarm: only the
        one whose write succeeds announces the raise or the clear. `event` (kind, data) is
        added to the connection's log in the same transaction: an instance killed right
        after the change cannot take its event with it."""
        ...

    async def remember_device_sources(
        self, sources: Sequence[tuple[str, str, Mapping[str, str]]]
    ) -> None:
        """Store the network server of devices' latest uplinks, (DevEUI, input format, that
        server's identifiers of the device) each (for downlinks), replacing what was stored;
        all in one transaction."""
        ...

    async def device_source(self, dev_eui: str) -> tuple[str, dict[str, str]] | None:
        """The input format and identifiers last stored for a device; None if none were."""
        ...

    async def publish_instance(
        self, instance: Instance, statistics: Mapping[str, Mapping[str, Any]]
    ) -> None:
        """Store an instance's heartbeat (inserted or replaced) and its statistics by
        connection id, replacing those it published before."""
        ...

    async def list_instances(self) -> list[Instance]:
        """Every instance that published a heartbeat and was not removed, by id."""
        ...

    async def instance_statistics(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The statistics every instance last published: by connection id, then instance id."""
        ...

    async def remove_instance(
        self, instance_id: str, *, seen_before: datetime | None = None
    ) -> bool:
        """Forget an instance and its statistics (only if its last heartbeat is older than
        `seen_before`, when given); whether there was one to forget."""
        ...

    def changes(self) -> ChangeFeed:
        """Subscribe to changes of connections and bindings (see ChangeFeed)."""
        ...


class ChangeFeed:
    """One subscriber's view of registry changes, as an async iterator of None.

    Each yield means "reload connections and bindings now". The first one comes as soon as
    the feed observes every writer (at once for SQLite; for PostgreSQL once LISTEN is in
    place), so a consumer builds its first index inside the loop and misses nothing:

        with store.changes() as feed:
            async for _ in feed:
                index = RoutingIndex(await store.list_connections(), await store.bindings())

    Changes coalesce: any number of them while the consumer is busy give one more yield,
    never zero. A feed subscribes when created (not at its first `__anext__`), and ends when
    closed or when its store closes.
    """

    def __init__(self, hub: ChangeHub) -> None:
        self._hub = hub
        self._pending = asyncio.Event()
        self._closed = False

    def __aiter__(self) -> ChangeFeed:
        return self

    async def __anext__(self) -> None:
        if not self._closed:
            await self._pending.wait()
        if self._closed:
            raise StopAsyncIteration
        # Cleared before the consumer reloads: a change during the reload sets it again.
        self._pending.clear()

    @property
    def pending(self) -> bool:
        """Whether a change is waiting, i.e. the next `__anext__` returns at once."""
        return self._pending.is_set() and not self._closed

    def close(self) -> None:
        self._closed = True
        self._pending.set()  # wake a waiting consumer so that its loop ends
        self._hub.discard(self)

    def __enter__(self) -> ChangeFeed:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _fire(self) -> None:
        self._pending.set()


class ChangeHub:
    """The set of feeds of one store. `ready` says whether changes are being observed."""

    def __init__(self, *, ready: bool) -> None:
        self._feeds: set[ChangeFeed] = set()
        self._ready = ready
        self._closed = False

    def subscribe(self) -> ChangeFeed:
        feed = ChangeFeed(self)
        if self._closed:
            feed.close()
        else:
            self._feeds.add(feed)
            if self._ready:
                feed._fire()
        return feed

    def discard(self, feed: ChangeFeed) -> None:
        self._feeds.discard(feed)

    def notify(self) -> None:
        for feed in self._feeds:
            feed._fire()

    def set_ready(self, ready: bool) -> None:
        """Observing (again): changes may have been missed meanwhile, so every feed fires."""
        self._ready = ready
        if ready:
            self.notify()

    def close(self) -> None:
        self._closed = True
        for feed in list(self._feeds):
            feed.close()


def load_connection(
    document: Mapping[str, Any], provisioned: bool, connection_id: str
) -> Connection:
    """A stored document as a Connection, validated again as at the edge.

    A document that the current validation refuses (stored by an older version, say) is a
    quarantined Connection carrying the problems as its `fault`: listed and shown like the
    others, taken out of service by the daemon, repaired or deleted through the API.
    """
    try:
        connection = parse_connection(document)
    except ConfigError as exc:
        reason = f"stored connection is not valid: {exc}"
        return quarantined(connection_id, document, reason, provisioned=provisioned)
    return connection.model_copy(update={"provisioned": provisioned})


@dataclass(slots=True)
class ReconcilePlan:
    """The writes that make the stored provisioned connections those of the config file."""

    inserts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    updates: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    rebind: dict[str, list[str]] = field(default_factory=dict)  # connection id -> devices
    deletes: list[str] = field(default_factory=list)
    result: Reconciled = field(default_factory=Reconciled)


def plan_reconcile(
    items: Sequence[Provisioned],
    stored: Mapping[str, tuple[Mapping[str, Any], bool]],
    bound: Mapping[str, set[str]],
) -> ReconcilePlan:
    """Compare the config file with what is stored, in one place for both databases.

    `stored` maps every connection id to its document and provisioned flag; `bound` maps
    each provisioned connection to its devices. Only the provisioned connections' own
    bindings are rewritten, so a device keeps its bindings to API-created connections.
    """
    plan = ReconcilePlan()
    wanted: set[str] = set()
    for item in items:
        connection_id = item.connection.id
        wanted.add(connection_id)
        document = item.connection.document(reveal=True)
        devices = set(item.devices)
        old = stored.get(connection_id)
        if old is None:
            plan.inserts.append((connection_id, document))
            plan.result.added.append(connection_id)
            if devices:
                plan.rebind[connection_id] = sorted(devices)
            continue
        old_document, was_provisioned = old
        if old_document != document or not was_provisioned:
            plan.updates.append((connection_id, document))
        old_devices = bound.get(connection_id, set()) if was_provisioned else None
        if old_devices != devices:
            # An API connection taken over by the file gets exactly the file's devices.
            plan.rebind[connection_id] = sorted(devices)
        if not was_provisioned:
            plan.result.replaced.append(connection_id)
        elif old_document != document or old_devices != devices:
            plan.result.changed.append(connection_id)
    for connection_id, (_, was_provisioned) in stored.items():
        if was_provisioned and connection_id not in wanted:
            plan.deletes.append(connection_id)
            plan.result.removed.append(connection_id)
    for ids in (plan.result.added, plan.result.changed, plan.result.removed, plan.result.replaced):
        ids.sort()
    return plan


def group_bindings(rows: Iterable[Sequence[str]]) -> list[DeviceBinding]:
    """(dev_eui, connection_id) rows ordered by dev_eui, as one DeviceBinding per device."""
    grouped: dict[str, list[str]] = {}
    for dev_eui, connection_id in rows:
        grouped.setdefault(dev_eui, []).append(connection_id)
    return [DeviceBinding(dev_eui, tuple(ids)) for dev_eui, ids in grouped.items()]


def load_connections(rows: Iterable[Sequence[Any]]) -> list[Connection]:
    """(id, document, provisioned) rows as Connections; invalid ones quarantined, not skipped.

    One row that the current validation refuses must not stop routing for all the others,
    nor vanish from the API where the operator can repair it.
    """
    return [
        load_connection(document, bool(provisioned), connection_id)
        for connection_id, document, provisioned in rows
    ]


def load_device_source(fmt: str, source: Any) -> tuple[str, dict[str, str]]:
    """A stored device source as the directory uses it (an object of strings)."""
    if not isinstance(source, dict):
        return fmt, {}
    return fmt, {str(k): str(v) for k, v in source.items() if v is not None}


def check_page(offset: int, limit: int) -> None:
    if offset < 0 or limit < 0:
        raise ValueError("offset and limit must not be negative")
