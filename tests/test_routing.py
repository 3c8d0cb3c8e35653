"""The routing index: active connections only, unknown devices, and a brute-force oracle."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotflow.connectors.connection import Connection, parse_connection
from iotflow.routing import RoutingIndex

D1 = "0018B20000000B01"
D2 = "0018B20000000B02"


def connection(connection_id: str, *, active: bool = True) -> Connection:
    return parse_connection(
        {
            "id": connection_id,
            "name": "x",
            "connectorId": "actility-http-iot",
            "brand": "CAYENNE",
            "active": active,
            "configuration": {},
        }
    )


# Parsing is the slow part; the property test draws from a fixed pool instead.
POOL = {
    (i, active): connection(f"c{i}", active=active) for i in range(6) for active in (True, False)
}


def test_inactive_connections_are_not_routed() -> None:
    index = RoutingIndex(
        [connection("on"), connection("off", active=False)], {D1: ["on", "off"], D2: ["off"]}
    )
    assert index.route(D1) == ("on",)
    assert index.route(D2) == ()
    off = index.connection("off")
    assert off is not None
    assert off.active is False
    assert set(index.connections) == {"on", "off"}


def test_unknown_devices_and_connections() -> None:
    index = RoutingIndex([connection("c1")], {D1: ["c1", "deleted-meanwhile"]})
    assert index.route(D2) == ()
    assert index.route(D1) == ("c1",)
    assert index.connection("deleted-meanwhile") is None
    assert RoutingIndex().route(D1) == ()


def test_a_device_bound_to_three_connections_goes_to_three() -> None:
    index = RoutingIndex(
        [connection("c3"), connection("c1"), connection("c2")], {D1: ["c3", "c1", "c2"]}
    )
    assert index.route(D1) == ("c1", "c2", "c3")
    assert index.device_count == 1


def test_the_index_is_immutable() -> None:
    index = RoutingIndex([connection("c1")], {D1: ["c1"]})
    with pytest.raises(AttributeError):
        index._routes = {}
    with pytest.raises(TypeError):
        index.connections["c2"] = connection("c2")  # type: ignore[index]


dev_euis = st.sampled_from([f"0018B20000000B{i:02X}" for i in range(8)])


@given(
    active=st.dictionaries(st.integers(0, 5), st.booleans()),
    bindings=st.dictionaries(dev_euis, st.lists(st.sampled_from([f"c{i}" for i in range(8)]))),
)
def test_route_equals_brute_force(active: dict[int, bool], bindings: dict[str, list[str]]) -> None:
    connections = [POOL[(i, flag)] for i, flag in active.items()]
    index = RoutingIndex(connections, bindings)
    for dev_eui in [f"0018B20000000B{i:02X}" for i in range(8)]:
        expected = sorted(
            {c.id for c in connections if c.active and c.id in bindings.get(dev_eui, [])}
        )
        assert index.route(dev_eui) == tuple(expected)
