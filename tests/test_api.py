"""The REST API, driven over HTTP against a running daemon and a real broker."""

from __future__ import annotations

import io
import json
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest

from fixtures_path import SEEDS
from support.clouds import Behaviour, FakeCloud, datacake, tago
from support.daemon import DaemonProcess
from support.mosquitto import Mosquitto
from support.uplinks import TOPICS, actility, uplink

pytestmark = pytest.mark.slow

BASE = "/iot-flow/v1"
AUTH = {"Authorization": "Bearer test-token"}


class Api:
    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, Any, dict[str, str]]:
        kwargs: dict[str, Any] = {"headers": {**AUTH, **(headers or {})}}
        if body is not None:
            kwargs["json"] = body
        if raw is not None:
            kwargs["data"] = io.BytesIO(raw)
        async with self.session.request(method, f"{self.base}{BASE}{path}", **kwargs) as r:
            text = await r.text()
            return r.status, (json.loads(text) if text else None), dict(r.headers)


@pytest.fixture
async def running(
    tmp_path: Path, mosquitto: Mosquitto, cloud: FakeCloud
) -> AsyncIterator[tuple[DaemonProcess, Api]]:
    daemon = DaemonProcess(
        tmp_path / "api",
        broker_url=mosquitto.url,
        connections=[
            {
                "id": "from-file",
                "name": "provisioned",
                "connectorId": "actility-http-iot",
                "brand": "CAYENNE",
                "devices": ["0018B20000001001"],
                "configuration": {"destinationURL": cloud.url("/file")},
            }
        ],
    )
    await daemon.start()
    async with aiohttp.ClientSession() as session:
        yield daemon, Api(session, daemon.api)
    await daemon.close()


def datacake_body(cloud: FakeCloud, path: str = "/dc", token: str = "abc123") -> dict[str, Any]:
    return {
        "name": "Actility To Datacake",
        "connectorId": "actility-http-iot",
        "configuration": {
            "destinationURL": cloud.url(path),
            "headers": {"Authorization": f"Token {token}"},
        },
        "brand": "DATACAKE",
    }


async def publish(broker: Mosquitto, *messages: tuple[str, bytes]) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1)


async def test_create_bind_deliver_repoint_delete(
    running: tuple[DaemonProcess, Api], cloud: FakeCloud, mosquitto: Mosquitto
) -> None:
    daemon, api = running
    cloud.require(datacake("abc123"))
    dev = "0018b200-0000-2001"
    status, created, headers = await api.call("POST", "/connections", datacake_body(cloud))
    assert status == 201, created
    cid = created["id"]
    assert headers["Location"] == f"{BASE}/connections/{cid}"
    assert created["configuration"]["headers"]["Authorization"] == "*****"
    assert created["state"] in ("OPENING", "OPENED")

    status, device, _ = await api.call("PUT", f"/devices/{dev}", {"connections": [cid]})
    assert status == 200
    assert device == {"devEUI": "0018B20000002001", "connections": [cid]}

    await publish(mosquitto, uplink("actility", "0018B20000002001", 1))
    (first,) = await cloud.wait_for(1, path="/dc")
    assert first.headers["Authorization"] == "Token abc123"

    # PUT the URL elsewhere, sending the masked secret back: it is kept.
    status, got, _ = await api.call("GET", f"/connections/{cid}")
    got["configuration"]["destinationURL"] = cloud.url("/dc2")
    status, replaced, _ = await api.call("PUT", f"/connections/{cid}", got)
    assert status == 200, replaced
    await publish(mosquitto, uplink("actility", "0018B20000002001", 2))
    (second,) = await cloud.wait_for(1, path="/dc2")
    assert second.headers["Authorization"] == "Token abc123"
    assert second.json["DevEUI_uplink"]["FCntUp"] == 2

    status, got, _ = await api.call("GET", f"/connections/{cid}")
    assert got["statistics"]["delivered"] == 2
    assert got["state"] == "OPENED"
    assert got["startupTime"]

    status, events, headers = await api.call("GET", f"/connections/{cid}/events")
    assert status == 200
    assert "configuration_changed" in [e["type"] for e in events]
    assert int(headers["X-Total"]) == len(events)

    status, _, _ = await api.call("DELETE", f"/connections/{cid}")
    assert status == 204
    await publish(mosquitto, uplink("actility", "0018B20000002001", 3))
    await daemon.wait_log(lambda e: e.get("event") == "Uplink of an unbound device")
    assert len(cloud.requests_to("/dc2")) == 1
    status, _, _ = await api.call("GET", f"/connections/{cid}")
    assert status == 404


