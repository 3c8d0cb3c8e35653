"""`actility-azure-iot` against the local IoT Hub (support/azure.py): the double itself
answers as Azure documents, and the sink creates identities, signs device tokens, publishes
device-to-cloud, takes cloud-to-device messages as downlinks, backs off when throttled, and
keeps at most `maxDeviceSessions` device sessions."""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest

from fixtures_path import SEEDS
from iotflow.connectors import parse_connection
from iotflow.downlinks import DownlinkRequest
from iotflow.errors import AuthenticationSinkError, PermanentSinkError, RetryableSinkError
from iotflow.sinks import SinkContext, create_sink
from iotflow.sinks.azure import AzureSink, sas_token
from iotflow.spool import Delivery
from support.azure import HUB, POLICY, FakeIotHub, check_token, new_key
from support.tls import Pki, make_pki
from support.uplinks import actility

DEV = "0018B20000000C01"


def product_body() -> dict[str, Any]:
    """The product's own example (docs.thingpark.com Connector/AZURE, kept in the seeds)."""
    text = (SEEDS / "azure-iot.md").read_text()
    (block,) = re.findall(r"```json\s*\nPOST /connections\s*\n(.*?)```", text, re.S)
    body: dict[str, Any] = json.loads(block)
    return body


@functools.cache
def pki() -> Pki:
    return make_pki()


@pytest.fixture
async def hub() -> AsyncIterator[FakeIotHub]:
    made = FakeIotHub(pki())
    await made.start()
    yield made
    await made.stop()


def connection(hub: FakeIotHub, **config: Any) -> Any:
    return parse_connection(
        {
            "id": "azure",
            "name": "azure",
            "connectorId": "actility-azure-iot",
            "configuration": {
                "hostName": hub.hub,
                "sharedAccessKeyName": POLICY,
                "sharedAccessKey": hub.policy_key,
                "mqttEndpoint": hub.mqtt_endpoint,
                "registryURL": hub.registry_url,
                "trustedCaCertficate": hub.pki.ca,
                "downlinkEnabled": False,
                **config,
            },
        }
    )


def delivery(n: int, dev: str = DEV) -> Delivery:
    now = time.time()
    return Delivery(n, "azure", dev, now, now, orjson.dumps(actility(dev, n)))


def make(hub: FakeIotHub, handler: Any = None, **config: Any) -> AzureSink:
    sink = create_sink(
        connection(hub, **config), SinkContext(timeout=5, max_in_flight=4, downlink=handler)
    )
    assert isinstance(sink, AzureSink)
    return sink


# -- the product's body, the token ------------------------------------------------------------


def test_the_products_body_is_valid_as_it_is() -> None:
    config = parse_connection({"id": "p", **product_body()}).configuration
    assert config.hostName == "demo.azure-devices.net"  # type: ignore[attr-defined]
    assert config.iotHubUnits == 25  # type: ignore[attr-defined]


def test_a_sas_token_is_signed_as_azure_documents() -> None:
    key = new_key()
    token = sas_token("myhub.azure-devices.net/devices/DEV-1", key, 1_900_000_000, "device")
    # Computed here from Azure's description, not with the sink's code.
    sr = "myhub.azure-devices.net%2Fdevices%2FDEV-1"
    digest = hmac.new(base64.b64decode(key), f"{sr}\n1900000000".encode(), hashlib.sha256)
    sig = quote(base64.b64encode(digest.digest()).decode(), safe="")
    assert token == f"SharedAccessSignature sr={sr}&sig={sig}&se=1900000000&skn=device"


def test_the_double_checks_tokens_as_azure_does() -> None:
    key, now = new_key(), time.time()
    good = sas_token(f"{HUB}/devices/D1", key, int(now + 60))
    assert check_token(good, f"{HUB}/devices/D1", {None: key}, now) is None
    assert check_token(good, f"{HUB}/devices/D2", {None: key}, now) is not None
    assert check_token(good, f"{HUB}/devices/D1", {None: new_key()}, now) == "bad signature"
    expired = sas_token(f"{HUB}/devices/D1", key, int(now - 1))
    assert check_token(expired, f"{HUB}/devices/D1", {None: key}, now) == "expired"
    policy = sas_token(HUB, key, int(now + 60), POLICY)
    assert check_token(policy, HUB, {POLICY: key}, now) is None
    assert check_token(policy, HUB, {"other": key}, now) is not None


async def test_the_double_registry_answers_as_documented(hub: FakeIotHub) -> None:
    url = f"{hub.registry_url}/devices/{DEV}?api-version=2021-04-12"
    auth = {"Authorization": sas_token(HUB, hub.policy_key, int(time.time() + 60), POLICY)}
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers=auth) as r:
            assert r.status == 404
            assert (await r.json())["Message"].startswith("ErrorCode:DeviceNotFound;")
        async with session.put(url, json={"deviceId": DEV}, headers=auth) as r:
            assert r.status == 200
            created = await r.json()
        assert created["deviceId"] == DEV
        assert base64.b64decode(created["authentication"]["symmetricKey"]["primaryKey"])
        async with session.put(url, json={"deviceId": DEV}, headers=auth) as r:
            assert r.status == 409
            assert "DeviceAlreadyExists" in (await r.json())["Message"]
        wrong = {"Authorization": sas_token(HUB, new_key(), int(time.time() + 60), POLICY)}
        async with session.get(url, headers=wrong) as r:
            assert r.status == 401
            assert "IotHubUnauthorizedAccess" in (await r.json())["Message"]
        hub.quota = 0
        async with session.get(url, headers=auth) as r:
            assert r.status == 429
            assert "ThrottlingException" in (await r.json())["Message"]


