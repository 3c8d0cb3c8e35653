"""ThingsBoard, Splunk HEC and InfluxDB (issue #18): what each sink makes of an uplink (pure),
their configurations, and the local doubles of the three APIs (tests/support/webdoubles.py)
behaving as the services document it. The sinks against the doubles through a worker are
in test_sink_contract.py; through `iotflow run` in test_e2e_web_connectors.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st

from iotflow.config.types import MASK, unmask
from iotflow.connectors import parse_connection
from iotflow.errors import ConfigError, PermanentSinkError
from iotflow.formats import decode
from iotflow.sinks import SinkContext, create_sink
from iotflow.sinks import lineprotocol as lp
from iotflow.sinks.influxdb import fields, point
from iotflow.sinks.points import values
from iotflow.sinks.splunk import SplunkSink, hec_detail
from iotflow.sinks.thingsboard import ThingsBoardSink, telemetry
from iotflow.spool import Delivery
from support.uplinks import actility
from support.webdoubles import (
    FakeInfluxDb,
    FakeSplunkHec,
    FakeThingsBoard,
    LineError,
    parse_line,
)

DEV = "0018B20000000B20"
AT = datetime(2026, 11, 30, 12, 0, 0, 250000, tzinfo=UTC)
AT_MS = 1_796_040_000_250  # 2026-11-30T12:00:00.250Z


def document(decoded: dict[str, Any] | None = None, **inner: Any) -> bytes:
    doc = actility(DEV, 7, at=AT)
    if decoded is not None:
        doc["DevEUI_uplink"]["payload"] = decoded
    doc["DevEUI_uplink"].update(inner)
    return orjson.dumps(doc)


def delivery(body: bytes) -> Delivery:
    return Delivery(1, "c", DEV, AT.timestamp(), AT.timestamp(), body)


def connection(connector: str, **configuration: Any) -> Any:
    return parse_connection(
        {"id": "c", "name": "c", "connectorId": connector, "configuration": configuration}
    )


CONTEXT = SinkContext(timeout=5, max_in_flight=1)


# -- line protocol -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("measurement", "expected"),
    [
        ("my Measurement", "my\\ Measurement"),
        ("my,Measurement", "my\\,Measurement"),
        ("a=b", "a=b"),  # `=` is not special in a measurement
        ('say "hi"', 'say\\ "hi"'),
        ("back\\slash", "back\\\\slash"),
        ("two\nlines", "two\\ lines"),
    ],
)
def test_measurement_escaping(measurement: str, expected: str) -> None:
    assert lp.measurement(measurement) == expected


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("tag Key", "tag\\ Key"),
        ("tag,Key", "tag\\,Key"),
        ("tag=Key", "tag\\=Key"),
        ('"quoted"', '"quoted"'),  # quotes are literal outside string field values
        ("ends with\\", "ends\\ with\\\\"),  # a trailing backslash would escape what follows
    ],
)
def test_key_and_tag_value_escaping(key: str, expected: str) -> None:
    assert lp.name(key) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("hello", '"hello"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("C:\\path\\", '"C:\\\\path\\\\"'),
        ("a,b c=d", '"a,b c=d"'),  # nothing else is escaped inside quotes
        (True, "true"),
        (False, "false"),
        (21, "21.0"),  # a plain int is a float: one type for 21 and 21.5
        (21.5, "21.5"),
        (1e20, "1e+20"),
        (lp.Integer(42), "42i"),
        (lp.Integer(-(2**63)), f"{-(2**63)}i"),
        (lp.Integer(2**63), None),  # out of the int64 range
        (float("nan"), None),
        (float("inf"), None),
    ],
)
def test_field_values(value: lp.FieldValue, expected: str | None) -> None:
    assert lp.field_value(value) == expected


def test_a_line_as_documented() -> None:
    text = lp.line(
        "home climate",
        [("room", "Living Room"), ("floor", "1")],
        {"temp": 21, "count": lp.Integer(3), "on": True, "note": 'a "b"'},
        AT_MS,
    )
    assert text == (
        'home\\ climate,floor=1,room=Living\\ Room temp=21.0,count=3i,on=true,note="a \\"b\\""'
        f" {AT_MS}"
    )


def test_a_line_without_any_writable_field_is_none() -> None:
    assert lp.line("m", [("a", "b")], {"x": float("nan")}, 1) is None
    # Empty tag keys and values are left out rather than refused by InfluxDB.
    assert lp.line("m", [("", "b"), ("a", "")], {"x": 1.5}, 1) == "m x=1.5 1"


_text = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
    min_size=1,
    max_size=12,
)
_names = _text.filter(lambda s: not s.startswith("_") and "\n" not in s and "\r" not in s)


@given(
    measurement=_names,
    tags=st.dictionaries(_names, _names, max_size=3),
    strings=st.dictionaries(_names.filter(lambda s: s != "time"), _text, max_size=3),
    number=st.floats(allow_nan=False, allow_infinity=False),
    integer=st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
def test_every_line_reads_back_as_written(
    measurement: str, tags: dict[str, str], strings: dict[str, str], number: float, integer: int
) -> None:
    """What the sink writes, the double's strict reader (InfluxDB's documented rules) reads
    back unchanged: escaping is exact, including backslashes before separators."""
    field_values: dict[str, lp.FieldValue] = {**strings, "n": number, "i": lp.Integer(integer)}
    text = lp.line(measurement, list(tags.items()), field_values, AT_MS)
    assert text is not None
    assert "\n" not in text
    parsed = parse_line(text)
    assert parsed.measurement == measurement
    assert parsed.tags == tags
    # A line break has no spelling in a point: written as a space.
    expected: dict[str, Any] = {
        k: v.replace("\r", " ").replace("\n", " ") for k, v in strings.items()
    }
    assert parsed.fields == {**expected, "n": number, "i": integer}
    assert parsed.timestamp == AT_MS


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("m", "missing fields"),
        ("m,t=1", "missing fields"),
        ("m x", "missing field value"),
        ("m x=", "invalid value"),
        ("m x=1z", "invalid value"),
        ('m x="open', "unterminated"),
        ("m,t= x=1", "missing tag value"),
        ("m x=1 12a", "bad timestamp"),
        ("_m x=1", "reserved"),
        ("m _x=1", "reserved"),
        ("m time=1", "time"),
        (f"m x={2**63}i", "out of range"),
        ("m x=1  1", "bad timestamp"),
    ],
)
def test_the_double_reads_line_protocol_strictly(text: str, why: str) -> None:
    with pytest.raises(LineError, match=why):
        parse_line(text)


# -- the values of an uplink ---------------------------------------------------------------


def test_values_are_the_decoded_fields_then_the_metadata() -> None:
    uplink = decode(
        "actility",
        document({"temperature": 21.5, "rssi": "device's own", "status": None, "alarm": True}),
    )
    found = values(uplink)
    assert found["temperature"] == 21.5
    assert found["alarm"] is True
    assert "status" not in found  # null: nothing to record
    assert found["rssi"] == "device's own"  # the decoded field keeps its name
    assert found["snr"] == 7.0
    assert (found["fPort"], found["fCnt"], found["sf"]) == (1, 7, 7)
    assert found["gateway"] == "004A18E3"
    assert found["payloadHex"] == "9e1c0100"


def test_thingsboard_telemetry_is_stamped_with_the_uplink_time() -> None:
    record = telemetry(decode("actility", document({"temperature": 21.5, "nested": {"a": 1}})))
    assert record["ts"] == AT_MS
    assert record["values"]["temperature"] == 21.5
    assert record["values"]["nested"] == {"a": 1}  # ThingsBoard stores JSON values as they are


def test_influxdb_point_types_and_tags() -> None:
    uplink = decode(
        "actility", document({"temperature": 21, "tags": {"zone": "a b"}, "time": 5, "_x": 1})
    )
    found = fields(uplink)
    assert found["temperature"] == 21
    assert not isinstance(found["temperature"], lp.Integer)
    assert isinstance(found["fCnt"], lp.Integer)
    assert found["tags_zone"] == "a b"  # nested objects flattened with `_`
    assert "time" not in found  # names InfluxDB refuses
    assert "_x" not in found
    assert "fPort" not in found  # a tag
    text = point("uplink", uplink)
    assert text is not None
    parsed = parse_line(text)
    assert parsed.tags == {"devEUI": DEV, "fPort": "1"}
    assert parsed.fields["fCnt"] == 7
    assert parsed.fields["temperature"] == 21.0
    assert parsed.timestamp == AT_MS


# -- configurations ------------------------------------------------------------------------


def test_thingsboard_tokens_are_by_dev_eui_and_write_only() -> None:
    made = connection(
        "actility-thingsboard-iot",
        hostName="tb.example.com",
        accessTokens={"00-18-b2-00-00-00-0b-20": "tb-s3cret-token"},
    )
    assert made.configuration.base_url == "https://tb.example.com"
    document_out = made.document()
    assert document_out["configuration"]["accessTokens"] == {DEV: MASK}
    assert "tb-s3cret-token" in made.secret_values()
    assert made.document(reveal=True)["configuration"]["accessTokens"] == {DEV: "tb-s3cret-token"}


TB = {"hostName": "tb"}
SPLUNK = {"hostName": "splunk", "hecToken": "t"}
INFLUX = {"hostName": "influx", "org": "o", "bucket": "b", "token": "t"}


@pytest.mark.parametrize(
    ("connector", "configuration", "path"),
    [
        ("actility-thingsboard-iot", {**TB, "accessTokens": {"xyz": "t"}}, "accessTokens"),
        ("actility-thingsboard-iot", {**TB, "accessTokenPattern": "{DevEUI"}, "accessTokenPattern"),
        ("actility-thingsboard-iot", {"hostName": "https://tb/path"}, "hostName"),
        ("actility-splunk-iot", {"hostName": "splunk"}, "hecToken"),
        ("actility-splunk-iot", {**SPLUNK, "index": "_internal"}, "index"),
        ("actility-splunk-iot", {**SPLUNK, "source": "a\nb"}, "source"),
        ("actility-influxdb-iot", {**INFLUX, "bucket": ""}, "bucket"),
        ("actility-influxdb-iot", {**INFLUX, "hostName": "influx:99999"}, "hostName"),
        ("actility-influxdb-iot", {**INFLUX, "measurement": "_m"}, "measurement"),
    ],
)
def test_invalid_configurations_name_their_key(
    connector: str, configuration: dict[str, Any], path: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        connection(connector, **configuration)
    paths = [p.path for p in caught.value.problems]
    assert any(p.startswith(f"configuration.{path}") for p in paths), paths
    # Never the value: a problem may concern a secret.
    assert "tb-s3cret" not in str(caught.value)


def test_a_device_without_token_is_a_permanent_failure() -> None:
    made = connection("actility-thingsboard-iot", hostName="tb")
    sink = create_sink(made, CONTEXT)
    assert isinstance(sink, ThingsBoardSink)
    with pytest.raises(PermanentSinkError, match=f"no access token for device {DEV}"):
        sink._token(decode("actility", document()))
    patterned = create_sink(
        connection("actility-thingsboard-iot", hostName="tb", accessTokenPattern="lora-{DevEUI}"),
        CONTEXT,
    )
    assert isinstance(patterned, ThingsBoardSink)
    assert patterned._token(decode("actility", document())) == f"lora-{DEV}"


def test_splunk_envelope() -> None:
    made = connection("actility-splunk-iot", hostName="splunk:8088", hecToken="t", index="lora")
    sink = create_sink(made, CONTEXT)
    assert isinstance(sink, SplunkSink)
    envelope = sink.event(delivery(document({"temperature": 21.5})))
    assert envelope["time"] == pytest.approx(AT.timestamp())
    assert (envelope["host"], envelope["source"], envelope["sourcetype"]) == (
        DEV,
        "iotflow",
        "_json",
    )
    assert envelope["index"] == "lora"
    assert envelope["event"]["DevEUI_uplink"]["payload"] == {"temperature": 21.5}
    raw = create_sink(
        connection(
            "actility-splunk-iot", hostName="splunk", hecToken="t", sendRawDecodedFormat=True
        ),
        CONTEXT,
    )
    assert isinstance(raw, SplunkSink)
    decoded_only = raw.event(delivery(document({"temperature": 21.5})))
    assert decoded_only["event"] == {"temperature": 21.5}
    assert "index" not in decoded_only  # the token's default index


def test_hec_detail() -> None:
    assert hec_detail('{"text":"Invalid token","code":4}') == "Invalid token (code 4)"
    assert hec_detail("<html>") == ""
    assert hec_detail('{"code": 4}') == ""


# -- the doubles ---------------------------------------------------------------------------


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _post(
    http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with http.post(url, data=body, headers=headers or {}) as response:
        text = await response.text()
        try:
            return response.status, orjson.loads(text) if text else None
        except orjson.JSONDecodeError:
            return response.status, text


async def test_thingsboard_double(http: aiohttp.ClientSession) -> None:
    async with FakeThingsBoard(max_payload=200) as tb:
        tb.add_device(DEV, "good")

        def url(token: str) -> str:
            return tb.url_of(token)

        assert (await _post(http, url("good"), b'{"ts": 1, "values": {"t": 1}}'))[0] == 200
        assert (await _post(http, url("good"), b'{"t": 2, "s": "x"}'))[0] == 200
        assert tb.records(DEV) == [{"ts": 1, "values": {"t": 1}}, {"t": 2, "s": "x"}]
        assert (await _post(http, url("bad"), b'{"t": 1}'))[0] == 401
        assert (await _post(http, url("good"), b"not json"))[0] == 400
        assert (await _post(http, url("good"), b'{"ts": "1", "values": {}}'))[0] == 400
        assert (await _post(http, url("good"), b'{"t": null}'))[0] == 400
        assert (await _post(http, url("good"), b'{"t": "' + b"x" * 300 + b'"}'))[0] == 413
        tb.fail(429, retry_after=3)
        status, _ = await _post(http, url("good"), b'{"t": 3}')
        assert status == 429
        assert len(tb.records(DEV)) == 2


async def test_splunk_double(http: aiohttp.ClientSession) -> None:
    async with FakeSplunkHec("hec-token", indexes=("main", "lora"), max_content_length=300) as hec:
        url = hec.url("/services/collector/event")
        auth = {"Authorization": "Splunk hec-token"}
        one = b'{"time": 1, "event": {"a": 1}}'
        cases: list[tuple[dict[str, str], bytes, int, int]] = [
            (auth, one + b"\n" + b'{"event": "x", "index": "lora"}', 200, 0),
            ({}, one, 401, 2),
            ({"Authorization": "Bearer hec-token"}, one, 401, 3),
            ({"Authorization": "Splunk other"}, one, 403, 4),
            (auth, b"", 400, 5),
            (auth, b"{not json", 400, 6),
            (auth, b'{"event": 1, "index": "secret"}', 400, 7),
            (auth, b'{"time": 1}', 400, 12),
            (auth, b'{"event": ""}', 400, 13),
            (auth, b'{"event": "' + b"x" * 400 + b'"}', 413, 27),
        ]
        for headers, body, status, code in cases:
            got_status, answer = await _post(http, url, body, headers)
            assert (got_status, answer["code"]) == (status, code), (headers, body, answer)
            assert isinstance(answer["text"], str)
        assert [e["index"] for e in hec.events] == ["main", "lora"]
        hec.disabled = True
        assert (await _post(http, url, one, auth))[1]["code"] == 1
        hec.disabled, hec.use_ack = False, True
        assert (await _post(http, url, one, auth))[1]["code"] == 10
        async with http.get(hec.url("/services/collector/health")) as response:
            assert (response.status, (await response.json())["code"]) == (200, 17)


async def test_influxdb_double(http: aiohttp.ClientSession) -> None:
    async with FakeInfluxDb("influx-token", max_body=300) as influx:

        def url(org: str = "acme", bucket: str = "lora", precision: str = "ms") -> str:
            return influx.url(f"/api/v2/write?org={org}&bucket={bucket}&precision={precision}")

        auth = {"Authorization": "Token influx-token"}
        assert await _post(http, url(), b"m,d=1 x=1.5 1000\nm x=2.5 2000\n", auth) == (204, None)
        assert [p.timestamp for p in influx.written()] == [1_000_000_000, 2_000_000_000]
        cases = [
            (url(), b"m x=1", {}, 401, "unauthorized"),
            (url(), b"m x=1", {"Authorization": "Token other"}, 401, "unauthorized"),
            (url(org="nope"), b"m x=1", auth, 404, "not found"),
            (url(bucket="nope"), b"m x=1", auth, 404, "not found"),
            (url(precision="h"), b"m x=1", auth, 400, "invalid"),
            (url(), b"m x=1\nm x 2", auth, 400, "invalid"),
            (url(), b"m x=1i", auth, 422, "unprocessable entity"),
            (url(), b"m x=" + b"1" * 400, auth, 413, "request too large"),
        ]
        for target, body, headers, status, code in cases:
            got_status, answer = await _post(http, target, body, headers)
            assert (got_status, answer["code"]) == (status, code), (body, answer)
            if status == 422:
                assert 'field type conflict: input field "x"' in answer["message"]
        # Nothing of a refused request was written, not even its valid lines.
        assert len(influx.written()) == 2


def test_a_token_in_the_url_path_is_redacted_as_sent() -> None:
    """ThingsBoard's token travels in the URL's path, percent-encoded: an error text that
    quotes the URL (a proxy's answer, an exception) is cleaned of it in either spelling."""
    token = "tb/s3cret+token"
    made = connection(
        "actility-thingsboard-iot", hostName="tb.example.com", accessTokens={DEV: token}
    )
    redact = made.redactor()
    text = f"POST https://tb.example.com/api/v1/tb%2Fs3cret%2Btoken/telemetry failed; token {token}"
    assert redact(text) == (
        f"POST https://tb.example.com/api/v1/{MASK}/telemetry failed; token {MASK}"
    )


def test_a_put_of_the_masked_tokens_keeps_them() -> None:
    """What the API does on PUT (api/routes.py): `*****` takes the stored value back, by
    DevEUI; a masked token under a key spelled otherwise is refused, not stored as `*****`."""
    stored = connection(
        "actility-thingsboard-iot",
        hostName="tb",
        accessTokens={DEV: "tb-s3cret-1", "0018B20000000B21": "tb-s3cret-2"},
    )
    shown = stored.document()["configuration"]
    assert shown["accessTokens"] == {DEV: MASK, "0018B20000000B21": MASK}
    shown["accessTokens"]["0018B20000000B22"] = "tb-s3cret-3"  # a device added
    kept = unmask(shown, stored.document(reveal=True)["configuration"])
    again = connection("actility-thingsboard-iot", **kept)
    assert again.document(reveal=True)["configuration"]["accessTokens"] == {
        DEV: "tb-s3cret-1",
        "0018B20000000B21": "tb-s3cret-2",
        "0018B20000000B22": "tb-s3cret-3",
    }
    lower = {"hostName": "tb", "accessTokens": {DEV.lower(): MASK}}
    with pytest.raises(ConfigError, match=f"spell it {DEV}"):
        connection("actility-thingsboard-iot", **unmask(lower, shown))