async def test_secrets_in_the_url_are_masked_kept_and_never_quoted_back(
    running: tuple[DaemonProcess, Api], cloud: FakeCloud, mosquitto: Mosquitto
) -> None:
    """TagoIO takes its credential in `?authorization=`: shown as *****, kept when sent
    back so, and a cloud error that quotes it is stored redacted (issue #10, defect 6)."""
    daemon, api = running
    secret, token = "tago-5ecret-a1b2", "t0ken-c3d4"
    cloud.require(tago(secret), path="/tago")
    url = cloud.url(f"/tago?authorization={secret}&site=paris&access_token={token}")
    body = {
        "name": "To TagoIO",
        "connectorId": "actility-http-iot",
        "brand": "TAGO",
        "configuration": {"destinationURL": url, "headers": {"Authorization": f"Bearer {token}"}},
    }
    status, created, _ = await api.call("POST", "/connections", body)
    assert status == 201, created
    cid = created["id"]
    masked = cloud.url("/tago?authorization=*****&site=paris&access_token=*****")
    assert created["configuration"]["destinationURL"] == masked
    status, listed, _ = await api.call("GET", "/connections")
    (shown,) = [c for c in listed if c["id"] == cid]
    assert shown["configuration"]["destinationURL"] == masked

    # Sent back as read (a client that edits the name only): the secrets are kept.
    shown["name"] = "To TagoIO, renamed"
    status, replaced, _ = await api.call("PUT", f"/connections/{cid}", shown)
    assert status == 200, replaced
    assert replaced["configuration"]["destinationURL"] == masked
    dev = "0018B20000002002"
    status, _, _ = await api.call("PUT", f"/devices/{dev}", {"connections": [cid]})
    assert status == 200
    await publish(mosquitto, uplink("actility", dev, 1))
    (first,) = await cloud.wait_for(1, path="/tago")
    assert first.query == {"authorization": secret, "site": "paris", "access_token": token}

    # The cloud refuses the next one and quotes the credentials it received.
    cloud.set_behaviour(Behaviour(status=400, echo=True), path="/tago", times=1)
    await publish(mosquitto, uplink("actility", dev, 2))
    await daemon.wait_log(lambda e: e.get("event") == "Delivery failed")
    status, got, _ = await api.call("GET", f"/connections/{cid}")
    status, events, _ = await api.call("GET", f"/connections/{cid}/events")
    (failed,) = [e for e in events if e["type"] == "delivery_failed"]
    assert failed["details"]["status"] == 400
    assert "*****" in failed["details"]["body"]
    everything = json.dumps([got, events]) + "\n".join(daemon.output)
    assert secret not in everything
    assert token not in everything


async def test_url_templates_are_rendered_and_encoded_per_uplink(
    running: tuple[DaemonProcess, Api], cloud: FakeCloud, mosquitto: Mosquitto
) -> None:
    """`{DevEUI}` in the path and query of destinationURL, as in headers; an uplink value
    with `/`, `?`, `&`, `#` or CR/LF stays one value and never changes the URL's shape."""
    _, api = running
    url = cloud.url("/devices/{DevEUI}/up") + "?name={CustomerData.name|'none'}&fixed=1"
    body = {
        "name": "Templated URL",
        "connectorId": "actility-http-iot",
        "configuration": {"destinationURL": url},
    }
    status, created, _ = await api.call("POST", "/connections", body)
    assert status == 201, created
    assert created["configuration"]["destinationURL"] == url
    dev = "0018B20000002003"
    status, _, _ = await api.call("PUT", f"/devices/{dev}", {"connections": [created["id"]]})
    assert status == 200
    evil = "a/b?c=1&d=e#f\r\nX-Injected: yes %41"
    plain = actility(dev, 1)
    del plain["DevEUI_uplink"]["CustomerData"]  # the fallback literal then
    tricky = actility(dev, 2)
    tricky["DevEUI_uplink"]["CustomerData"] = {"name": evil}
    topic = TOPICS["actility"].format(dev=dev.lower())
    await publish(mosquitto, *[(topic, json.dumps(doc).encode()) for doc in (plain, tricky)])
    first, second = await cloud.wait_for(2, path=f"/devices/{dev}/up")
    assert first.raw_path == f"/devices/{dev}/up?name=none&fixed=1"
    assert first.query == {"name": "none", "fixed": "1"}
    assert second.query == {"name": evil, "fixed": "1"}
    assert "X-Injected" not in second.headers


