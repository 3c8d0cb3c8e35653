"""Flow matchers in the routing index: key, thing (tags), application, range; the union
with bindings once per connection; a flow's validity and driver on what it routes."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from iotflow.connectors.connection import Connection, parse_connection
from iotflow.flows import Flow, parse_flow
from iotflow.formats import decode
from iotflow.routing import RoutingIndex, Target


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


D1 = "0018B20000000B01"
D2 = "0018B20000000B02"
C = {cid: connection(cid) for cid in ("a", "b", "c")}


def flow(fid: str, matchers: list[dict[str, Any]], *connections: str, **extra: Any) -> Flow:
    return parse_flow(
        {
            "id": fid,
            "name": fid,
            "matchers": matchers,
            "connectors": [{"connectionId": c, **extra} for c in connections or ("a",)],
        }
    )


def index(*flows: Flow, bindings: dict[str, list[str]] | None = None) -> RoutingIndex:
    return RoutingIndex(C.values(), bindings or {}, flows)


def ids(targets: tuple[Target, ...]) -> list[str]:
    return [t.connection_id for t in targets]


def test_key_matcher_routes_its_device_only() -> None:
    i = index(flow("f", [{"type": "key", "key": "lora:0018b20000000b01"}]))
    assert ids(i.targets(D1)) == ["a"]
    assert i.targets(D2) == ()


def test_thing_matcher_needs_every_tag_and_ignores_case() -> None:
    i = index(flow("f", [{"type": "thing", "tags": ["Building=B1", "FLOOR"]}], "b"))
    assert ids(i.targets(D1, frozenset({"building=b1", "floor", "other"}))) == ["b"]
    assert i.targets(D1, frozenset({"building=b1"})) == ()
    assert i.targets(D1, frozenset()) == ()


def test_application_matcher() -> None:
    i = index(flow("f", [{"type": "application", "id": "Weather"}], "c"))
    assert ids(i.targets(D1, application="weather")) == ["c"]
    assert i.targets(D1, application="other") == ()


def test_range_matcher_is_inclusive_at_both_ends() -> None:
    i = index(flow("f", [{"type": "range", "from": "0018B20000000B01", "to": "0018B20000000B03"}]))
    assert ids(i.targets("0018B20000000B01")) == ["a"]
    assert ids(i.targets("0018B20000000B03")) == ["a"]
    assert i.targets("0018B20000000B00") == ()
    assert i.targets("0018B20000000B04") == ()


def test_one_flows_overlapping_ranges_route_it_throughout() -> None:
    f = flow(
        "f",
        [
            {"type": "range", "from": "0000000000000010", "to": "0000000000000030"},
            {"type": "range", "from": "0000000000000020", "to": "0000000000000025"},
        ],
    )
    i = index(f)
    for eui in (0x10, 0x20, 0x25, 0x26, 0x30):
        assert ids(i.targets(f"{eui:016X}")) == ["a"], eui
    assert i.targets(f"{0x31:016X}") == ()


def test_binding_and_flow_to_one_connection_deliver_once_with_the_flows_validity() -> None:
    i = index(
        flow("f", [{"type": "key", "key": D1}], "a", uplinkTimeValidity="72h"),
        bindings={D1: ["a", "b"]},
    )
    assert i.targets(D1) == (Target("a", None, 72 * 3600.0), Target("b"))


def test_two_flows_to_one_connection_deliver_once_lowest_id_wins() -> None:
    i = index(
        flow("z", [{"type": "key", "key": D1}], "a", uplinkTimeValidity="1h"),
        flow("m", [{"type": "thing", "tags": ["t"]}], "a", uplinkTimeValidity="2h"),
    )
    assert i.targets(D1, frozenset({"t"})) == (Target("a", None, 7200.0),)


def test_driver_is_carried_and_inactive_connections_are_skipped() -> None:
    inactive = connection("off", active=False)
    f = parse_flow(
        {
            "id": "f",
            "name": "f",
            "driver": {"id": "acme:sensor:1"},
            "matchers": [{"type": "key", "key": D1}],
            "connectors": [{"connectionId": "off"}, {"connectionId": "a"}],
        }
    )
    i = RoutingIndex([*C.values(), inactive], {}, [f])
    assert i.targets(D1) == (Target("a", "acme:sensor:1", None),)


def test_flows_to_unknown_connections_route_nothing() -> None:
    i = index(flow("f", [{"type": "key", "key": D1}], "gone"))
    assert i.targets(D1) == ()
    assert i.flow_count == 0


def test_tags_from_each_format() -> None:
    tp = decode(
        "actility",
        b'{"DevEUI_uplink": {"DevEUI": "0018B20000000B01", "Time": "2026-01-01T00:00:00Z",'
        b' "CustomerData": {"name": "x", "tags": ["Floor=1", "Hall"]}}}',
    )
    assert tp.tags == {"floor=1", "hall"}
    cs = decode(
        "chirpstack",
        b'{"deviceInfo": {"devEui": "0018b20000000b01", "applicationId": "App-1",'
        b' "tags": {"Floor": "1"}}, "time": "2026-01-01T00:00:00Z", "fPort": 1, "data": ""}',
    )
    assert cs.tags == {"floor", "floor=1"}
    assert cs.application == "app-1"
    named = decode(
        "chirpstack",
        b'{"deviceInfo": {"devEui": "0018b20000000b01", "applicationId": "x",'
        b' "applicationName": "Demo"}, "time": "2026-01-01T00:00:00Z", "fPort": 1, "data": ""}',
    )
    by_name = index(flow("n", [{"type": "application", "id": "DEMO"}], "c"))
    assert ids(
        by_name.targets(named.dev_eui, named.tags, named.application, named.application_name)
    ) == ["c"]
    tts = decode(
        "tts",
        b'{"end_device_ids": {"dev_eui": "0018B20000000B01", "device_id": "d",'
        b' "application_ids": {"application_id": "Weather"}},'
        b' "received_at": "2026-01-01T00:00:00Z", "uplink_message": {"f_port": 1}}',
    )
    assert tts.tags == {"application:weather"}
    assert tts.application == "weather"
    i = index(
        flow("cs", [{"type": "application", "id": "APP-1"}], "a"),
        flow("tts", [{"type": "thing", "tags": ["application:weather"]}], "b"),
    )
    assert ids(i.targets(cs.dev_eui, cs.tags, cs.application)) == ["a"]
    assert ids(i.targets(tts.dev_eui, tts.tags, tts.application)) == ["b"]


_TAGS = st.sampled_from(["t1", "t2", "t3", "t4"])
_EUIS = st.integers(0, 40)


@st.composite
def _flows(draw: st.DrawFn) -> list[Flow]:
    flows = []
    for n in range(draw(st.integers(0, 6))):
        matchers: list[dict[str, Any]] = []
        for _ in range(draw(st.integers(1, 3))):
            kind = draw(st.sampled_from(["key", "thing", "application", "range"]))
            if kind == "key":
                matchers.append({"type": "key", "key": f"{draw(_EUIS):016X}"})
            elif kind == "thing":
                matchers.append({"type": "thing", "tags": draw(st.lists(_TAGS, min_size=1))})
            elif kind == "application":
                matchers.append({"type": "application", "id": draw(st.sampled_from("xy"))})
            else:
                lo, hi = sorted((draw(_EUIS), draw(_EUIS)))
                matchers.append({"type": "range", "from": f"{lo:016X}", "to": f"{hi:016X}"})
        cids = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, unique=True))
        flows.append(flow(f"f{n}", matchers, *cids))
    return flows


@settings(max_examples=200, deadline=None)
@given(_flows(), _EUIS, st.frozensets(_TAGS), st.sampled_from([None, "x", "y"]))
def test_targets_equal_brute_force(
    flows: list[Flow], eui: int, tags: frozenset[str], app: str | None
) -> None:
    dev_eui = f"{eui:016X}"
    expected: set[str] = set()
    for f in flows:
        hit = False
        for m in f.matchers:
            d = m.model_dump(by_alias=True)
            if d["type"] == "key":
                hit |= d["key"] == f"lora:{dev_eui.lower()}"
            elif d["type"] == "thing":
                hit |= set(d["tags"]) <= tags
            elif d["type"] == "application":
                hit |= d["id"] == app
            else:
                hit |= int(d["from"], 16) <= eui <= int(d["to"], 16)
        if hit:
            expected |= set(f.connection_ids)
    got = ids(index(*flows).targets(dev_eui, tags, app))
    assert got == sorted(expected)
