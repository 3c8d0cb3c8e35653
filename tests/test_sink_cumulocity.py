"""The Cumulocity sink against a local Cumulocity tenant (support/cumulocity.py)."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio

from iotflow.connectors.connection import parse_connection
from iotflow.connectors.cumulocity import CumulocityConfig
from iotflow.connectors.web import base_url
from iotflow.downlinks import DownlinkRejected, DownlinkRequest
from iotflow.errors import (
    AuthenticationSinkError,
    ConfigError,
    PermanentSinkError,
    RetryableSinkError,
)
from iotflow.formats import decode
from iotflow.sinks import SinkContext, create_sink
from iotflow.sinks.cumulocity import (
    CumulocitySink,
    downlink_request,
    measurement_document,
)
from iotflow.spool import Delivery
from support.cumulocity import FakeCumulocity
from support.uplinks import actility

DEV = "0018B20000000C01"
OTHER = "0018B20000000C02"
_ids = itertools.count(1)


@pytest_asyncio.fixture
async def c8y(request: pytest.FixtureRequest) -> AsyncIterator[FakeCumulocity]:
    async with FakeCumulocity() as fake:
        yield fake
        # Shown only when the test fails: what the tenant saw is usually the explanation.
        request.node.add_report_section("teardown", "cumulocity requests", fake.describe())


def connection_document(c8y: FakeCumulocity, **config: Any) -> dict[str, Any]:
    return {
        "id": "c8y",
        "name": "Cumulocity",
        "connectorId": "actility-cumulocity-iot",
        "configuration": {
            "hostName": c8y.base_url,
            "tenantId": c8y.tenant,
            "username": c8y.username,
            "password": c8y.password,
            **config,
        },
    }


def config_of(c8y: FakeCumulocity, **config: Any) -> CumulocityConfig:
    configuration = parse_connection(connection_document(c8y, **config)).configuration
    assert isinstance(configuration, CumulocityConfig)
    return configuration


class Downlinks:
    """A downlink path that records what it is given, and refuses when told to."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, DownlinkRequest]] = []
        self.reject: DownlinkRejected | None = None
        self.reject_times: int | None = None  # None: every call while `reject` is set

    async def __call__(self, connection_id: str, request: DownlinkRequest) -> None:
        if self.reject is not None:
            rejection = self.reject
            if self.reject_times is not None:
                self.reject_times -= 1
                if self.reject_times <= 0:
                    self.reject = None
            raise rejection
        self.sent.append((connection_id, request))


@pytest.fixture
def downlinks() -> Downlinks:
    return Downlinks()


@pytest_asyncio.fixture
async def make_sink(c8y: FakeCumulocity, downlinks: Downlinks) -> AsyncIterator[Callable[..., Any]]:
    made: list[CumulocitySink] = []

    async def make(
        *,
        timeout: float = 5.0,
        poll_interval: float = 0.05,
        with_downlinks: bool = True,
        **config: Any,
    ) -> CumulocitySink:
        context = SinkContext(
            timeout=timeout, max_in_flight=2, downlink=downlinks if with_downlinks else None
        )
        sink = CumulocitySink("c8y", config_of(c8y, **config), context, poll_interval=poll_interval)
        await sink.start()
        made.append(sink)
        return sink

    yield make
    for sink in made:
        await sink.close()


def delivery(dev_eui: str = DEV, fcnt: int = 1, **inner: Any) -> Delivery:
    document = actility(dev_eui, fcnt)
    document["DevEUI_uplink"].update(inner)
    now = time.time()
    return Delivery(
        id=next(_ids),
        connection_id="c8y",
        dev_eui=dev_eui,
        uplink_time=now,
        received_at=now,
        document=orjson.dumps(document),
    )


# -- uplinks ------------------------------------------------------------------------------


