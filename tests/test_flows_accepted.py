"""What flow validation accepts can be used (the pattern of test_accepted_is_usable.py):
any body `parse_flow` accepts is indexed by the router, routes the uplinks its matchers
describe, is stored, listed back unchanged, survives a restart of the store, and its
validity is a usable per-delivery value in the spool. Refused bodies get key paths.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from iotflow.connectors.connection import parse_connection
from iotflow.errors import ConfigError
from iotflow.flows import Flow, parse_flow
from iotflow.flows.model import KeyMatcher, RangeMatcher, ThingMatcher
from iotflow.registry import SqliteStore
from iotflow.routing import RoutingIndex
from iotflow.spool import Spool

PROPERTY = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

_TEXT = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=0, max_size=12
) | st.sampled_from(["", " ", "\x00", "Ä", "ǅ", "ß", "İ", "x" * 201])
_EUI = st.sampled_from(
    ["0018B20000000B20", "0018b20000000b20", "00-18-B2-00-00-00-0B-20", "FFFFFFFFFFFFFFFF"]
) | st.text("0123456789abcdefABCDEF-:", max_size=20)
_DURATION = st.sampled_from(["72h", "1s", "0s", "36500d", "36501d", "1ms", "1500ms", "x", 5])


def _matchers() -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        st.builds(lambda k: {"type": "key", "key": k}, _EUI | _EUI.map(lambda e: f"lora:{e}")),
        st.builds(lambda t: {"type": "thing", "tags": t}, st.lists(_TEXT, max_size=3)),
        st.builds(lambda a: {"type": "application", "id": a}, _TEXT),
        st.builds(lambda f, t: {"type": "range", "from": f, "to": t}, _EUI, _EUI),
        st.just({"type": "other"}),
    )


@st.composite
def bodies(draw: st.DrawFn) -> dict[str, Any]:
    # Mostly valid around the one field that varies: refusals teach little past the first.
    connector: dict[str, Any] = {"connectionId": draw(st.sampled_from(["c1"] * 8 + ["bad id", ""]))}
    if draw(st.booleans()):
        connector["uplinkTimeValidity"] = draw(_DURATION)
    body: dict[str, Any] = {
        "id": draw(st.sampled_from(["f1"] * 4 + ["F.1-x", "", "a" * 65])),
        "name": draw(st.sampled_from(["flow"] * 4) | _TEXT),
        "matchers": draw(
            st.lists(_matchers(), min_size=draw(st.sampled_from([1, 1, 1, 0])), max_size=3)
        ),
        "connectors": [connector],
    }
    if draw(st.booleans()):
        body["driver"] = {"id": draw(st.sampled_from(["actility:auto:1", "a:b", "x:y:z"]))}
    if draw(st.booleans()):
        body["description"] = draw(_TEXT)
    return body


async def check_usable(flow: Flow, directory: Path) -> None:
    connection = parse_connection(
        {
            "id": "c1",
            "name": "x",
            "connectorId": "actility-http-iot",
            "configuration": {"destinationURL": "http://127.0.0.1:9/"},
        }
    )
    index = RoutingIndex([connection], {}, [flow])
    for m in flow.matchers:
        # Each matcher routes what it describes, to the flow's connection.
        if isinstance(m, KeyMatcher):
            routed = index.targets(m.dev_eui)
        elif isinstance(m, ThingMatcher):
            routed = index.targets("0000000000000000", frozenset(m.tags))
        elif isinstance(m, RangeMatcher):
            routed = index.targets(m.to)
        else:
            routed = index.targets("0000000000000000", application=m.id)
        assert [t.connection_id for t in routed] == ["c1"], m
    url = directory / "registry.db"
    store = SqliteStore(str(url))
    spool = await Spool.open(directory / "spool.db")
    try:
        await store.migrate()
        await store.create_connection(connection)
        await store.create_flow(flow)
        assert await store.list_flows() == [flow]
        validity = flow.connectors[0].validity_seconds
        (appended,) = await spool.append(
            b"{}",
            dev_eui="0018B20000000B20",
            uplink_time=0.0,
            received_at=0.0,
            connection_ids=["c1"],
            validity={"c1": validity},
        )
        (loaded,) = await spool.load("c1")
        assert loaded.validity == appended.validity == validity
    finally:
        await store.close()
        await spool.close()
    restarted = SqliteStore(str(url))
    try:
        await restarted.migrate()
        assert await restarted.get_flow(flow.id) == flow
    finally:
        await restarted.close()


@PROPERTY
@given(body=bodies())
async def test_every_accepted_flow_routes_is_stored_and_survives_a_restart(
    body: dict[str, Any],
) -> None:
    try:
        flow = parse_flow(body)
    except ConfigError as exc:
        problems = exc.problems
    else:
        problems = []
    if problems:
        event("refused")
        assert all(p.path for p in problems)  # field errors, with their paths
        return
    event("accepted")
    # What is shown parses again to the same flow (the API's GET then PUT).
    assert parse_flow(flow.document()) == flow
    with tempfile.TemporaryDirectory() as directory:
        await check_usable(flow, Path(directory))
