"""The routing index: bindings and flows to the active connections, rebuilt whole on change.

Cost per uplink, whatever the number of bindings and flows: one dict lookup by DevEUI
(bindings and `key` matchers), one by application, one per tag of the uplink (each `thing`
matcher is filed under its rarest tag, then its other tags are checked), and a bisection of
the `range` matchers' elementary segments (O(log r) in the number of ranges; building them
costs O(r log r) plus the overlap: each segment holds the flows covering it).
"""

from __future__ import annotations

import functools
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import NamedTuple

from iotflow.connectors.connection import Connection
from iotflow.flows.model import (
    ApplicationMatcher,
    Flow,
    KeyMatcher,
    RangeMatcher,
    ThingMatcher,
)

__all__ = ["RoutingIndex", "Target"]


class Target(NamedTuple):
    """One delivery to make: the connection, the flow's driver and validity (None: none)."""

    connection_id: str
    driver_id: str | None = None
    validity: float | None = None  # seconds; None: the connection's own


# A flow, resolved: its targets on active connections, in its connectors' order.
_Routes = tuple[Target, ...]
# A flow and its position (flows sorted by id): the lowest position wins a connection.
_Entry = tuple[int, _Routes]


class RoutingIndex:
    """An immutable snapshot of the registry, answering `route()` with one dict lookup.

    Built from the store's connections and bindings; a change builds a new index and swaps
    it in, so a reader never sees half an update. Bindings to ids that are not among the
    connections (deleted meanwhile) are ignored.
    """

    __slots__ = (
        "_apps",
        "_connections",
        "_flow_count",
        "_keys",
        "_range_sets",
        "_range_starts",
        "_routes",
        "_tags",
    )

    _connections: Mapping[str, Connection]
    _routes: dict[str, tuple[str, ...]]
    _keys: dict[str, tuple[_Entry, ...]]
    _apps: dict[str, tuple[_Entry, ...]]
    _tags: dict[str, tuple[tuple[frozenset[str], _Entry], ...]]
    _range_starts: list[int]
    _range_sets: list[tuple[_Entry, ...]]
    _flow_count: int

    def __init__(
        self,
        connections: Iterable[Connection] = (),
        bindings: Mapping[str, Iterable[str]] | None = None,
        flows: Iterable[Flow] = (),
    ) -> None:
        by_id = {c.id: c for c in connections}
        active = {c.id for c in by_id.values() if c.active}
        routes: dict[str, tuple[str, ...]] = {}
        # Most devices share their connections with many others: one tuple each set, not
        # one a device (100,000 bindings to 1,000 connections: 1,000 tuples, not 100,000).
        shared: dict[tuple[str, ...], tuple[str, ...]] = {}
        alone = {cid: (cid,) for cid in active}  # the tuple of a device bound to one
        for dev_eui, ids in (bindings or {}).items():
            if isinstance(ids, (list, tuple)) and len(ids) == 1:
                # Most devices: no set, no sort, no new tuple (issue #16).
                one = alone.get(ids[0])
                if one is not None:
                    routes[dev_eui] = one
                continue
            # Sorted and deduplicated: the same registry always gives the same order.
            routed = tuple(sorted({i for i in ids if i in active}))
            if routed:  # devices without an active connection are simply absent
                routes[dev_eui] = shared.setdefault(routed, routed)
        object.__setattr__(self, "_connections", MappingProxyType(by_id))
        object.__setattr__(self, "_routes", routes)
        self._build_flows(sorted(flows, key=lambda f: f.id), active)

    def _build_flows(self, flows: list[Flow], active: set[str]) -> None:
        keys: dict[str, list[_Entry]] = {}
        apps: dict[str, list[_Entry]] = {}
        things: list[tuple[frozenset[str], _Entry]] = []
        ranges: list[tuple[int, int, _Entry]] = []
        count = 0
        for position, flow in enumerate(flows):
            driver = flow.driver.id if flow.driver is not None else None
            routes = tuple(
                Target(c.connectionId, driver, c.validity_seconds)
                for c in flow.connectors
                if c.connectionId in active
            )
            if not routes:
                continue  # every connection inactive or gone: the flow routes nothing
            count += 1
            entry = (position, routes)
            for m in flow.matchers:
                if isinstance(m, KeyMatcher):
                    keys.setdefault(m.dev_eui, []).append(entry)
                elif isinstance(m, ApplicationMatcher):
                    apps.setdefault(m.id, []).append(entry)
                elif isinstance(m, ThingMatcher):
                    things.append((frozenset(m.tags), entry))
                elif isinstance(m, RangeMatcher):
                    ranges.append((int(m.from_, 16), int(m.to, 16), entry))
        # Each thing matcher under its rarest tag: the fewest candidates to check per uplink.
        frequency = Counter(tag for tags, _ in things for tag in tags)
        tags: dict[str, list[tuple[frozenset[str], _Entry]]] = {}
        for required, entry in things:
            anchor = min(required, key=lambda t: (frequency[t], t))
            tags.setdefault(anchor, []).append((required, entry))
        starts, sets = _segments(ranges)
        object.__setattr__(self, "_keys", {k: tuple(v) for k, v in keys.items()})
        object.__setattr__(self, "_apps", {k: tuple(v) for k, v in apps.items()})
        object.__setattr__(self, "_tags", {k: tuple(v) for k, v in tags.items()})
        object.__setattr__(self, "_range_starts", starts)
        object.__setattr__(self, "_range_sets", sets)
        object.__setattr__(self, "_flow_count", count)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("RoutingIndex is immutable; build a new one")

    def route(self, dev_eui: str) -> tuple[str, ...]:
        """The ids of the active connections bound to a device; () when there are none."""
        return self._routes.get(dev_eui, ())

    def targets(
        self,
        dev_eui: str,
        tags: frozenset[str] = frozenset(),
        application: str | None = None,
        application_name: str | None = None,
    ) -> tuple[Target, ...]:
        """Where an uplink goes: bindings and matching flows, once per connection.

        A connection that a flow routes to takes that flow's driver and validity, even when
        a binding names it too; among several flows, the one with the lowest id wins.
        `tags` and `application` are folded (`formats.uplink.fold`), as Uplink holds them.
        """
        matched: list[_Entry] = []
        found = self._keys.get(dev_eui)
        if found:
            matched.extend(found)
        for app in (application, application_name):
            if app is not None:
                found = self._apps.get(app)
                if found:
                    matched.extend(found)
        if tags and self._tags:
            for tag in tags:
                candidates = self._tags.get(tag)
                if candidates:
                    matched.extend(entry for required, entry in candidates if required <= tags)
        if self._range_starts:
            i = bisect_right(self._range_starts, int(dev_eui, 16)) - 1
            if i >= 0:
                matched.extend(self._range_sets[i])
        bound = self._routes.get(dev_eui, ())
        if not matched:
            return _bound(bound)
        chosen: dict[str, Target] = {}
        for _, routes in sorted(matched, key=lambda e: e[0]):
            for target in routes:
                chosen.setdefault(target.connection_id, target)
        for cid in bound:
            chosen.setdefault(cid, Target(cid))
        return tuple(chosen[cid] for cid in sorted(chosen))

    @property
    def flow_count(self) -> int:
        """How many flows route to at least one active connection."""
        return self._flow_count

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
        return (
            f"RoutingIndex(connections={len(self._connections)}, devices={len(self._routes)},"
            f" flows={self._flow_count})"
        )