async def test_first_uplink_registers_the_device(
    c8y: FakeCumulocity, make_sink: Callable[..., Any]
) -> None:
    sink = await make_sink()
    await sink.send(delivery(FCntUp=42))

    # Looked up (404), created, bound, then the event and the measurement, in that order.
    assert [(c.method, c.path, c.status) for c in c8y.requests] == [
        ("GET", f"/identity/externalIds/c8y_Serial/{DEV}", 404),
        ("POST", "/inventory/managedObjects", 201),
        ("POST", f"/identity/globalIds/{c8y.external_ids[('c8y_Serial', DEV)]}/externalIds", 201),
        ("POST", "/event/events", 201),
        ("POST", "/measurement/measurements", 201),
    ]
    # Basic authentication as `{tenantId}/{username}`, the resource's own media types.
    assert {c.login for c in c8y.requests} == {f"{c8y.tenant}/{c8y.username}"}
    create = c8y.requests[1]
    assert create.headers["Content-Type"] == "application/vnd.com.nsn.cumulocity.managedobject+json"

    device = c8y.device_of(DEV)
    assert device is not None
    assert device["name"] == "My Demo Device"  # CustomerData.name of the fixture
    assert device["type"] == "c8y_LoRaDevice"
    assert device["c8y_IsDevice"] == {}
    assert device["c8y_Hardware"] == {"serialNumber": DEV}
    assert set(device["c8y_SupportedOperations"]) == {"c8y_Command", "c8y_LoRaDownlink"}

    (event,) = c8y.events
    assert event["source"] == {"id": device["id"]}
    assert event["type"] == "c8y_LoRaUplink"
    assert event["text"] == "LoRa uplink FPort 1 FCnt 42: 9e1c0100"
    assert event["c8y_LoRaUplink"] == {
        "devEUI": DEV,
        "fPort": 1,
        "fCnt": 42,
        "payloadHex": "9e1c0100",
        "rssi": -80.0,
        "snr": 7.0,
        "sf": 7,
        "frequency": 868.1,
        "gateway": "004A18E3",
        "gatewayCount": 1,
        "devAddr": "04D2848E",
    }
    (measurement,) = c8y.measurements
    assert measurement["source"] == {"id": device["id"]}
    assert measurement["time"] == event["time"]
    assert measurement["c8y_SignalStrength"] == {
        "rssi": {"value": -80.0, "unit": "dBm"},
        "snr": {"value": 7.0, "unit": "dB"},
    }


async def test_next_uplinks_use_the_cached_device(
    c8y: FakeCumulocity, make_sink: Callable[..., Any]
) -> None:
    sink = await make_sink()
    await sink.send(delivery(fcnt=1))
    await sink.send(delivery(fcnt=2))
    await sink.send(delivery(fcnt=3))
    assert c8y.count("GET", "/identity/") == 1
    assert c8y.count("POST", "/inventory/managedObjects") == 1
    assert len(c8y.events) == 3
    assert len(c8y.measurements) == 3
    assert len(c8y.managed_objects) == 1


async def test_existing_device_is_found_not_created(
    c8y: FakeCumulocity, make_sink: Callable[..., Any]
) -> None:
    device = c8y.add_device(DEV, name="Registered by hand")
    sink = await make_sink()
    await sink.send(delivery())
    assert c8y.count("POST", "/inventory/") == 0
    assert c8y.events[0]["source"] == {"id": device}
    assert c8y.managed_objects[device]["name"] == "Registered by hand"


async def test_create_devices_false_skips_unknown_devices(
    c8y: FakeCumulocity, make_sink: Callable[..., Any]
) -> None:
    known = c8y.add_device(OTHER)
    sink = await make_sink(createDevices=False)
    with pytest.raises(PermanentSinkError, match="createDevices is false") as caught:
        await sink.send(delivery(DEV))
    assert DEV in str(caught.value)
    assert c8y.count("POST", "/") == 0  # nothing created, nothing posted
    # A device registered in Cumulocity goes through as usual.
    await sink.send(delivery(OTHER))
    assert [e["source"]["id"] for e in c8y.events] == [known]
    # Registering the device later is enough: the miss is not cached.
    c8y.add_device(DEV)
    await sink.send(delivery(DEV))
    assert len(c8y.events) == 2


async def test_wrong_password_is_an_authentication_error(
    c8y: FakeCumulocity, make_sink: Callable[..., Any]
) -> None:
    sink = await make_sink(password="wrong")
    with pytest.raises(AuthenticationSinkError) as caught:
        await sink.send(delivery())
    assert caught.value.status == 401
    assert "security/Unauthorized" in str(caught.value)
    assert "wrong" not in str(caught.value)


