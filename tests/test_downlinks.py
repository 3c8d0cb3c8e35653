"""Downlinks without a broker: parsing, rendering per network server, the HTTP signature,
the device directory and the service's checks (on a real SQLite registry)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st

from fixtures_path import FIXTURES
from iotflow.api.models import DownlinkInput
from iotflow.api.server import openapi_document
from iotflow.config.model import DownlinkSettings
from iotflow.connectors.connection import parse_connection
from iotflow.downlinks import REASONS, DownlinkRejected, DownlinkRequest, parse_downlink
from iotflow.downlinks.directory import DeviceDirectory
from iotflow.downlinks.network import render_downlink
from iotflow.downlinks.parse import MAX_PAYLOAD_BYTES
from iotflow.downlinks.service import Downlinks
from iotflow.downlinks.signature import ReplayGuard, Unauthorized, sign, signed_query, verify
from iotflow.errors import RegistryError
from iotflow.formats import decode
from iotflow.registry import SqliteStore, Store
from iotflow.telemetry.metrics import Metrics
from support.clock import SteppedSleep

DEV = "0018B20000000B20"


def body(value: Any) -> bytes:
    return orjson.dumps(value)


def thingpark(**fields: Any) -> bytes:
    return body({"DevEUI_downlink": {"DevEUI": DEV, "FPort": 1, "payload_hex": "01ab", **fields}})


def rejected(raw: bytes, reason: str, **kw: Any) -> DownlinkRejected:
    with pytest.raises(DownlinkRejected) as caught:
        parse_downlink(raw, **kw)
    assert caught.value.reason == reason, caught.value.message
    assert caught.value.reason in REASONS
    return caught.value


# -- parse: the two shapes -----------------------------------------------------------------


def test_thingpark_document() -> None:
    request = parse_downlink(thingpark(Confirmed=1, CorrelationID="4434704901C7450B"))
    assert request == DownlinkRequest(DEV, 1, b"\x01\xab", True, "4434704901C7450B")


def test_thingpark_numbers_as_strings() -> None:
    # As older ThingPark releases write every number.
    raw = body(
        {
            "DevEUI_downlink": {
                "DevEUI": "0018b20000000b20",
                "FPort": "12",
                "payload_hex": "9E1C",
                "Confirmed": "1",
            }
        }
    )
    assert parse_downlink(raw) == DownlinkRequest(DEV, 12, b"\x9e\x1c", True)
    assert parse_downlink(thingpark(Confirmed="0")).confirmed is False
    assert parse_downlink(thingpark(Confirmed="true")).confirmed is True


def test_thingpark_optional_fields_are_ignored() -> None:
    # The product's own example of optional fields, payload_hex instead of a driver payload.
    raw = thingpark(
        Time="2019-07-10T15:38:46.882+02:00",
        AS_ID="TWA_199983788.1972.AS",
        AS_KEY="9311e22d7d44fc52215b0dc154aa1d22",
        ValidityTime="2019-07-10T16:38:46.882+02:00",
        FlushDownlinkQueue="1",
        DriverCfg={"app": {"pId": "abeeway", "mId": "asset-tracker", "ver": "1"}},
    )
    assert parse_downlink(raw) == DownlinkRequest(DEV, 1, b"\x01\xab")


def test_flat_object() -> None:
    raw = body({"payload_hex": "00ff", "FPort": 5, "DevEUI": "00-18-B2-00-00-00-0B-20"})
    assert parse_downlink(raw) == DownlinkRequest(DEV, 5, b"\x00\xff")
    raw = body({"payload_hex": "", "fPort": 5, "devEUI": DEV, "confirmed": True})
    assert parse_downlink(raw) == DownlinkRequest(DEV, 5, b"", True)
    raw = body({"payload_hex": "01", "FPort": 5, "DevEUI": DEV, "correlationId": "abc"})
    assert parse_downlink(raw).correlation_id == "abc"


def test_dev_eui_from_the_topic() -> None:
    raw = body({"payload_hex": "01", "FPort": 2})
    assert parse_downlink(raw, dev_eui="0018b20000000b20").dev_eui == DEV
    # In both places: they must agree, whatever their spelling.
    assert parse_downlink(thingpark(DevEUI="0018b20000000b20"), dev_eui=DEV).dev_eui == DEV


def test_missing_port_is_the_connections_downlink_port() -> None:
    raw = body({"DevEUI_downlink": {"DevEUI": DEV, "payload_hex": "01"}})
    assert parse_downlink(raw, default_port=7).f_port == 7
    assert parse_downlink(thingpark(FPort=3), default_port=7).f_port == 3  # given wins
    assert parse_downlink(thingpark(FPort=None), default_port=9).f_port == 9  # null is absent


def test_payload_limits() -> None:
    largest = "ab" * MAX_PAYLOAD_BYTES
    assert len(parse_downlink(thingpark(payload_hex=largest)).payload) == MAX_PAYLOAD_BYTES
    rejected(thingpark(payload_hex=largest + "ab"), "bad_payload")
    assert parse_downlink(thingpark(payload_hex="")).payload == b""


# -- parse: every reason it refuses for ----------------------------------------------------


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b"[1, 2]", b'"DevEUI"', b"42"])
def test_not_json(raw: bytes) -> None:
    rejected(raw, "not_json")


@pytest.mark.parametrize(
    "raw",
    [
        body({"DevEUI_downlink": "0018B20000000B20"}),
        body({"DevEUI_downlink": None}),
        body({"DevEUI": DEV, "FPort": 1}),  # no payload of any kind: not a downlink
        body({}),
        thingpark(Confirmed="yes"),
        thingpark(Confirmed=2),
        thingpark(CorrelationID=["x"]),
        thingpark(CorrelationID="x" * 129),
        b" " * (16 * 1024 + 1),
    ],
)
def test_wrong_shape(raw: bytes) -> None:
    rejected(raw, "wrong_shape")


def test_bad_dev_eui() -> None:
    error = rejected(body({"DevEUI_downlink": {"FPort": 1, "payload_hex": "01"}}), "bad_dev_eui")
    assert error.path == "DevEUI_downlink.DevEUI"
    assert "missing" in error.message
    rejected(thingpark(DevEUI="0018B20000000B2"), "bad_dev_eui")
    rejected(thingpark(DevEUI="0018B20000000B2G"), "bad_dev_eui")
    rejected(thingpark(DevEUI=18), "bad_dev_eui")
    rejected(body({"payload_hex": "01", "FPort": 1}), "bad_dev_eui")
    # The topic names another device than the body: one of them is a mistake.
    error = rejected(thingpark(), "bad_dev_eui", dev_eui="0018B20000000B21")
    assert "0018B20000000B21" in error.message
    rejected(body({"payload_hex": "01", "FPort": 1}), "bad_dev_eui", dev_eui="not-a-eui")


@pytest.mark.parametrize("port", [0, 224, 255, -1, "0", "abc", "1.0", True, 1.5, [1], ""])
def test_bad_port(port: Any) -> None:
    error = rejected(thingpark(FPort=port), "bad_port")
    assert error.path == "DevEUI_downlink.FPort"


def test_missing_port_without_a_default() -> None:
    error = rejected(body({"DevEUI_downlink": {"DevEUI": DEV, "payload_hex": "01"}}), "bad_port")
    assert "downlinkPort" in error.message


@pytest.mark.parametrize("payload", ["abc", "zz", "01 02", "0x01", 1234, None, ["01"], "é1"])
def test_bad_payload(payload: Any) -> None:
    rejected(thingpark(payload_hex=payload), "bad_payload")


def test_payloads_only_a_driver_or_thingpark_could_use() -> None:
    # A decoded payload is kept for the device's driver (the service encodes it or says why).
    raw = body({"DevEUI_downlink": {"DevEUI": DEV, "FPort": 1, "payload": {"DownMessageType": 1}}})
    request = parse_downlink(raw)
    assert (request.payload, request.data) == (b"", {"DownMessageType": 1})
    error = rejected(thingpark(FCntDn=12), "bad_payload")
    assert error.path == "DevEUI_downlink.FCntDn"


def outcome(raw: bytes, **kw: Any) -> str:
    """ "parsed", or the reason of the rejection: never another exception."""
    try:
        parse_downlink(raw, **kw)
    except DownlinkRejected as exc:
        return exc.reason
    return "parsed"


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_are_rejected(raw: bytes) -> None:
    assert outcome(raw, default_port=1) in ("parsed", *REASONS)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
FIELDS = st.sampled_from(
    ["DevEUI", "FPort", "payload_hex", "Confirmed", "CorrelationID", "FCntDn", "payload"]
)


@given(st.dictionaries(FIELDS, JSON, max_size=7), st.booleans())
def test_any_document_parses_or_is_rejected(fields: dict[str, Any], wrapped: bool) -> None:
    document = {"DevEUI_downlink": fields} if wrapped else fields
    # The standard library's encoder: orjson refuses integers beyond 64 bits on output.
    assert outcome(json.dumps(document).encode()) in ("parsed", *REASONS)


@given(
    st.binary(min_size=8, max_size=8).map(lambda b: b.hex()),
    st.integers(1, 223),
    st.binary(max_size=MAX_PAYLOAD_BYTES),
    st.booleans(),
    st.booleans(),
)
def test_what_thingpark_writes_reads_back(
    eui: str, port: int, payload: bytes, confirmed: bool, as_strings: bool
) -> None:
    inner: dict[str, Any] = {
        "DevEUI": eui,
        "FPort": str(port) if as_strings else port,
        "payload_hex": payload.hex(),
        "Confirmed": str(int(confirmed)) if as_strings else int(confirmed),
    }
    request = parse_downlink(body({"DevEUI_downlink": inner}))
    assert request == DownlinkRequest(eui.upper(), port, payload, confirmed)


# -- rendering for each network server, from the fixtures' identifiers ---------------------


def source_of(fixture: str, fmt: str) -> tuple[str, dict[str, str]]:
    uplink = decode(fmt, (FIXTURES / fixture).read_bytes())
    return uplink.dev_eui, uplink.source


def test_chirpstack_command_down() -> None:
    dev_eui, source = source_of("chirpstack_up.json", "chirpstack")
    request = DownlinkRequest(dev_eui, 10, b"\x01\x02\x03", confirmed=True)
    downlink = render_downlink("chirpstack", source, request)
    assert downlink.topic == (
        "application/17c82e96-be03-4f38-aef3-f83d48582d97/device/a840414fc182f6c2/command/down"
    )
    assert downlink.body == {
        "devEui": "a840414fc182f6c2",
        "confirmed": True,
        "fPort": 10,
        "data": "AQID",
    }
    assert orjson.loads(downlink.payload()) == downlink.body


def test_tts_down_push() -> None:
    dev_eui, source = source_of("tts_up.json", "tts")
    downlink = render_downlink("tts", source, DownlinkRequest(dev_eui, 2, b"\xca\xfe"))
    assert downlink.topic == "v3/demo-app@ttn/devices/eui-70b3d57ed005a1b2/down/push"
    assert downlink.body == {
        "downlinks": [{"f_port": 2, "frm_payload": "yv4=", "priority": "NORMAL"}]
    }
    confirmed = DownlinkRequest(dev_eui, 2, b"\xca\xfe", confirmed=True, correlation_id="c-1")
    (item,) = render_downlink("tts", source, confirmed).body["downlinks"]
    assert item["confirmed"] is True
    assert item["correlation_ids"] == ["iotflow:c-1"]


def test_thingpark_downlink() -> None:
    dev_eui, source = source_of("actility_uplink.json", "actility")
    assert source == {}  # the DevEUI is all ThingPark needs
    now = datetime(2026, 11, 22, 9, 30, 0, 123000, tzinfo=UTC)
    request = DownlinkRequest(dev_eui, 1, b"\x9e\x1c", correlation_id="4434704901C7450B")
    downlink = render_downlink("actility", source, request, now=now)
    assert downlink.topic == "tpx/things/0018B20000000B20/downlink"
    assert downlink.body == {
        "DevEUI_downlink": {
            "Time": "2026-11-22T09:30:00.123+00:00",
            "DevEUI": "0018B20000000B20",
            "FPort": 1,
            "payload_hex": "9e1c",
            "Confirmed": 0,
            "CorrelationID": "4434704901C7450B",
        }
    }
    custom = render_downlink(
        "actility", {}, request, actility_topic="lns/{DevEUI}/down/{FPort}", now=now
    )
    assert custom.topic == "lns/0018B20000000B20/down/1"


@pytest.mark.parametrize(
    ("fmt", "source"),
    [
        ("chirpstack", {}),
        ("chirpstack", {"applicationId": "a/b"}),
        ("chirpstack", {"applicationId": "+"}),
        ("tts", {"application_id": "app", "tenant_id": "ttn"}),
        ("tts", {"application_id": "app", "tenant_id": "ttn", "device_id": "#"}),
        ("lorawan-server", {}),
    ],
)
def test_identifiers_that_cannot_address_a_downlink(fmt: str, source: dict[str, str]) -> None:
    with pytest.raises(DownlinkRejected) as caught:
        render_downlink(fmt, source, DownlinkRequest(DEV, 1, b""))
    assert caught.value.reason == "unknown_device"


def test_actility_topic_setting_is_checked() -> None:
    assert DownlinkSettings().actility_topic == "tpx/things/{DevEUI}/downlink"
    for bad in ("tpx/+/{DevEUI}", "tpx/{DevEUI", "tpx/#"):
        with pytest.raises(ValueError, match="actility_topic"):
            DownlinkSettings(actility_topic=bad)


# -- the HTTP signature --------------------------------------------------------------------


def test_with_an_empty_body_the_token_is_thingparks() -> None:
    # The example of KPN's ThingPark guide for downlinks to its LRC (query, then AS key).
    query = (
        "DevEUI=000000000F1D8693&FPort=1&Payload=00&AS_ID=app1.sample.com&Time=2016-01-11T14:28:00"
    )
    assert sign(query, b"", "46ab678cd45df4a4e4b375Eacd096acc") == (
        "b5a84fe9c8921e9de359e3041a37b76c4b122f6f9b83577b5596c842052f7e62"
    )


def test_the_signed_query_is_decoded_and_leaves_the_token_out() -> None:
    raw = "AS_ID=as%201&Time=2026-11-22T10:00:00.000%2B01:00&Token=ABC"
    assert signed_query(raw) == (
        "AS_ID=as 1&Time=2026-11-22T10:00:00.000+01:00",
        {"AS_ID": "as 1", "Time": "2026-11-22T10:00:00.000+01:00"},
        "ABC",
    )
    # A '+' sent as it is stays the offset's sign (not a form-encoded space).
    assert signed_query("Time=2026-11-22T10:00:00+01:00")[0] == "Time=2026-11-22T10:00:00+01:00"


NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
WINDOW = timedelta(minutes=5)


def signed(body: bytes, *, key: str = "k3y", as_id: str = "AS1", at: datetime = NOW) -> str:
    query = f"AS_ID={as_id}&Time={at.isoformat()}"
    return f"{query}&Token={sign(query, body, key)}"


def check(raw_query: str, body: bytes = b"{}", **kw: Any) -> tuple[str, datetime]:
    options: dict[str, Any] = {"as_id": "AS1", "key": "k3y", "now": NOW, "max_deviation": WINDOW}
    return verify(raw_query, body, **{**options, **kw})


def test_a_signed_request_verifies() -> None:
    token, sent_at = check(signed(b"{}"))
    assert sent_at == NOW
    assert token == sign(f"AS_ID=AS1&Time={NOW.isoformat()}", b"{}", "k3y")
    # Upper-case hex is the same token; a Time within the window passes.
    check(signed(b"{}").replace(token, token.upper()))
    check(signed(b"{}", at=NOW - timedelta(minutes=4)))


@pytest.mark.parametrize(
    ("raw_query", "body", "options", "why"),
    [
        ("", b"{}", {}, "missing"),
        (f"AS_ID=AS1&Time={NOW.isoformat()}", b"{}", {}, "missing"),
        (signed(b"{}"), b'{"changed": 1}', {}, "does not match"),
        (signed(b"{}", key="other"), b"{}", {}, "does not match"),
        (signed(b"{}", as_id="AS2"), b"{}", {}, "does not match"),
        (signed(b"{}", at=NOW - timedelta(minutes=6)), b"{}", {}, "from the server's clock"),
        (signed(b"{}", at=NOW + timedelta(minutes=6)), b"{}", {}, "from the server's clock"),
        (signed(b"{}").replace("+00:00", ""), b"{}", {}, "ISO 8601"),
        (signed(b"{}"), b"{}", {"key": None}, "no downlinkAsId"),
        (signed(b"{}"), b"{}", {"as_id": None}, "no downlinkAsId"),
    ],
)
def test_what_does_not_verify(
    raw_query: str, body: bytes, options: dict[str, Any], why: str
) -> None:
    with pytest.raises(Unauthorized, match=why):
        check(raw_query, body, **options)


def test_a_token_is_accepted_once() -> None:
    guard = ReplayGuard()
    guard.use("t1", datetime.now(UTC), WINDOW)
    guard.use("t2", datetime.now(UTC), WINDOW)
    for _ in range(2):
        with pytest.raises(Unauthorized, match="used already"):
            guard.use("t1", datetime.now(UTC), WINDOW)
    # Forgotten once its Time is out of the window (where verify refuses it anyway).
    guard.use("old", datetime.now(UTC) - 2 * WINDOW, WINDOW)
    guard.use("t3", datetime.now(UTC), WINDOW)
    guard.use("old", datetime.now(UTC) - 2 * WINDOW, WINDOW)


# -- the device directory, on a real SQLite registry ---------------------------------------


class CountingStore(SqliteStore):
    """The real store, counting its device-source writes and failing on demand."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.writes: list[tuple[str, str, dict[str, str]]] = []
        self.transactions = 0
        self.failing = False

    async def remember_device_sources(
        self, sources: Sequence[tuple[str, str, Mapping[str, str]]]
    ) -> None:
        if self.failing:
            raise RegistryError("registry database error: disk I/O error")
        self.transactions += 1
        self.writes.extend((dev_eui, fmt, dict(source)) for dev_eui, fmt, source in sources)
        await super().remember_device_sources(sources)


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[CountingStore]:
    store = CountingStore(tmp_path / "registry.db")
    await store.migrate()
    yield store
    await store.close()