# -- the sink --------------------------------------------------------------------------------


async def test_an_uplink_creates_the_device_and_reaches_device_to_cloud(hub: FakeIotHub) -> None:
    sink = make(hub)
    await sink.start()
    try:
        await sink.send(delivery(1, DEV.lower()))
        ((topic, body),) = await hub.wait_received(1)
        assert topic.startswith(f"devices/{DEV}/messages/events/")
        assert topic.endswith("/$.ct=application%2Fjson&$.ce=utf-8")
        assert orjson.loads(body)["DevEUI_uplink"]["FCntUp"] == 1
        assert DEV in hub.devices  # created, upper case
        assert hub.requests == [("PUT", DEV, 200)]
        assert hub.connects == [(DEV, 0)]
        # The next uplink uses the session and the key it has: no registry call, no login.
        await sink.send(delivery(2))
        await hub.wait_received(2)
        assert (len(hub.requests), len(hub.connects)) == (1, 1)
        assert await sink.healthcheck()
    finally:
        await sink.close()


async def test_an_existing_identity_is_read_and_a_missing_one_is_not_created(
    hub: FakeIotHub,
) -> None:
    hub.add_device(DEV)
    sink = make(hub, createDevices=False)
    await sink.start()
    try:
        await sink.send(delivery(1))
        await hub.wait_received(1)
        with pytest.raises(PermanentSinkError, match="not in the hub's identity registry"):
            await sink.send(delivery(1, "0018B20000000C99"))
        assert [m for m, _, _ in hub.requests] == ["GET", "GET"]
    finally:
        await sink.close()


async def test_a_wrong_policy_key_is_an_authentication_error(hub: FakeIotHub) -> None:
    sink = make(hub, sharedAccessKey=new_key())
    await sink.start()
    try:
        with pytest.raises(AuthenticationSinkError, match="HTTP 401"):
            await sink.send(delivery(1))
    finally:
        await sink.close()


async def test_throttling_is_retryable_on_the_registry_and_on_mqtt(hub: FakeIotHub) -> None:
    sink = make(hub)
    await sink.start()
    try:
        hub.fail_next(429, {"Retry-After": "7"})
        with pytest.raises(RetryableSinkError) as caught:
            await sink.send(delivery(1))
        assert caught.value.retry_after == 7
        hub.throttle_connects = 1  # CONNACK 3: server unavailable
        with pytest.raises(RetryableSinkError):
            await sink.send(delivery(1))
        await sink.send(delivery(1))  # once the hub takes it again
        await hub.wait_received(1)
        assert [code for _, code in hub.connects] == [3, 0]
    finally:
        await sink.close()


async def test_device_sessions_are_bounded_least_recently_used_first(hub: FakeIotHub) -> None:
    devices = [f"0018B20000000D0{i}" for i in range(1, 4)]
    sink = make(hub, maxDeviceSessions=2)
    await sink.start()
    try:
        for n, dev in enumerate(devices, 1):
            await sink.send(delivery(n, dev))
        await hub.wait_received(3)
        assert list(sink.devices) == devices[1:]  # the first one's session was closed
        await sink.send(delivery(4, devices[1]))  # used: now the most recent
        await sink.send(delivery(5, devices[0]))  # a new session; devices[2] goes
        assert list(sink.devices) == [devices[1], devices[0]]
        assert [c for c, _ in hub.connects] == [*devices, devices[0]]
    finally:
        await sink.close()


class Handed:
    def __init__(self) -> None:
        self.requests: list[DownlinkRequest] = []
        self.changed = asyncio.Condition()

    async def __call__(self, connection_id: str, request: DownlinkRequest) -> None:
        async with self.changed:
            self.requests.append(request)
            self.changed.notify_all()


async def test_a_cloud_to_device_message_is_a_downlink_of_that_device(hub: FakeIotHub) -> None:
    handed = Handed()
    sink = make(hub, handler=handed, downlinkEnabled=True, downlinkPort=9)
    await sink.start()
    try:
        # Opens the device's session; the SUBACK comes before the session serves a publish.
        await sink.send(delivery(1))
        await hub.wait_received(1)
        await hub.send_c2d(DEV, {"DevEUI_downlink": {"payload_hex": "a1b2"}})
        async with asyncio.timeout(20), handed.changed:
            await handed.changed.wait_for(lambda: handed.requests)
        (request,) = handed.requests
        assert (request.dev_eui, request.f_port, request.payload) == (DEV, 9, b"\xa1\xb2")
    finally:
        await sink.close()
