"""The routing index: DevEUI to the active connections bound to it, rebuilt whole on change."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from iotflow.connectors.connection import Connection

__all__ = ["RoutingIndex"]


class RoutingIndex:
    """An immutable snapshot of the registry, answering `route()` with one dict lookup.

    Built from the store's connections and bindings; a change builds a new index and swaps
    it in, so a reader never sees half an update. Bindings to ids that are not among the
    connections (deleted meanwhile) are ignored.
    """

    __slots__ = ("_connections", "_routes")

    _connections: Mapping[str, Connection]
    _routes: dict[str, tuple[str, ...]]

    def __init__(
        self,
        connections: Iterable[Connection] = (),
        bindings: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        by_id = {c.id: c for c in connections}
        active = {c.id for c in by_id.values() if c.active}
        routes: dict[str, tuple[str, ...]] = {}
        for dev_eui, ids in (bindings or {}).items():
            # Sorted and deduplicated: the same registry always gives the same order.
            routed = tuple(sorted({i for i in ids if i in active}))
            if routed:  # devices without an active connection are simply absent
                routes[dev_eui] = routed
        object.__setattr__(self, "_connections", MappingProxyType(by_id))
        object.__setattr__(self, "_routes", routes)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("RoutingIndex is immutable; build a new one")

    def route(self, dev_eui: str) -> tuple[str, ...]:
        """The ids of the active connections bound to a device; () when there are none."""
        return self._routes.get(dev_eui, ())

    def connection(self, connection_id: str) -> Connection | None:
        return self._connections.get(connection_id)

    @property
    def connections(self) -> Mapping[str, Connection]:
        """Every connection, active or not, by id (read-only)."""
        return self._connections

    @property
    def device_count(self) -> int:
        """How many devices have at least one active connection."""
        return len(self._routes)

    def __repr__(self) -> str:
        return f"RoutingIndex(connections={len(self._connections)}, devices={len(self._routes)})"