async def test_unavailable_tenant_is_retryable(
    c8y: FakeCumulocity, make_sink: Callable[..., Any]
) -> None:
    sink = await make_sink()
    c8y.fail(503, path="/identity/", retry_after=7)
    with pytest.raises(RetryableSinkError) as caught:
        await sink.send(delivery())
    assert caught.value.status == 503
    assert caught.value.retry_after == 7
    await sink.send(delivery())  # the tenant is back
    assert len(c8y.events) == 1


async def test_slow_tenant_is_retryable(c8y: FakeCumulocity, make_sink: Callable[..., Any]) -> None:
    sink = await make_sink(timeout=0.2)
    c8y.fail(503, path="/identity/", delay=1.0)
    with pytest.raises(RetryableSinkError, match="no answer within"):
        await sink.send(delivery())


async def test_unprocessable_is_permanent_with_cumulocitys_message(
    c8y: FakeCumulocity, make_sink: Callable[..., Any]
) -> None:
    sink = await make_sink()
    c8y.fail(422, method="POST", path="/event/events", message="Text is too long")
    with pytest.raises(PermanentSinkError) as caught:
        await sink.send(delivery())
    assert caught.value.status == 422
    assert str(caught.value) == (
        "HTTP 422 on POST /event/events: undefined/validationError: Text is too long"
    )
    assert not isinstance(caught.value, RetryableSinkError)


async def test_a_failed_measurement_does_not_repeat_the_event(
    c8y: FakeCumulocity, make_sink: Callable[..., Any]
) -> None:
    sink = await make_sink()
    one = delivery()
    c8y.fail(503, path="/measurement/")
    with pytest.raises(RetryableSinkError):
        await sink.send(one)
    await sink.send(one)  # the worker's retry
    assert len(c8y.events) == 1
    assert len(c8y.measurements) == 1


async def test_a_device_deleted_in_cumulocity_is_created_again(
    c8y: FakeCumulocity, make_sink: Callable[..., Any]
) -> None:
    sink = await make_sink()
    await sink.send(delivery(fcnt=1))
    first = c8y.device_of(DEV)
    assert first is not None
    del c8y.managed_objects[first["id"]]
    del c8y.external_ids[("c8y_Serial", DEV)]
    with pytest.raises(PermanentSinkError, match="does not exist"):
        await sink.send(delivery(fcnt=2))
    await sink.send(delivery(fcnt=3))
    second = c8y.device_of(DEV)
    assert second is not None
    assert second["id"] != first["id"]


async def test_an_interrupted_registration_does_not_duplicate_the_device(
    c8y: FakeCumulocity, make_sink: Callable[..., Any]
) -> None:
    sink = await make_sink()
    c8y.fail(503, method="POST", path="/identity/globalIds/")
    with pytest.raises(RetryableSinkError):
        await sink.send(delivery())
    await sink.send(delivery())
    assert len(c8y.managed_objects) == 1
    assert c8y.device_of(DEV) is not None


async def test_a_device_that_cannot_be_bound_is_not_left_behind(
    c8y: FakeCumulocity, make_sink: Callable[..., Any]
) -> None:
    sink = await make_sink()
    c8y.fail(422, method="POST", path="/identity/globalIds/", message="External id refused")
    with pytest.raises(PermanentSinkError, match="External id refused"):
        await sink.send(delivery())
    assert c8y.count("DELETE", "/inventory/managedObjects/", status=204) == 1
    assert not c8y.managed_objects


async def test_a_device_bound_meanwhile_wins_over_ours(
    c8y: FakeCumulocity, make_sink: Callable[..., Any]
) -> None:
    sink = await make_sink()
    theirs = c8y.add_device(DEV)
    # Our lookup says "not found", as if the other writer came just after it.
    c8y.fail(404, method="GET", path="/identity/externalIds/", error="identity/Not Found")
    await sink.send(delivery())
    assert c8y.events[0]["source"] == {"id": theirs}
    assert list(c8y.managed_objects) == [theirs]  # ours was deleted


async def test_registry_makes_a_cumulocity_sink(c8y: FakeCumulocity) -> None:
    connection = parse_connection(connection_document(c8y))
    sink = create_sink(connection, SinkContext(timeout=5, max_in_flight=1))
    assert isinstance(sink, CumulocitySink)
    await sink.start()
    try:
        assert await sink.healthcheck()
        await sink.send(delivery())
    finally:
        await sink.close()
    assert not await sink.healthcheck()
    assert len(c8y.events) == 1