async def settled(directory: DeviceDirectory) -> None:
    async with asyncio.timeout(5):
        while directory.pending:  # noqa: ASYNC110 - a test watching a background task
            await asyncio.sleep(0.01)


CS = {"applicationId": "app-1", "devEui": "a840414fc182f6c2", "tenantId": "t"}


async def test_the_directory_writes_only_what_changed(store: CountingStore) -> None:
    directory = DeviceDirectory(store)
    directory.start()
    try:
        for _ in range(50):
            directory.remember("A840414FC182F6C2", "chirpstack", dict(CS))
        directory.remember(DEV, "actility", {})
        await settled(directory)
        assert store.writes == [("A840414FC182F6C2", "chirpstack", CS), (DEV, "actility", {})]
        directory.remember("A840414FC182F6C2", "chirpstack", dict(CS))
        # The device moved to another network server: written again.
        tts = {"application_id": "app", "device_id": "d", "tenant_id": "ttn"}
        directory.remember("A840414FC182F6C2", "tts", tts)
        await settled(directory)
        assert store.writes[-1] == ("A840414FC182F6C2", "tts", tts)
        assert len(store.writes) == 3
        assert await directory.lookup("A840414FC182F6C2") == ("tts", tts)
        assert await directory.lookup("0018B20000000001") is None
    finally:
        await directory.close()
    # Another instance, or this one after a restart, reads it from the registry.
    assert await DeviceDirectory(store).lookup(DEV) == ("actility", {})