async def test_templates_are_refused_where_they_would_pick_the_server(
    running: tuple[DaemonProcess, Api], cloud: FakeCloud
) -> None:
    _, api = running
    for url, why in [
        ("http://{DevEUI}.example.com/up", "path and the query only"),
        (f"http://127.0.0.1:{cloud.port}/up/{{DevEUI", "unclosed"),
        ("http://example.com/{DevEUI}#frag", "fragment"),
    ]:
        body = {
            "name": "bad",
            "connectorId": "actility-http-iot",
            "configuration": {"destinationURL": url},
        }
        status, error, _ = await api.call("POST", "/connections", body)
        assert status == 422, error
        (detail,) = error["details"]
        assert detail["path"] == "configuration.destinationURL"
        assert why in detail["message"]


def seed_bodies() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for page in sorted(SEEDS.glob("*.md")):
        for block in re.findall(
            r"```json\s*\nPOST /connections\s*\n(.*?)```", page.read_text(), re.S
        ):
            found.append((page.stem, json.loads(block)))
    return found


@pytest.mark.parametrize(("page", "body"), seed_bodies(), ids=[p for p, _ in seed_bodies()])
async def test_seed_bodies_are_accepted_as_they_are(
    running: tuple[DaemonProcess, Api], page: str, body: dict[str, Any]
) -> None:
    _, api = running
    status, created, _ = await api.call("POST", "/connections", body)
    assert status == 201, created
    assert created["name"] == body["name"]
    assert created["connectorId"] == body["connectorId"]
    assert created.get("brand") == body.get("brand")
    config = created["configuration"]
    for key, value in body["configuration"].items():
        if key in (
            "password",
            "privateKey",
            "secretAccessKey",
            "accessKeyId",
            "certificate",
            "downlinkAsKey",
            "sharedAccessKey",
        ):
            assert config[key] == "*****"  # as the product's GET /connections shows them
        elif key == "headers":
            assert set(config["headers"]) == set(value)
        else:
            assert config[key] == value
    assert len(created["alarms"]) == len(body.get("alarms", []))
    status, listed, _headers = await api.call("GET", "/connections")
    assert created["id"] in [c["id"] for c in listed]


async def test_catalog_describes_each_connector(running: tuple[DaemonProcess, Api]) -> None:
    _, api = running
    status, connectors, _ = await api.call("GET", "/connectors")
    assert status == 200
    by_id = {c["id"]: c for c in connectors}
    assert set(by_id) == {
        "actility-http-iot",
        "actility-mqtt-iot",
        "actility-aws-iot",
        "actility-cumulocity-iot",
        "actility-thingsboard-iot",
        "actility-splunk-iot",
        "actility-influxdb-iot",
        "actility-amqp-0.9.1-iot",
        "actility-azure-iot",
    }
    http = by_id["actility-http-iot"]
    assert {b["id"] for b in http["brands"]} >= {"DATACAKE", "CAYENNE", "QUBITRO", "TAGO"}
    aws = by_id["actility-aws-iot"]["connection"]["configurationSchema"]["properties"]
    assert aws["secretAccessKey"]["writeOnly"] is True
    # upOperations apply to every connector: each entry describes them, by `type`.
    operations = http["connection"]["upOperationsSchema"]
    assert operations["type"] == "array"
    assert set(operations["$defs"]) >= {"CallProcessor", "Filter"}
    assert operations == by_id["actility-mqtt-iot"]["connection"]["upOperationsSchema"]
    status, one, _ = await api.call("GET", "/connectors/actility-cumulocity-iot")
    assert one["connection"]["configurationSchema"]["properties"]["password"]["writeOnly"]
    # The new clouds' credentials (issue #18): password fields in a generated form.
    splunk = by_id["actility-splunk-iot"]["connection"]["configurationSchema"]["properties"]
    assert splunk["hecToken"]["writeOnly"] is True
    influx = by_id["actility-influxdb-iot"]["connection"]["configurationSchema"]["properties"]
    assert influx["token"]["writeOnly"] is True
    board = by_id["actility-thingsboard-iot"]["connection"]["configurationSchema"]["properties"]
    assert board["accessTokens"]["additionalProperties"]["writeOnly"] is True
    status, missing, _ = await api.call("GET", "/connectors/nope")
    assert status == 404
    assert missing["code"] == "not_found"