# -- measurement mapping (pure) -----------------------------------------------------------


def test_measurement_mapping() -> None:
    document = actility(DEV, 5)
    document["DevEUI_uplink"]["payload"] = {
        "temperature": 24.6,
        "battery": 3,
        "open": True,  # not a number
        "label": "kitchen",
        "accel": {"x": 0.5, "y": -1, "name": "xyz"},
        "levels": [1, 2],
        "co2.ppm": 415,
        "time": 12,  # would clobber the measurement's time: left out
    }
    uplink = decode("actility", orjson.dumps(document))
    measurement = measurement_document(uplink, "77")
    assert measurement is not None
    assert measurement == {
        "source": {"id": "77"},
        "type": "c8y_LoRaUplink",
        "time": uplink.time.isoformat(timespec="milliseconds"),
        "c8y_SignalStrength": {
            "rssi": {"value": -80.0, "unit": "dBm"},
            "snr": {"value": 7.0, "unit": "dB"},
        },
        "temperature": {"temperature": {"value": 24.6}},
        "battery": {"battery": {"value": 3}},
        "accel": {"x": {"value": 0.5}, "y": {"value": -1}},
        "co2_ppm": {"co2_ppm": {"value": 415}},
    }


def test_no_numbers_no_measurement() -> None:
    document = actility(DEV, 5)
    inner = document["DevEUI_uplink"]
    del inner["LrrRSSI"], inner["LrrSNR"], inner["Lrrs"]
    inner["payload"] = {"state": "on"}
    uplink = decode("actility", orjson.dumps(document))
    assert measurement_document(uplink, "77") is None


async def test_string_numbers_of_older_thingpark_releases(
    c8y: FakeCumulocity, make_sink: Callable[..., Any]
) -> None:
    sink = await make_sink()
    await sink.send(
        delivery(FPort="2", FCntUp="9", LrrRSSI="-101.500000", LrrSNR="-3.25", SpFact="12")
    )
    event = c8y.events[0]["c8y_LoRaUplink"]
    assert (event["fPort"], event["fCnt"], event["sf"]) == (2, 9, 12)
    signal = c8y.measurements[0]["c8y_SignalStrength"]
    assert signal == {
        "rssi": {"value": -101.5, "unit": "dBm"},
        "snr": {"value": -3.25, "unit": "dB"},
    }


# -- downlinks ----------------------------------------------------------------------------


async def test_downlink_operation_round_trip(
    c8y: FakeCumulocity, make_sink: Callable[..., Any], downlinks: Downlinks
) -> None:
    sink = await make_sink()
    await sink.send(delivery())  # the device becomes known to the connection
    device = c8y.external_ids[("c8y_Serial", DEV)]
    shell = c8y.add_operation(device, c8y_Command={"text": "2:01ff"})
    structured = c8y.add_operation(
        device, c8y_LoRaDownlink={"fPort": 10, "payloadHex": "A0B1", "confirmed": True}
    )
    await c8y.wait_until(
        lambda: all(c8y.operations[o]["status"] == "SUCCESSFUL" for o in (shell, structured)),
        what="both operations SUCCESSFUL",
    )
    for operation in (shell, structured):
        assert c8y.operation_history[operation] == ["PENDING", "EXECUTING", "SUCCESSFUL"]
    assert downlinks.sent == [
        ("c8y", DownlinkRequest(DEV, 2, b"\x01\xff", False, shell)),
        ("c8y", DownlinkRequest(DEV, 10, b"\xa0\xb1", True, structured)),
    ]
    polls = [c for c in c8y.requests if c.path == "/devicecontrol/operations"]
    assert polls[0].query == {"deviceId": device, "status": "PENDING", "pageSize": "100"}


async def test_rejected_downlink_fails_the_operation_with_the_reason(
    c8y: FakeCumulocity, make_sink: Callable[..., Any], downlinks: Downlinks
) -> None:
    downlinks.reject = DownlinkRejected("bad_payload", "payload longer than 51 bytes at SF12")
    sink = await make_sink()
    await sink.send(delivery())
    device = c8y.external_ids[("c8y_Serial", DEV)]
    operation = c8y.add_operation(device, c8y_Command={"text": "2:" + "00" * 60})
    await c8y.wait_until(lambda: c8y.operations[operation]["status"] == "FAILED")
    assert c8y.operation_history[operation] == ["PENDING", "EXECUTING", "FAILED"]
    assert c8y.operations[operation]["failureReason"] == "payload longer than 51 bytes at SF12"