async def test_a_fleets_first_uplinks_are_written_in_a_few_transactions(
    store: CountingStore,
) -> None:
    """A commit per device cost a millisecond of the loop each: 1,200 devices heard for the
    first time (a start, a new fleet) are written in batches, each device once."""
    directory = DeviceDirectory(store)
    devices = [f"0018B2{n:010X}" for n in range(1200)]
    for dev_eui in devices:
        directory.remember(dev_eui, "actility", {})
    directory.start()
    try:
        await settled(directory)
    finally:
        await directory.close()
    assert sorted(w[0] for w in store.writes) == devices
    assert store.transactions == 3  # 500 per transaction
    for dev_eui in (devices[0], devices[-1]):
        assert await DeviceDirectory(store).lookup(dev_eui) == ("actility", {})


async def test_the_directory_keeps_writes_while_the_registry_fails(store: CountingStore) -> None:
    store.failing = True
    sleep = SteppedSleep()
    directory = DeviceDirectory(store, retry_initial=0.01, retry_max=0.05, sleep=sleep)
    directory.start()
    try:
        directory.remember(DEV, "actility", {})
        await sleep.until(1)  # the write failed: the directory waits before trying again
        for attempt in range(2, 6):
            await sleep.step()
            await sleep.until(attempt)
        assert directory.pending == 1
        assert await directory.lookup(DEV) == ("actility", {})  # pending is the newest
        # Doubling from retry_initial up to retry_max, as before the one backoff policy.
        assert sleep.waits == [0.01, 0.02, 0.04, 0.05, 0.05]
        assert store.writes == []
        store.failing = False
        await sleep.step()
        await settled(directory)
        assert await store.device_source(DEV) == ("actility", {})
    finally:
        await directory.close()