def _segments(ranges: list[tuple[int, int, _Entry]]) -> tuple[list[int], list[tuple[_Entry, ...]]]:
    """Elementary segments of the ranges: starts (sorted) and the flows covering each.

    Segment i covers [starts[i], starts[i + 1]); a DevEUI bisects to its segment.
    """
    if not ranges:
        return [], []
    bounds = sorted({lo for lo, _, _ in ranges} | {hi + 1 for _, hi, _ in ranges})
    opening: dict[int, list[_Entry]] = {}
    closing: dict[int, list[int]] = {}
    for lo, hi, entry in ranges:
        opening.setdefault(lo, []).append(entry)
        closing.setdefault(hi + 1, []).append(id(entry))
    # Counted, not a set: one flow's two overlapping ranges must both close before it leaves.
    live: Counter[int] = Counter()
    entries: dict[int, _Entry] = {}
    starts: list[int] = []
    sets: list[tuple[_Entry, ...]] = []
    for bound in bounds:
        for key in closing.get(bound, ()):
            live[key] -= 1
            if not live[key]:
                del live[key]
        for entry in opening.get(bound, ()):
            live[id(entry)] += 1
            entries[id(entry)] = entry
        starts.append(bound)
        sets.append(tuple(entries[key] for key in live))
    return starts, sets


@functools.lru_cache(maxsize=4096)
def _bound(connection_ids: tuple[str, ...]) -> tuple[Target, ...]:
    """The targets of a device's bindings alone. Devices share their tuple of connections
    (`RoutingIndex.__init__`): these are made once per tuple, not once per uplink."""
    return tuple(Target(cid) for cid in connection_ids)