async def test_downlink_waits_while_the_broker_is_away(
    c8y: FakeCumulocity, make_sink: Callable[..., Any], downlinks: Downlinks
) -> None:
    downlinks.reject = DownlinkRejected("not_connected", "the source broker is not connected")
    downlinks.reject_times = 2
    sink = await make_sink()
    await sink.send(delivery())
    device = c8y.external_ids[("c8y_Serial", DEV)]
    first = c8y.add_operation(device, c8y_Command={"text": "1:01"})
    second = c8y.add_operation(device, c8y_Command={"text": "1:02"})
    await c8y.wait_until(
        lambda: all(c8y.operations[o]["status"] == "SUCCESSFUL" for o in (first, second))
    )
    # Back to PENDING (not FAILED) while the broker was away, and the order kept.
    assert c8y.operation_history[first] == [
        "PENDING",
        *["EXECUTING", "PENDING"] * 2,
        "EXECUTING",
        "SUCCESSFUL",
    ]
    assert c8y.operation_history[second] == ["PENDING", "EXECUTING", "SUCCESSFUL"]
    assert [r.payload for _, r in downlinks.sent] == [b"\x01", b"\x02"]


async def test_malformed_command_fails_without_a_downlink(
    c8y: FakeCumulocity, make_sink: Callable[..., Any], downlinks: Downlinks
) -> None:
    sink = await make_sink()
    await sink.send(delivery())
    device = c8y.external_ids[("c8y_Serial", DEV)]
    operation = c8y.add_operation(device, c8y_Command={"text": "reboot please"})
    restart = c8y.add_operation(device, c8y_Restart={})  # not a downlink: someone else's
    await c8y.wait_until(lambda: c8y.operations[operation]["status"] == "FAILED")
    assert (
        "c8y_Command text must be '<fport>:<hex payload>'"
        in (c8y.operations[operation]["failureReason"])
    )
    assert downlinks.sent == []
    assert c8y.operations[restart]["status"] == "PENDING"


async def test_operations_wait_while_the_daemon_has_no_downlink_path(
    c8y: FakeCumulocity, make_sink: Callable[..., Any]
) -> None:
    sink = await make_sink(with_downlinks=False)
    await sink.send(delivery())
    device = c8y.external_ids[("c8y_Serial", DEV)]
    operation = c8y.add_operation(device, c8y_Command={"text": "2:01"})
    await asyncio.sleep(0.3)  # several poll intervals
    assert c8y.count("GET", "/devicecontrol/") == 0
    assert c8y.operations[operation]["status"] == "PENDING"


async def test_operations_are_not_polled_when_downlinks_are_disabled(
    c8y: FakeCumulocity, make_sink: Callable[..., Any]
) -> None:
    sink = await make_sink(downlinkEnabled=False)
    await sink.send(delivery())
    await asyncio.sleep(0.3)  # several poll intervals
    assert c8y.count("GET", "/devicecontrol/") == 0


async def test_operations_are_polled_at_the_connections_interval(
    c8y: FakeCumulocity, downlinks: Downlinks
) -> None:
    assert config_of(c8y).operationsPollInterval == timedelta(seconds=10)  # the default
    config = config_of(c8y, operationsPollInterval="1s")
    context = SinkContext(timeout=5, max_in_flight=2, downlink=downlinks)
    sink = CumulocitySink("c8y", config, context)  # the interval from the configuration
    started = time.monotonic()
    await sink.start()
    try:
        await sink.send(delivery())
        # The first round at start sees no device; the next two poll the one just seen,
        # each after an interval: about 2 s, where the default would take 20.
        await c8y.wait_until(lambda: c8y.count("GET", "/devicecontrol/operations") >= 2, timeout=8)
        assert time.monotonic() - started >= 2.0
    finally:
        await sink.close()