async def test_closing_writes_what_is_pending(store: CountingStore) -> None:
    directory = DeviceDirectory(store)  # never started: only close writes
    directory.remember(DEV, "actility", {})
    await directory.close()
    assert await store.device_source(DEV) == ("actility", {})


# -- the service: every check before a downlink is published -------------------------------


class Broker:
    """Stands for the source broker's publish: what was published, or why it fails."""

    def __init__(self) -> None:
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.error: Exception | None = None
        self.hang = False

    async def __call__(self, topic: str, payload: bytes) -> None:
        if self.hang:
            await asyncio.sleep(3600)
        if self.error is not None:
            raise self.error
        self.published.append((topic, orjson.loads(payload)))


def http_connection(cid: str, **config: Any) -> Any:
    return parse_connection(
        {
            "id": cid,
            "name": cid,
            "connectorId": "actility-http-iot",
            "brand": "CAYENNE",
            "configuration": config,
        }
    )


class Harness:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.broker = Broker()
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.metrics = Metrics()
        self.directory = DeviceDirectory(store)
        self.settings = DownlinkSettings(publish_timeout=timedelta(milliseconds=200))
        # What the daemon learns from each routed uplink: device → {connection: its driver}.
        self.routes: dict[str, dict[str, str | None]] = {}
        self.encoded: list[tuple[str, Any, int]] = []
        self.downlinks = Downlinks(
            store=store,
            directory=self.directory,
            publish=self.broker,
            record=lambda cid, kind, data: self.events.append((cid, kind, data)),
            metrics=self.metrics,
            settings=lambda: self.settings,
            routes=lambda dev_eui: self.routes.get(dev_eui, {}),
            encode=self.encode,
        )

    async def encode(self, driver_id: str, data: Any, f_port: int) -> tuple[bytes, int | None]:
        """A stand-in encodeDownlink: `{"raise": ...}` is a codec fault; else 2 bytes, port 9."""
        self.encoded.append((driver_id, data, f_port))
        if "raise" in data:
            raise RuntimeError(data["raise"])
        return bytes([data["level"], f_port]), 9

    def count(self, connection: str, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "iotflow_downlinks_total", {"connection": connection, "outcome": outcome}
        )
        return value or 0.0

    async def refused(self, cid: str, request: DownlinkRequest, reason: str) -> str:
        with pytest.raises(DownlinkRejected) as caught:
            await self.downlinks(cid, request)
        assert caught.value.reason == reason, caught.value.message
        return caught.value.message