async def test_errors_say_what_is_wrong(
    running: tuple[DaemonProcess, Api], cloud: FakeCloud
) -> None:
    daemon, api = running
    async with aiohttp.ClientSession() as bare:
        async with bare.get(f"{daemon.api}{BASE}/connections") as r:
            assert r.status == 401
            assert (await r.json())["code"] == "unauthorized"
        async with bare.get(
            f"{daemon.api}{BASE}/connections", headers={"Authorization": "Bearer wrong"}
        ) as r:
            assert r.status == 401
        async with bare.get(f"{daemon.api}/metrics") as r:
            assert r.status == 200  # open, for Prometheus
    status, body, _ = await api.call(
        "POST", "/connections", raw=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert (status, body["code"]) == (400, "malformed_json")
    status, body, _ = await api.call(
        "POST", "/connections", raw=b"{}", headers={"Content-Type": "text/plain"}
    )
    assert status == 415
    status, body, _ = await api.call(
        "POST",
        "/connections",
        raw=b'{"a": "' + b"x" * 1_100_000 + b'"}',
        headers={"Content-Type": "application/json"},
    )
    assert status == 413
    bad = datacake_body(cloud)
    bad["brand"] = "ACME"
    bad["configuration"]["destinationURL"] = "ftp://x"
    bad["colour"] = "blue"
    status, body, _ = await api.call("POST", "/connections", bad)
    assert status == 422
    paths = {d["path"] for d in body["details"]}
    assert "colour" in paths
    bad.pop("colour")
    status, body, _ = await api.call("POST", "/connections", bad)
    assert {d["path"] for d in body["details"]} == {"configuration.destinationURL"}
    bad["configuration"]["destinationURL"] = cloud.url("/x")
    status, body, _ = await api.call("POST", "/connections", bad)
    assert [d["path"] for d in body["details"]] == ["brand"]
    status, body, _ = await api.call("GET", "/connections?page=0&perPage=1000")
    assert status == 400
    assert {d["path"] for d in body["details"]} == {"page", "perPage"}
    status, body, _ = await api.call("PATCH", "/connections")
    assert status == 405
    status, body, _ = await api.call("GET", "/devices/xyz")
    assert (status, body["code"]) == (400, "invalid_dev_eui")
    status, body, _ = await api.call("PUT", "/devices/0018B20000003001", {"connections": ["ghost"]})
    assert status == 422
    assert body["details"][0]["path"] == "connections"


async def test_provisioned_connections_are_read_only(running: tuple[DaemonProcess, Api]) -> None:
    _, api = running
    status, body, _ = await api.call("GET", "/connections/from-file")
    assert status == 200
    assert body["provisioned"] is True
    status, body, _ = await api.call("PUT", "/connections/from-file", body)
    assert (status, body["code"]) == (409, "read_only")
    status, body, _ = await api.call("DELETE", "/connections/from-file")
    assert status == 409
    status, body, _ = await api.call("PUT", "/devices/0018B20000001001", {"connections": []})
    assert status == 409
    status, body, _ = await api.call("GET", "/devices/0018b20000001001")
    assert body == {"devEUI": "0018B20000001001", "connections": ["from-file"]}


async def test_pagination_and_device_listing(
    running: tuple[DaemonProcess, Api], cloud: FakeCloud
) -> None:
    _, api = running
    ids = []
    for n in range(5):
        body = datacake_body(cloud)
        body["id"] = f"page-{n}"
        status, created, _ = await api.call("POST", "/connections", body)
        assert status == 201
        ids.append(created["id"])
    status, _again, _ = await api.call(
        "POST", "/connections", {**datacake_body(cloud), "id": "page-0"}
    )
    assert status == 409
    status, page, headers = await api.call("GET", "/connections?page=2&perPage=2")
    assert (headers["X-Total"], headers["X-Total-Pages"], headers["X-Page"]) == ("6", "3", "2")
    assert len(page) == 2
    for n, dev in enumerate(["0018B20000004001", "0018B20000004002", "0018B20000004003"]):
        await api.call("PUT", f"/devices/{dev}", {"connections": ids[: n + 1]})
    status, devices, headers = await api.call("GET", "/devices?connectionId=page-1")
    assert [d["devEUI"] for d in devices] == ["0018B20000004002", "0018B20000004003"]
    assert headers["X-Total"] == "2"
    status, _, _ = await api.call("DELETE", "/devices/0018B20000004003")
    assert status == 204
    status, _, _ = await api.call("DELETE", "/devices/0018B20000004003")
    assert status == 404


async def test_openapi_document(running: tuple[DaemonProcess, Api]) -> None:
    _, api = running
    status, document, _ = await api.call("GET", "/openapi.json")
    assert status == 200
    assert document["openapi"].startswith("3.1")
    assert f"{BASE}/connections/{{id}}" in document["paths"]
    assert "ConnectionInput" in document["components"]["schemas"]


Factory = Callable[..., DaemonProcess]