async def test_poll_survives_a_tenant_outage(
    c8y: FakeCumulocity, make_sink: Callable[..., Any], downlinks: Downlinks
) -> None:
    sink = await make_sink()
    await sink.send(delivery())
    device = c8y.external_ids[("c8y_Serial", DEV)]
    c8y.fail(503, path="/devicecontrol/", times=3)
    operation = c8y.add_operation(device, c8y_Command={"text": "3:cafe"})
    await c8y.wait_until(lambda: c8y.operations[operation]["status"] == "SUCCESSFUL")
    assert downlinks.sent[0][1].payload == b"\xca\xfe"


def test_downlink_request_shapes() -> None:
    def parse(**fragments: Any) -> DownlinkRequest | str | None:
        return downlink_request({"id": "9", **fragments}, DEV, None)

    assert parse(c8y_Command={"text": " 1 : 0a 0b "}) == DownlinkRequest(
        DEV, 1, b"\n\x0b", False, "9"
    )
    assert parse(c8y_LoRaDownlink={"fPort": "7", "payloadHex": "ff"}) == DownlinkRequest(
        DEV, 7, b"\xff", False, "9"
    )
    # The structured fragment wins when both are there.
    assert parse(
        c8y_Command={"text": "1:00"}, c8y_LoRaDownlink={"fPort": 2, "payloadHex": "01"}
    ) == DownlinkRequest(DEV, 2, b"\x01", False, "9")
    assert parse(c8y_Restart={}) is None
    for bad in ("0:00", "224:00", "2:", "2:0", "2:zz", "hello"):
        assert isinstance(parse(c8y_Command={"text": bad}), str), bad
    assert "downlinkPort" in str(parse(c8y_Command={"text": "00ff"}))
    assert downlink_request({"c8y_Command": {"text": "00ff"}}, DEV, 5) == DownlinkRequest(
        DEV, 5, b"\x00\xff"
    )
    assert isinstance(parse(c8y_LoRaDownlink={"fPort": True, "payloadHex": "00"}), str)
    assert isinstance(parse(c8y_LoRaDownlink={"fPort": 1, "payloadHex": 5}), str)


# -- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host_name", "url"),
    [
        ("tpx.eu-latest.cumulocity.com", "https://tpx.eu-latest.cumulocity.com"),
        ("https://c8y.example.com/", "https://c8y.example.com"),
        ("c8y.example.com:8443", "https://c8y.example.com:8443"),
        ("http://127.0.0.1:8443", "http://127.0.0.1:8443"),
        ("HTTP://localhost:80", "http://localhost"),
        ("[::1]:9443", "https://[::1]:9443"),
    ],
)
def test_host_name_becomes_the_base_url(host_name: str, url: str) -> None:
    assert base_url(host_name) == url


def _configure(**config: Any) -> CumulocityConfig:
    document = {
        "id": "x",
        "name": "x",
        "connectorId": "actility-cumulocity-iot",
        "configuration": {
            "hostName": "c8y.example.com",
            "tenantId": "t1",
            "username": "u",
            "password": "p",
            **config,
        },
    }
    configuration = parse_connection(document).configuration
    assert isinstance(configuration, CumulocityConfig)
    return configuration


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hostName", "ftp://c8y.example.com"),
        ("hostName", "c8y.example.com/tenant"),
        ("hostName", "c8y.example.com:70000"),
        ("username", "with:colon"),
        ("tenantId", "a/b"),
        ("hostName", "[75]:8443"),
        ("trustedCaCertficate", "not a certificate"),
        ("trustedCaCertficate", "\u00a0 not ASCII"),
        ("operationsPollInterval", "500ms"),
        ("operationsPollInterval", "2h"),
        ("operationsPollInterval", "often"),
    ],
)
def test_bad_configuration_names_the_field(field: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _configure(**{field: value})
    assert [p.path for p in caught.value.problems] == [f"configuration.{field}"]


def test_trusted_ca_certificate_is_accepted(ca_pem: str) -> None:
    assert _configure(trustedCaCertficate=ca_pem).trustedCaCertficate == ca_pem


@pytest.fixture(scope="module")
def ca_pem() -> Iterator[str]:
    """A self-signed CA made with the openssl command line (no Python crypto dependency)."""
    with tempfile.TemporaryDirectory() as directory:
        key, cert = Path(directory, "ca.key"), Path(directory, "ca.pem")
        command = "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=iotflow-test-CA"
        subprocess.run(
            [*command.split(), "-keyout", str(key), "-out", str(cert)],
            check=True,
            capture_output=True,
        )
        yield cert.read_text()