@pytest_asyncio.fixture
async def harness(store: CountingStore) -> Harness:
    await store.create_connection(http_connection("mine"))
    await store.create_connection(http_connection("other"))
    await store.create_connection(http_connection("muted", downlinkEnabled=False))
    await store.create_connection(
        parse_connection(
            {
                "id": "off",
                "name": "off",
                "connectorId": "actility-http-iot",
                "brand": "CAYENNE",
                "active": False,
            }
        )
    )
    await store.set_device(DEV, ["mine", "muted", "off"])
    await store.set_device("A840414FC182F6C2", ["other"])
    return Harness(store)


async def test_a_downlink_is_published_and_recorded(harness: Harness) -> None:
    harness.directory.remember(DEV, "actility", {})
    request = DownlinkRequest(DEV, 3, b"\x01\x02", confirmed=True, correlation_id="c-9")
    sent = await harness.downlinks.send("mine", request)
    assert (sent.topic, sent.f_port, sent.size) == ("tpx/things/0018B20000000B20/downlink", 3, 2)
    ((topic, document),) = harness.broker.published
    assert topic == sent.topic
    assert document["DevEUI_downlink"]["payload_hex"] == "0102"
    assert harness.events == [
        (
            "mine",
            "downlink_sent",
            {
                "devEUI": DEV,
                "fPort": 3,
                "size": 2,
                "confirmed": True,
                "topic": "tpx/things/0018B20000000B20/downlink",
                "correlationId": "c-9",
            },
        )
    ]
    assert harness.count("mine", "sent") == 1


