"""Connector plugins (issue #12, docs/connectors.md): found by entry point, built-in or not.

1. The built-in connectors come from the `iotflow.connectors` entry-point group, like any
   other; the catalog, its schemas and the OpenAPI input union follow what is registered.
2. The example package examples/acme-echo, installed from its own directory with pip, shows
   in `GET /connectors` with its schema, and a connection of it created through the API
   delivers, retries and fails like a built-in (`iotflow run`, a real broker and cloud).
3. A broken or conflicting plugin does not stop the daemon: logged once with its entry
   point's name, left out of the catalog. A stored connection whose connector is no longer
   installed is out of service alone, and back once the plugin is.
"""

from __future__ import annotations

import os
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import orjson
import pytest
import structlog

from iotflow.connectors import CATALOG, connector_document, parse_connection
from iotflow.connectors.catalog import GROUP, load_connectors
from iotflow.errors import ConfigError
from support.clouds import FakeCloud
from support.daemon import DaemonProcess, LogEvent
from support.mosquitto import Mosquitto
from support.plugins import (
    BROKEN_PLUGINS,
    broken_plugins,
    example_connector,
    importable,
    installed_example,
)
from support.uplinks import uplink

BASE = "/iot-flow/v1"
AUTH = {"Authorization": "Bearer test-token"}
DEV = "0018B2000000E001"
KEY = "acme-api-key-s3cret-5d1e"
BUILTINS = [
    "actility-amqp-0.9.1-iot",
    "actility-aws-iot",
    "actility-azure-iot",
    "actility-cumulocity-iot",
    "actility-http-iot",
    "actility-influxdb-iot",
    "actility-mqtt-iot",
    "actility-splunk-iot",
    "actility-thingsboard-iot",
]
NOT_LOADED = "Connector plugin not loaded"


def _pythonpath(*paths: Path) -> dict[str, str]:
    current = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": os.pathsep.join([*map(str, paths), *([current] if current else [])])}


async def call(daemon: DaemonProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"{daemon.api}{BASE}{path}", json=body, headers=AUTH) as r,
    ):
        text = await r.text()
        return r.status, (orjson.loads(text) if text else None)


def echo_body(cloud: FakeCloud, cid: str = "echo", **configuration: Any) -> dict[str, Any]:
    return {
        "id": cid,
        "name": "to Acme",
        "connectorId": "acme-echo",
        "configuration": {"url": cloud.url(f"/{cid}"), "apiKey": KEY, **configuration},
    }


# -- in the test process -------------------------------------------------------------------


def test_the_builtins_are_registered_by_entry_point() -> None:
    points = {p.name: p for p in entry_points(group=GROUP)}
    assert sorted(n for n in points if n.startswith("actility-")) == BUILTINS
    assert {getattr(points[n].dist, "name", None) for n in BUILTINS} == {"iotflow"}
    # The daemon's catalog is exactly what is registered (no list of its own).
    assert sorted(CATALOG) == sorted(points)
    for name in BUILTINS:
        assert CATALOG[name] is points[name].load()


def test_the_example_describes_itself_like_a_builtin() -> None:
    document = connector_document(example_connector())
    assert {k: document[k] for k in ("id", "producerId", "moduleId", "version", "brands")} == {
        "id": "acme-echo",
        "producerId": "acme",
        "moduleId": "echo",
        "version": "1.0.0",
        "brands": [],
    }
    schema = document["connection"]["configurationSchema"]
    assert schema["id"] == "urn:iotflow:connector:acme-echo:configuration"
    assert set(schema["required"]) == {"url", "apiKey"}
    assert schema["properties"]["apiKey"]["writeOnly"] is True
    # The common keys come with ConnectorConfiguration.
    assert {"uplinkTimeValidity", "reconnectStrategy"} <= set(schema["properties"])


