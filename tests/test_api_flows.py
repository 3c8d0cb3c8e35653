"""Flows over the API and the config file, against a running daemon (`iotflow run`), a
real broker and a local cloud: CRUD, validation, provisioned flows, and routing by them."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from support.clouds import FakeCloud
from support.daemon import DaemonProcess
from support.mosquitto import Mosquitto
from support.uplinks import TOPICS, chirpstack
from test_api import Api, publish

pytestmark = pytest.mark.slow

DEV = "0018B20000003001"
# A provisioned flow in the config file: ChirpStack devices tagged site=paris (the fixture's
# tag), any case, to the provisioned connection, with a validity of 30 days.
FLOWS_TOML = """
[[flows]]
id = "paris"
name = "Paris devices"
matchers = [{type = "thing", tags = ["Site=PARIS"]}]
connectors = [{id = "actility-http-iot", connectionId = "short", uplinkTimeValidity = "30d"}]
"""


@pytest.fixture
async def running(
    tmp_path: Path, mosquitto: Mosquitto, cloud: FakeCloud
) -> AsyncIterator[tuple[DaemonProcess, Api]]:
    daemon = DaemonProcess(
        tmp_path / "flows",
        broker_url=mosquitto.url,
        extra=FLOWS_TOML,
        connections=[
            {
                "id": "short",
                "name": "validity of one hour",
                "connectorId": "actility-http-iot",
                "brand": "CAYENNE",
                "devices": [DEV],
                "configuration": {
                    "destinationURL": cloud.url("/short"),
                    "uplinkTimeValidity": "1h",
                },
            },
            {
                "id": "other",
                "name": "another",
                "connectorId": "actility-http-iot",
                "brand": "CAYENNE",
                "configuration": {"destinationURL": cloud.url("/other")},
            },
        ],
    )
    await daemon.start()
    async with aiohttp.ClientSession() as session:
        yield daemon, Api(session, daemon.api)
    await daemon.close()


def cs_uplink(dev_eui: str, fcnt: int, *, tags: dict[str, str] | None = None, **kw: Any) -> Any:
    doc = chirpstack(dev_eui, fcnt, **kw)
    if tags is not None:
        doc["deviceInfo"]["tags"] = tags
    return TOPICS["chirpstack"].format(dev=dev_eui.lower()), orjson.dumps(doc)


def body(**extra: Any) -> dict[str, Any]:
    return {
        "name": "by key",
        "description": "one device",
        "driver": {"id": "actility:auto:1"},
        "matchers": [{"type": "key", "key": "lora:0018b20000003099"}],
        "connectors": [{"id": "actility-http-iot", "connectionId": "other"}],
        **extra,
    }


async def test_flow_crud_in_the_products_shape(running: tuple[DaemonProcess, Api]) -> None:
    _, api = running
    status, created, headers = await api.call("POST", "/flows", body())
    assert status == 201, created
    fid = created["id"]
    assert headers["Location"] == f"/iot-flow/v1/flows/{fid}"
    assert created == {**body(), "id": fid, "provisioned": False}
    status, got, _ = await api.call("GET", f"/flows/{fid}")
    assert (status, got) == (200, created)
    status, listed, headers = await api.call("GET", "/flows")
    assert [f["id"] for f in listed] == sorted([fid, "paris"])
    assert headers["X-Total"] == "2"
    got["matchers"] = [{"type": "application", "id": "Weather"}]
    status, replaced, _ = await api.call("PUT", f"/flows/{fid}", got)
    assert status == 200, replaced
    assert replaced["matchers"] == [{"type": "application", "id": "weather"}]
    status, _, _ = await api.call("DELETE", f"/flows/{fid}")
    assert status == 204
    status, _, _ = await api.call("GET", f"/flows/{fid}")
    assert status == 404


async def test_invalid_flows_are_refused_field_by_field(running: tuple[DaemonProcess, Api]) -> None:
    _, api = running
    cases: list[tuple[dict[str, Any], str]] = [
        (body(connectors=[{"connectionId": "nope"}]), "connectors.0.connectionId"),
        (body(connectors=[{"id": "aws-iot", "connectionId": "other"}]), "connectors.0.id"),
        (
            body(matchers=[{"type": "range", "from": "0000000000000009", "to": "01"}]),
            "matchers.0.range.to",
        ),
        (body(matchers=[]), "matchers"),
        (body(matchers=[{"type": "thing", "tags": [" "]}]), "matchers.0.thing.tags.0"),
        (body(connectors=[{"connectionId": "other", "uplinkTimeValidity": "0s"}]), ""),
        (body(bogus=1), "bogus"),
    ]
    for bad, path in cases:
        status, answer, _ = await api.call("POST", "/flows", bad)
        assert status == 422, (bad, answer)
        if path:
            assert path in [d["path"] for d in answer["details"]], answer
    status, listed, _ = await api.call("GET", "/flows")
    assert [f["id"] for f in listed] == ["paris"]  # nothing was created


async def test_provisioned_flows_are_read_only_and_connections_in_use_stay(
    running: tuple[DaemonProcess, Api],
) -> None:
    _, api = running
    status, paris, _ = await api.call("GET", "/flows/paris")
    assert status == 200
    assert paris["provisioned"] is True
    assert paris["matchers"] == [{"type": "thing", "tags": ["site=paris"]}]
    status, answer, _ = await api.call("PUT", "/flows/paris", paris)
    assert (status, answer["code"]) == (409, "read_only")
    status, answer, _ = await api.call("DELETE", "/flows/paris")
    assert status == 409
    # An API connection that a flow names cannot be deleted while the flow does.
    status, created, _ = await api.call(
        "POST",
        "/connections",
        {
            "id": "api-conn",
            "name": "x",
            "connectorId": "actility-http-iot",
            "configuration": {"destinationURL": "http://127.0.0.1:9/"},
        },
    )
    assert status == 201, created
    status, flow, _ = await api.call(
        "POST", "/flows", body(connectors=[{"connectionId": "api-conn"}])
    )
    assert status == 201
    status, answer, _ = await api.call("DELETE", "/connections/api-conn")
    assert status == 409
    assert flow["id"] in answer["message"]
    await api.call("DELETE", f"/flows/{flow['id']}")
    status, _, _ = await api.call("DELETE", "/connections/api-conn")
    assert status == 204


async def test_a_flow_by_tag_routes_chirpstack_and_its_validity_wins(
    running: tuple[DaemonProcess, Api], cloud: FakeCloud, mosquitto: Mosquitto
) -> None:
    daemon, api = running
    old = datetime.now(UTC) - timedelta(days=2)
    # DEV is bound to `short` (validity 1h) and tagged site=paris: the flow routes it too,
    # once, with its 30 days, so a two-day-old uplink is delivered, not expired.
    await publish(mosquitto, cs_uplink(DEV, 1, at=old))
    (first,) = await cloud.wait_for(1, path="/short")
    assert first.json["DevEUI_uplink"]["FCntUp"] == 1
    # Untagged and bound: the connection's own hour; the old uplink expires.
    await publish(mosquitto, cs_uplink(DEV, 2, tags={}, at=old))
    await daemon.wait_log(lambda e: e.get("event") == "Delivery expired")
    # An unbound device, tagged: routed by the flow alone.
    await publish(mosquitto, cs_uplink("0018B20000003002", 3, tags={"SITE": "Paris"}))
    await cloud.wait_for(2, path="/short")
    assert len(cloud.requests_to("/short")) == 2
    # A flow created through the API routes before the call returns.
    status, _, _ = await api.call(
        "POST",
        "/flows",
        body(
            matchers=[{"type": "application", "id": "17C82E96-BE03-4F38-AEF3-F83D48582D97"}],
            connectors=[{"connectionId": "other"}],
        ),
    )
    assert status == 201
    await publish(mosquitto, cs_uplink("0018B20000003003", 4, tags={}))
    (routed,) = await cloud.wait_for(1, path="/other")
    assert routed.json["DevEUI_uplink"]["FCntUp"] == 4


async def test_provisioned_flows_follow_the_config_file_on_sighup(
    running: tuple[DaemonProcess, Api],
) -> None:
    daemon, api = running
    text = daemon.config_path.read_text()
    daemon.write_config([], text.replace('tags = ["Site=PARIS"]', 'tags = ["site=lyon"]'))
    await daemon.signal(signal.SIGHUP)
    await daemon.wait_log(lambda e: e.get("event") == "Config reloaded")
    status, paris, _ = await api.call("GET", "/flows/paris")
    assert paris["matchers"] == [{"type": "thing", "tags": ["site=lyon"]}]
    daemon.write_config([], text.replace(FLOWS_TOML, ""))
    await daemon.signal(signal.SIGHUP)
    await daemon.wait_log(lambda e: e.get("event") == "Config reloaded", count=2)
    status, _, _ = await api.call("GET", "/flows/paris")
    assert status == 404


async def test_the_openapi_document_describes_flows(running: tuple[DaemonProcess, Api]) -> None:
    _, api = running
    status, document, _ = await api.call("GET", "/openapi.json")
    assert status == 200
    paths = document["paths"]
    assert set(paths["/iot-flow/v1/flows"]) >= {"get", "post"}
    assert set(paths["/iot-flow/v1/flows/{id}"]) >= {"get", "put", "delete"}
    schemas = document["components"]["schemas"]
    flow_input = schemas["FlowInput"]
    assert {"name", "matchers", "connectors", "driver"} <= set(flow_input["properties"])
    for matcher in ("KeyMatcher", "ThingMatcher", "ApplicationMatcher", "RangeMatcher"):
        assert matcher in schemas, matcher
    assert "from" in schemas["RangeMatcher"]["properties"]