async def test_the_service_refuses_with_a_reason(harness: Harness) -> None:
    request = DownlinkRequest(DEV, 1, b"\x01")
    message = await harness.refused("mine", request, "unknown_device")
    assert "no uplink" in message
    harness.directory.remember(DEV, "actility", {})
    # A cloud commands its own devices only.
    other = DownlinkRequest("A840414FC182F6C2", 1, b"\x01")
    harness.directory.remember("A840414FC182F6C2", "chirpstack", dict(CS))
    message = await harness.refused("mine", other, "unknown_device")
    assert "not bound to connection 'mine'" in message
    await harness.refused("mine", DownlinkRequest("0018B2000000FFFF", 1, b""), "unknown_device")
    assert "downlinkEnabled" in await harness.refused("muted", request, "disabled")
    assert "deactivated" in await harness.refused("off", request, "disabled")
    await harness.refused("ghost", request, "disabled")
    harness.broker.error = ConnectionError("not connected to the broker")
    await harness.refused("mine", request, "not_connected")
    harness.broker.error = None
    harness.broker.hang = True
    assert "in time" in await harness.refused("mine", request, "not_connected")
    assert harness.broker.published == []
    kinds = [(cid, kind, data["reason"]) for cid, kind, data in harness.events]
    assert kinds == [
        ("mine", "downlink_rejected", "unknown_device"),
        ("mine", "downlink_rejected", "unknown_device"),
        ("mine", "downlink_rejected", "unknown_device"),
        ("muted", "downlink_rejected", "disabled"),
        ("off", "downlink_rejected", "disabled"),
        # nothing for "ghost": it has no event log, and no metric series is made up for it
        ("mine", "downlink_rejected", "not_connected"),
        ("mine", "downlink_rejected", "not_connected"),
    ]
    assert harness.count("mine", "unknown_device") == 3
    assert harness.count("mine", "not_connected") == 2
    assert harness.count("ghost", "disabled") == 0