def test_broken_plugins_are_left_out_and_logged_once_each(tmp_path: Path) -> None:
    site = broken_plugins(tmp_path / "site")
    with importable(site), structlog.testing.capture_logs() as logs:
        catalog = load_connectors()
    assert sorted(catalog) == BUILTINS
    # A plugin cannot take over a built-in's id: the first registered (iotflow's) stays.
    assert catalog["actility-http-iot"] is CATALOG["actility-http-iot"]
    lines = [line for line in logs if line["event"] == NOT_LOADED]
    assert sorted(line["entry_point"] for line in lines) == sorted(BROKEN_PLUGINS)
    for line in lines:
        assert line["log_level"] == "error"
        assert line["distribution"] == "acme-broken"
        assert BROKEN_PLUGINS[line["entry_point"]] in line["error"], line


def test_a_connection_of_a_connector_not_installed_is_refused_with_its_path() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_connection({"id": "x", "name": "x", "connectorId": "acme-echo"})
    (problem,) = caught.value.problems
    assert problem.path == "connectorId"
    assert "actility-http-iot" in problem.message


# -- end to end: `iotflow run` -------------------------------------------------------------


def _failed_lines(daemon: DaemonProcess, cid: str) -> list[LogEvent]:
    return [
        e for e in daemon.logs if e.get("event") == "Delivery failed" and e["connection"] == cid
    ]


@pytest.mark.slow
async def test_the_example_plugin_delivers_retries_and_fails_like_a_builtin(
    tmp_path: Path, mosquitto: Mosquitto, cloud: FakeCloud, daemons: list[DaemonProcess]
) -> None:
    daemon = DaemonProcess(
        tmp_path / "echo", broker_url=mosquitto.url, env=_pythonpath(installed_example())
    )
    daemons.append(daemon)
    await daemon.start()

    status, connectors = await call(daemon, "GET", "/connectors")
    assert status == 200
    assert sorted(c["id"] for c in connectors) == sorted([*BUILTINS, "acme-echo"])
    status, one = await call(daemon, "GET", "/connectors/acme-echo")
    assert status == 200
    assert one == connector_document(example_connector())
    status, openapi = await call(daemon, "GET", "/openapi.json")
    union = openapi["components"]["schemas"]["ConnectionInput"]["oneOf"]
    assert {"$ref": "#/components/schemas/EchoConnectionInput"} in union

    # Validated with the plugin's model, every problem with its key path.
    status, answer = await call(
        daemon, "POST", "/connections", {"name": "n", "connectorId": "acme-echo"}
    )
    assert status == 422, answer
    assert {d["path"] for d in answer["details"]} >= {"configuration.url", "configuration.apiKey"}
    status, created = await call(daemon, "POST", "/connections", echo_body(cloud))
    assert status == 201, created
    assert created["configuration"]["apiKey"] == "*****"
    status, answer = await call(daemon, "PUT", f"/devices/{DEV}", {"connections": ["echo"]})
    assert status == 200, answer

    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
        # 1: delivered at once.
        await client.publish(*uplink("actility", DEV, 1), qos=1)
        (first,) = await cloud.wait_for(1, path="/echo")
        # 2: the service is down once (503): retried, then delivered.
        cloud.respond(503, times=1)
        await client.publish(*uplink("actility", DEV, 2), qos=1)
        await cloud.wait_for(2, path="/echo")
        # 3: refused for good (400): failed after one attempt.
        cloud.respond(400, times=1)
        await client.publish(*uplink("actility", DEV, 3), qos=1)
        await daemon.wait_log(lambda e: bool(_failed_lines(daemon, "echo")))
        # 4: the key is refused once (401): AUTHENTICATION_FAILED, then delivered.
        cloud.respond(401, times=1)
        await client.publish(*uplink("actility", DEV, 4), qos=1)
        await cloud.wait_for(3, path="/echo")

    assert first.headers["X-Acme-Key"] == KEY
    assert first.headers["X-Acme-Device"] == DEV
    assert orjson.loads(first.body)["DevEUI_uplink"]["FCntUp"] == 1
    requests = cloud.requests_to("/echo")
    assert [orjson.loads(r.body)["DevEUI_uplink"]["FCntUp"] for r in requests] == [1, 2, 2, 3, 4, 4]
    assert [r.headers["X-Acme-Attempt"] for r in requests] == ["1", "1", "2", "1", "1", "2"]

    status, shown = await call(daemon, "GET", "/connections/echo")
    assert status == 200
    stats = shown["statistics"]
    assert (stats["delivered"], stats["retried"], stats["failed"]) == (3, 2, 1), stats
    assert shown["state"] == "OPENED"
    (failed,) = _failed_lines(daemon, "echo")
    assert failed["error"] == "HTTP 400"
    status, events = await call(daemon, "GET", "/connections/echo/events")
    states = [e["details"].get("state") for e in events if e["type"] == "state_changed"]
    assert "AUTHENTICATION_FAILED" in states
    for outcome, count in (("delivered", 3), ("failed", 1)):
        assert (
            await daemon.metric("iotflow_deliveries_total", connection="echo", outcome=outcome)
            == count
        )
    assert KEY not in "\n".join(daemon.output)
    assert not [e for e in daemon.logs if e.get("event") in (NOT_LOADED, "API request failed")]