async def test_a_decoded_payload_is_encoded_by_the_flows_driver(harness: Harness) -> None:
    flowed = "0018B2000000F10A"  # routed to "other" by a flow only, with a driver
    harness.directory.remember(flowed, "actility", {})
    request = DownlinkRequest(flowed, 3, b"", data={"level": 7})
    # Not bound, not routed: not this connection's device.
    assert "not bound" in await harness.refused("other", request, "unknown_device")
    harness.routes[flowed] = {"other": None}  # routed by a flow without a driver
    assert "no flow with a driver" in await harness.refused("other", request, "bad_payload")
    harness.routes[flowed] = {"other": "acme:valve:1"}
    sent = await harness.downlinks.send("other", request)
    assert harness.encoded == [("acme:valve:1", {"level": 7}, 3)]
    assert (sent.f_port, sent.size) == (9, 2)  # the codec's fPort and bytes
    ((_, document),) = harness.broker.published
    assert document["DevEUI_downlink"]["payload_hex"] == "0703"
    failing = DownlinkRequest(flowed, 3, b"", data={"raise": "no such level"})
    message = await harness.refused("other", failing, "bad_payload")
    assert "acme:valve:1 could not encode payload: no such level" in message
    assert len(harness.broker.published) == 1


async def test_each_network_server_gets_its_own_format(harness: Harness) -> None:
    await harness.store.set_device("A840414FC182F6C2", ["mine"])
    await harness.store.set_device("70B3D57ED005A1B2", ["mine"])
    for fixture, fmt in (("chirpstack_up.json", "chirpstack"), ("tts_up.json", "tts")):
        dev_eui, source = source_of(fixture, fmt)
        harness.directory.remember(dev_eui, fmt, source)
        await harness.downlinks("mine", DownlinkRequest(dev_eui, 4, b"\xff"))
    (cs_topic, cs_body), (tts_topic, tts_body) = harness.broker.published
    assert cs_topic.endswith("/device/a840414fc182f6c2/command/down")
    assert base64.b64decode(cs_body["data"]) == b"\xff"
    assert tts_topic == "v3/demo-app@ttn/devices/eui-70b3d57ed005a1b2/down/push"
    assert tts_body["downlinks"][0]["f_port"] == 4


def test_reasons_are_a_small_fixed_set() -> None:
    assert set(REASONS) == {
        "not_json",
        "wrong_shape",
        "bad_dev_eui",
        "bad_port",
        "bad_payload",
        "unknown_device",
        "disabled",
        "not_connected",
    }


# -- the OpenAPI document describes the route as it behaves ----------------------------------


def test_the_openapi_document_describes_downlinks() -> None:
    operation = openapi_document()["paths"]["/iot-flow/v1/downlinkMessages/{id}"]["post"]
    assert operation["security"] == [{"downlinkToken": []}]  # not the bearer token
    assert [p["name"] for p in operation["parameters"]] == ["id", "AS_ID", "Time", "Token"]
    assert set(operation["responses"]) == {"202", "401", "404", "413", "415", "422", "503"}
    # What the schema accepts, the parser accepts, and the other way round for these.
    for document in (
        {"DevEUI_downlink": {"DevEUI": DEV, "FPort": "1", "payload_hex": "00", "Confirmed": "1"}},
        {"DevEUI": "0018b200-0000-0b20", "FPort": 7, "payload_hex": "", "confirmed": True},
        {"DevEUI_downlink": {"DevEUI": DEV, "payload_hex": "ab", "AS_KEY": "x"}},
    ):
        DownlinkInput.model_validate(document)
        parse_downlink(body(document), default_port=1)