@pytest.mark.slow
async def test_broken_plugins_do_not_stop_the_daemon(
    tmp_path: Path, mosquitto: Mosquitto, daemons: list[DaemonProcess]
) -> None:
    site = broken_plugins(tmp_path / "site")
    daemon = DaemonProcess(
        tmp_path / "broken",
        broker_url=mosquitto.url,
        env=_pythonpath(site, installed_example()),
    )
    daemons.append(daemon)
    await daemon.start()
    for _ in range(2):
        status, connectors = await call(daemon, "GET", "/connectors")
        assert status == 200
        assert sorted(c["id"] for c in connectors) == sorted([*BUILTINS, "acme-echo"])
    (http,) = [c for c in connectors if c["id"] == "actility-http-iot"]
    assert http == connector_document(CATALOG["actility-http-iot"])  # not the impostor
    status, _ = await call(daemon, "GET", "/openapi.json")
    assert status == 200
    lines = [e for e in daemon.logs if e.get("event") == NOT_LOADED]
    # Once each, at the first use of the catalog, with the entry point's name.
    assert sorted(line["entry_point"] for line in lines) == sorted(BROKEN_PLUGINS)
    assert await daemon.stop() == 0


@pytest.mark.slow
async def test_a_stored_connection_of_an_uninstalled_connector_is_out_of_service_alone(
    tmp_path: Path, mosquitto: Mosquitto, cloud: FakeCloud, daemons: list[DaemonProcess]
) -> None:
    workdir = tmp_path / "uninstalled"
    with_plugin = _pythonpath(installed_example())
    daemon = DaemonProcess(workdir, broker_url=mosquitto.url, env=with_plugin)
    daemons.append(daemon)
    await daemon.start()
    healthy = {
        "id": "healthy",
        "name": "healthy",
        "connectorId": "actility-http-iot",
        "configuration": {"destinationURL": cloud.url("/healthy")},
    }
    for body in (healthy, echo_body(cloud)):
        status, answer = await call(daemon, "POST", "/connections", body)
        assert status == 201, answer
    status, answer = await call(
        daemon, "PUT", f"/devices/{DEV}", {"connections": ["healthy", "echo"]}
    )
    assert status == 200, answer
    assert await daemon.stop() == 0

    # The plugin is uninstalled: the daemon starts, and delivers to the others.
    daemon.env = {}
    await daemon.start()
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
        await client.publish(*uplink("actility", DEV, 1), qos=1)
    await cloud.wait_for(1, path="/healthy")
    status, shown = await call(daemon, "GET", "/connections/echo")
    assert status == 200, shown
    assert shown["state"] == "CLOSED"
    assert "unknown connector" in shown["statistics"]["lastError"]
    assert shown["configuration"] == {}  # nothing says which of its values are secrets
    status, events = await call(daemon, "GET", "/connections/echo/events")
    (event,) = [e for e in events if e["type"] == "out_of_service"]
    assert "connectorId" in event["details"]["reason"]
    assert KEY not in "\n".join(daemon.output)
    assert await daemon.stop() == 0

    # Installed again: back in service, with the uplink it kept.
    daemon.env = with_plugin
    await daemon.start()
    (kept,) = await cloud.wait_for(1, path="/echo")
    assert orjson.loads(kept.body)["DevEUI_uplink"]["FCntUp"] == 1
    assert kept.headers["X-Acme-Key"] == KEY
    status, shown = await call(daemon, "GET", "/connections/echo")
    assert shown["state"] in ("OPENING", "OPENED")
