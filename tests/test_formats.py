"""Decoding the three input formats, and the Actility document rendered from them."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fixtures_path import FIXTURES
from iotflow.errors import Rejection
from iotflow.formats import (
    FORMATS,
    MAX_UPLINK_BYTES,
    Gateway,
    Template,
    Uplink,
    actility_document,
    decode,
    normalize_dev_eui,
    render_body,
)

FIXTURE_FORMATS = {
    "actility_uplink.json": "actility",
    "actility_uplink_strings.json": "actility",
    "chirpstack_up.json": "chirpstack",
    "tts_up.json": "tts",
}


def raw(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture(name: str) -> dict[str, Any]:
    document: dict[str, Any] = orjson.loads(raw(name))
    return document


def decode_doc(fmt: str, document: dict[str, Any]) -> Uplink:
    return decode(fmt, orjson.dumps(document))


def rejection(fmt: str, payload: bytes) -> Rejection:
    with pytest.raises(Rejection) as caught:
        decode(fmt, payload)
    return caught.value


# The fixtures


def test_actility_fixture() -> None:
    uplink = decode("actility", raw("actility_uplink.json"))
    assert uplink.format == "actility"
    assert uplink.dev_eui == "0018B20000000B20"
    assert uplink.time == datetime(2026, 11, 21, 14, 38, 46, 882000, tzinfo=UTC)
    assert uplink.time.utcoffset() == timedelta(hours=1)  # the offset as sent
    assert uplink.f_port == 1
    assert uplink.f_cnt == 1174
    assert uplink.payload == bytes.fromhex("9e1c0100")
    assert uplink.decoded is None
    assert uplink.device_name == "My Demo Device"
    assert uplink.source == {}
    assert uplink.document == fixture("actility_uplink.json")
    radio = uplink.radio
    assert radio.rssi == -80.0
    assert radio.snr == 7.0
    assert radio.spreading_factor == 7
    assert radio.frequency_mhz == 868.1
    assert radio.dev_addr == "04D2848E"
    assert radio.gateways == (
        Gateway(id="004A18E3", rssi=-80.0, snr=7.0, latitude=45.851032, longitude=1.26623),
    )


def test_actility_fixture_with_numbers_as_strings() -> None:
    uplink = decode("actility", raw("actility_uplink_strings.json"))
    assert uplink.dev_eui == "0018B20000000B21"  # sent in lower case
    assert uplink.time == datetime(2026, 11, 21, 13, 38, 46, 882000, tzinfo=UTC)
    assert uplink.time.utcoffset() == timedelta(hours=2)
    assert uplink.f_port == 1
    assert uplink.f_cnt == 1175
    assert uplink.payload == bytes.fromhex("0367f600")
    assert uplink.decoded == {"temperature": 24.6}
    assert uplink.device_name is None
    radio = uplink.radio
    assert radio.rssi == -80.0
    assert radio.snr == 7.0
    assert radio.spreading_factor == 7
    assert radio.frequency_mhz is None
    assert radio.dev_addr == "04D2848F"
    assert radio.gateways == (Gateway(id="004A18E3", rssi=-80.0, snr=7.0),)


def test_chirpstack_fixture() -> None:
    uplink = decode("chirpstack", raw("chirpstack_up.json"))
    assert uplink.format == "chirpstack"
    assert uplink.dev_eui == "A840414FC182F6C2"
    assert uplink.time == datetime(2026, 11, 21, 14, 38, 46, 882000, tzinfo=UTC)
    assert uplink.f_port == 5
    assert uplink.f_cnt == 42
    assert uplink.payload == bytes.fromhex("0100de02250400a50504070de4")
    assert uplink.decoded == {
        "temperature": 22.2,
        "humidity": 37,
        "light": 165,
        "motion": 4,
        "vdd": 3556,
    }
    assert uplink.device_name == "office-ers"
    assert uplink.source == {
        "applicationId": "17c82e96-be03-4f38-aef3-f83d48582d97",
        "devEui": "a840414fc182f6c2",
        "tenantId": "52f14cd4-c6f1-4fbd-8f87-4025e1d49242",
    }
    assert uplink.document == fixture("chirpstack_up.json")
    radio = uplink.radio
    assert radio.rssi == -36.0
    assert radio.snr == 10.5
    assert radio.spreading_factor == 7
    assert radio.frequency_mhz == 868.5
    assert radio.dev_addr == "00189440"
    assert radio.gateways == (
        Gateway(id="0016C001FF10D3F6", rssi=-36.0, snr=10.5, latitude=48.8566, longitude=2.3522),
    )


def test_tts_fixture() -> None:
    uplink = decode("tts", raw("tts_up.json"))
    assert uplink.format == "tts"
    assert uplink.dev_eui == "70B3D57ED005A1B2"
    assert uplink.time == datetime(2026, 11, 21, 14, 38, 46, 882000, tzinfo=UTC)
    assert uplink.f_port == 2
    assert uplink.f_cnt == 315
    assert uplink.payload == bytes.fromhex("08dc0190")
    assert uplink.decoded == {"temperature": 22.68, "battery": 400}
    assert uplink.device_name == "eui-70b3d57ed005a1b2"
    assert uplink.source == {
        "application_id": "demo-app",
        "device_id": "eui-70b3d57ed005a1b2",
        "tenant_id": "ttn",
        "dev_eui": "70B3D57ED005A1B2",
    }
    assert uplink.document == fixture("tts_up.json")
    radio = uplink.radio
    assert radio.rssi == -51.0
    assert radio.snr == 9.25
    assert radio.spreading_factor == 7
    assert radio.frequency_mhz == 868.1
    assert radio.dev_addr == "260B1234"
    assert radio.gateways == (
        Gateway(id="B827EBFFFE123456", rssi=-51.0, snr=9.25, latitude=52.37, longitude=4.89),
    )


# Times


def test_chirpstack_time_falls_back_to_the_network_server() -> None:
    document = fixture("chirpstack_up.json")
    del document["rxInfo"][0]["time"]
    document["time"] = "2026-11-21T14:38:47.5Z"
    assert decode_doc("chirpstack", document).time == datetime(
        2026, 11, 21, 14, 38, 47, 500000, tzinfo=UTC
    )


def test_tts_time_falls_back_to_uplink_then_message_reception() -> None:
    document = fixture("tts_up.json")
    del document["uplink_message"]["rx_metadata"][0]["time"]
    assert decode_doc("tts", document).time == datetime(
        2026, 11, 21, 14, 38, 46, 950000, tzinfo=UTC
    )
    del document["uplink_message"]["received_at"]
    # "…47.012345678Z": nanoseconds, truncated to microseconds.
    assert decode_doc("tts", document).time == datetime(2026, 11, 21, 14, 38, 47, 12345, tzinfo=UTC)


def test_tts_nanosecond_gateway_time() -> None:
    document = fixture("tts_up.json")
    document["uplink_message"]["rx_metadata"][0]["time"] = "2026-11-21T14:38:46.123456789+02:00"
    uplink = decode_doc("tts", document)
    assert uplink.time == datetime(
        2026, 11, 21, 14, 38, 46, 123456, tzinfo=timezone(timedelta(hours=2))
    )


def test_tts_tenant_from_network_ids() -> None:
    document = fixture("tts_up.json")
    document["uplink_message"]["network_ids"]["tenant_id"] = "acme"
    assert decode_doc("tts", document).source["tenant_id"] == "acme"
    del document["uplink_message"]["network_ids"]
    assert decode_doc("tts", document).source["tenant_id"] == "ttn"


# Leniency where the network servers are lenient


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("actility_uplink.json", ("DevEUI_uplink", "FPort")),
        ("chirpstack_up.json", ("fPort",)),
        ("tts_up.json", ("uplink_message", "f_port")),
    ],
)
def test_missing_port_is_none(name: str, path: tuple[str, ...]) -> None:
    document = fixture(name)
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    uplink = decode_doc(FIXTURE_FORMATS[name], document)
    assert uplink.f_port is None
    assert "FPort" not in actility_document(uplink)["DevEUI_uplink"]


def test_tts_missing_frame_counter_is_zero() -> None:
    # TTS leaves zero values out of its JSON.
    document = fixture("tts_up.json")
    del document["uplink_message"]["f_cnt"]
    assert decode_doc("tts", document).f_cnt == 0


def test_chirpstack_numeric_string_port() -> None:
    document = fixture("chirpstack_up.json")
    document["fPort"] = "5"
    assert decode_doc("chirpstack", document).f_port == 5


def test_chirpstack_gateway_without_snr_had_zero_snr() -> None:
    document = fixture("chirpstack_up.json")
    del document["rxInfo"][0]["snr"]
    assert decode_doc("chirpstack", document).radio.snr == 0.0


def test_best_gateway_comes_first() -> None:
    document = fixture("chirpstack_up.json")
    second = {"gatewayId": "AA555A0000000101", "rssi": -20, "snr": 8.0}
    document["rxInfo"].append(second)
    uplink = decode_doc("chirpstack", document)
    assert [g.id for g in uplink.radio.gateways] == ["AA555A0000000101", "0016C001FF10D3F6"]
    assert uplink.radio.rssi == -20.0
    assert uplink.radio.snr == 8.0
    # The time still comes from the first gateway that gave one.
    assert uplink.time == datetime(2026, 11, 21, 14, 38, 46, 882000, tzinfo=UTC)
    inner = actility_document(uplink)["DevEUI_uplink"]
    assert inner["Lrrid"] == "AA555A0000000101"
    assert "LrrLAT" not in inner  # the best gateway has no position
    assert inner["Lrrs"] == {
        "Lrr": [
            {"Lrrid": "AA555A0000000101", "LrrRSSI": -20.0, "LrrSNR": 8.0},
            {"Lrrid": "0016C001FF10D3F6", "LrrRSSI": -36.0, "LrrSNR": 10.5},
        ]
    }


def test_actility_best_lrr_comes_first_with_its_position() -> None:
    document = fixture("actility_uplink.json")
    up = document["DevEUI_uplink"]
    up["Lrrs"]["Lrr"].insert(0, {"Lrrid": "00000001", "LrrRSSI": -110.0, "LrrSNR": -3.5})
    uplink = decode_doc("actility", document)
    assert uplink.radio.gateways == (
        Gateway(id="004A18E3", rssi=-80.0, snr=7.0, latitude=45.851032, longitude=1.26623),
        Gateway(id="00000001", rssi=-110.0, snr=-3.5),
    )


# Rendering


def test_actility_document_passes_through() -> None:
    for name in ("actility_uplink.json", "actility_uplink_strings.json"):
        uplink = decode("actility", raw(name))
        document = actility_document(uplink)
        assert document is uplink.document
        assert document == fixture(name)


def test_actility_document_from_chirpstack() -> None:
    document = actility_document(decode("chirpstack", raw("chirpstack_up.json")))
    assert document == {
        "DevEUI_uplink": {
            "Time": "2026-11-21T14:38:46.882+00:00",
            "DevEUI": "A840414FC182F6C2",
            "FPort": 5,
            "FCntUp": 42,
            "payload_hex": "0100de02250400a50504070de4",
            "LrrRSSI": -36.0,
            "LrrSNR": 10.5,
            "Lrrid": "0016C001FF10D3F6",
            "SpFact": 7,
            "Frequency": 868.5,
            "DevAddr": "00189440",
            "Lrrs": {"Lrr": [{"Lrrid": "0016C001FF10D3F6", "LrrRSSI": -36.0, "LrrSNR": 10.5}]},
            "LrrLAT": 48.8566,
            "LrrLON": 2.3522,
            "CustomerData": {"name": "office-ers"},
            "payload": {
                "temperature": 22.2,
                "humidity": 37,
                "light": 165,
                "motion": 4,
                "vdd": 3556,
            },
        }
    }


def test_actility_document_from_tts() -> None:
    document = actility_document(decode("tts", raw("tts_up.json")))
    assert document == {
        "DevEUI_uplink": {
            "Time": "2026-11-21T14:38:46.882+00:00",
            "DevEUI": "70B3D57ED005A1B2",
            "FPort": 2,
            "FCntUp": 315,
            "payload_hex": "08dc0190",
            "LrrRSSI": -51.0,
            "LrrSNR": 9.25,
            "Lrrid": "B827EBFFFE123456",
            "SpFact": 7,
            "Frequency": 868.1,
            "DevAddr": "260B1234",
            "Lrrs": {"Lrr": [{"Lrrid": "B827EBFFFE123456", "LrrRSSI": -51.0, "LrrSNR": 9.25}]},
            "LrrLAT": 52.37,
            "LrrLON": 4.89,
            "CustomerData": {"name": "eui-70b3d57ed005a1b2"},
            "payload": {"temperature": 22.68, "battery": 400},
        }
    }


def test_actility_document_time_has_milliseconds_and_offset() -> None:
    document = fixture("tts_up.json")
    del document["uplink_message"]["rx_metadata"]
    del document["uplink_message"]["received_at"]
    inner = actility_document(decode_doc("tts", document))["DevEUI_uplink"]
    assert inner["Time"] == "2026-11-21T14:38:47.012+00:00"


def test_actility_document_leaves_out_what_is_unknown() -> None:
    document = {
        "time": "2026-11-21T14:38:46.882Z",
        "deviceInfo": {"devEui": "a840414fc182f6c2"},
        "fCnt": 7,
    }
    inner = actility_document(decode_doc("chirpstack", document))["DevEUI_uplink"]
    assert inner == {
        "Time": "2026-11-21T14:38:46.882+00:00",
        "DevEUI": "A840414FC182F6C2",
        "FCntUp": 7,
        "payload_hex": "",
    }


def test_render_body_variants() -> None:
    document = actility_document(decode("chirpstack", raw("chirpstack_up.json")))
    inner = document["DevEUI_uplink"]

    def body(*, send_metadata: bool, send_raw_decoded: bool) -> Any:
        return orjson.loads(
            render_body(document, send_metadata=send_metadata, send_raw_decoded=send_raw_decoded)
        )

    assert body(send_metadata=False, send_raw_decoded=False) == document
    assert body(send_metadata=True, send_raw_decoded=False) == inner
    assert body(send_metadata=False, send_raw_decoded=True) == inner["payload"]
    assert body(send_metadata=True, send_raw_decoded=True) == inner["payload"]


def test_render_body_raw_decoded_without_decoded_payload() -> None:
    document = actility_document(decode("actility", raw("actility_uplink.json")))
    assert "payload" not in document["DevEUI_uplink"]
    full = render_body(document, send_metadata=False, send_raw_decoded=True)
    assert orjson.loads(full) == document
    metadata = render_body(document, send_metadata=True, send_raw_decoded=True)
    assert orjson.loads(metadata) == document["DevEUI_uplink"]


def test_render_body_of_actility_strings_fixture_sends_its_payload() -> None:
    document = actility_document(decode("actility", raw("actility_uplink_strings.json")))
    body = render_body(document, send_metadata=False, send_raw_decoded=True)
    assert orjson.loads(body) == {"temperature": 24.6}


# Rejections


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize(
    "payload",
    [
        b"hello",
        b"",
        b"\xff\xfe\x00\x81garbage\x00",
        b'{"DevEUI_uplink": "\xff"}',  # JSON, but not UTF-8
        b"[1, 2, 3]",
        b'"DevEUI_uplink"',
        b"42",
        b"null",
    ],
)
def test_not_json(fmt: str, payload: bytes) -> None:
    assert rejection(fmt, payload).reason == "not_json"


def test_json_array_message() -> None:
    assert rejection("chirpstack", b"[]").message == "expected a JSON object, got an array"


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        ("actility", "DevEUI_uplink: missing (not a ThingPark uplink)"),
        ("chirpstack", "deviceInfo: missing (not a ChirpStack event)"),
        ("tts", "end_device_ids: missing (not a The Things Stack message)"),
    ],
)
def test_missing_root(fmt: str, message: str) -> None:
    caught = rejection(fmt, b'{"something": "else"}')
    assert caught.reason == "wrong_shape"
    assert caught.message == message


@pytest.mark.parametrize(("name", "fmt"), FIXTURE_FORMATS.items())
def test_another_format_is_wrong_shape(name: str, fmt: str) -> None:
    for other in FORMATS - {fmt}:
        assert rejection(other, raw(name)).reason == "wrong_shape"


def test_tts_message_that_is_not_an_uplink() -> None:
    join_accept = {
        "end_device_ids": {"device_id": "eui-70b3d57ed005a1b2", "dev_eui": "70B3D57ED005A1B2"},
        "received_at": "2026-11-21T14:38:47.012345678Z",
        "join_accept": {"session_key_id": "AYc2sT0p9kRo0lS4tq5lXw=="},
    }
    caught = rejection("tts", orjson.dumps(join_accept))
    assert caught.reason == "wrong_shape"
    assert caught.message == "uplink_message: missing (not an uplink message)"


def test_chirpstack_event_that_is_not_an_up_event() -> None:
    join = {
        "time": "2026-11-21T14:38:46.882Z",
        "deviceInfo": {"devEui": "a840414fc182f6c2"},
        "devAddr": "00189440",
    }
    caught = rejection("chirpstack", orjson.dumps(join))
    assert caught.reason == "wrong_shape"
    assert caught.message == "fCnt: missing (not an up event)"


DEV_EUI_PATHS = {
    "actility_uplink.json": ("DevEUI_uplink", "DevEUI"),
    "chirpstack_up.json": ("deviceInfo", "devEui"),
    "tts_up.json": ("end_device_ids", "dev_eui"),
}


@pytest.mark.parametrize("name", sorted(DEV_EUI_PATHS))
@pytest.mark.parametrize("value", ["xyz", "0018B20000000B2", "0018B20000000B200", "", 18, None])
def test_bad_dev_eui(name: str, value: object) -> None:
    document = fixture(name)
    parent, key = DEV_EUI_PATHS[name]
    document[parent][key] = value
    caught = rejection(FIXTURE_FORMATS[name], orjson.dumps(document))
    assert caught.reason == "bad_dev_eui"
    assert caught.message.startswith(f"{parent}.{key}: ")


def test_bad_dev_eui_message() -> None:
    document = fixture("actility_uplink.json")
    document["DevEUI_uplink"]["DevEUI"] = "xyz"
    caught = rejection("actility", orjson.dumps(document))
    assert caught.message == 'DevEUI_uplink.DevEUI: expected 16 hex digits, got "xyz"'
    del document["DevEUI_uplink"]["DevEUI"]
    assert rejection("actility", orjson.dumps(document)).message == "DevEUI_uplink.DevEUI: missing"


@pytest.mark.parametrize(
    ("name", "path", "value", "message"),
    [
        (
            "actility_uplink.json",
            ("DevEUI_uplink", "FPort"),
            "abc",
            'DevEUI_uplink.FPort: expected an integer, got "abc"',
        ),
        (
            "actility_uplink.json",
            ("DevEUI_uplink", "FPort"),
            1.5,
            "DevEUI_uplink.FPort: expected an integer, got 1.5",
        ),
        (
            "actility_uplink.json",
            ("DevEUI_uplink", "FCntUp"),
            True,
            "DevEUI_uplink.FCntUp: expected an integer, got true",
        ),
        ("chirpstack_up.json", ("fPort",), "five", 'fPort: expected an integer, got "five"'),
        (
            "chirpstack_up.json",
            ("fPort",),
            300,
            "fPort: expected an integer from 0 to 255, got 300",
        ),
        (
            "chirpstack_up.json",
            ("fCnt",),
            -1,
            "fCnt: expected an integer from 0 to 4294967295, got -1",
        ),
        (
            "tts_up.json",
            ("uplink_message", "f_port"),
            [2],
            "uplink_message.f_port: expected an integer, got an array",
        ),
        (
            "actility_uplink.json",
            ("DevEUI_uplink", "payload_hex"),
            "9e1",
            'DevEUI_uplink.payload_hex: expected hex digits, got "9e1"',
        ),
        ("chirpstack_up.json", ("data",), "AQ!=", 'data: expected base64, got "AQ!="'),
        (
            "actility_uplink.json",
            ("DevEUI_uplink", "Time"),
            "2026-11-21T15:38:46",
            "DevEUI_uplink.Time: expected an ISO 8601 time with a UTC offset, "
            'got "2026-11-21T15:38:46"',
        ),
        (
            "actility_uplink.json",
            ("DevEUI_uplink", "Time"),
            None,
            "DevEUI_uplink.Time: missing",
        ),
        ("chirpstack_up.json", ("rxInfo",), {}, "rxInfo: expected an array, got an object"),
        ("chirpstack_up.json", ("object",), [1], "object: expected an object, got an array"),
        (
            "tts_up.json",
            ("uplink_message", "settings", "frequency"),
            "868.1 MHz",
            'uplink_message.settings.frequency: expected an integer, got "868.1 MHz"',
        ),
    ],
)
def test_wrong_shape(name: str, path: tuple[str, ...], value: object, message: str) -> None:
    document = fixture(name)
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    caught = rejection(FIXTURE_FORMATS[name], orjson.dumps(document))
    assert caught.reason == "wrong_shape"
    assert caught.message == message


def test_wrong_shape_names_the_array_index() -> None:
    document = fixture("chirpstack_up.json")
    document["rxInfo"][0]["rssi"] = "loud"
    assert rejection("chirpstack", orjson.dumps(document)).message == (
        'rxInfo[0].rssi: expected a number, got "loud"'
    )


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_too_large_is_checked_before_parsing(fmt: str) -> None:
    caught = rejection(fmt, b"\xff" * (MAX_UPLINK_BYTES + 1))
    assert caught.reason == "too_large"


def test_too_large_valid_uplink() -> None:
    document = fixture("chirpstack_up.json")
    document["object"]["padding"] = "x" * MAX_UPLINK_BYTES
    assert rejection("chirpstack", orjson.dumps(document)).reason == "too_large"


def test_largest_accepted_uplink() -> None:
    payload = raw("chirpstack_up.json").strip()
    payload += b" " * (MAX_UPLINK_BYTES - len(payload))
    assert len(payload) == MAX_UPLINK_BYTES
    assert decode("chirpstack", payload).dev_eui == "A840414FC182F6C2"


def test_unknown_format_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown uplink format 'loriot'"):
        decode("loriot", raw("chirpstack_up.json"))


# DevEUI


@pytest.mark.parametrize(
    "text",
    [
        "0018B20000000B20",
        "0018b20000000b20",
        "00-18-B2-00-00-00-0B-20",
        "00:18:b2:00:00:00:0b:20",
        "0018-b200-0000-0B20",
    ],
)
def test_normalize_dev_eui(text: str) -> None:
    assert normalize_dev_eui(text) == "0018B20000000B20"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "xyz",
        "0018B20000000B2",
        "0018B20000000B200",
        "0018B20000000B2G",
        "0018 B20000000B20",
        "0x18B20000000B20",
        "００18B20000000B20",  # full-width digits
    ],
)
def test_normalize_dev_eui_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="expected 16 hex digits"):
        normalize_dev_eui(text)


@given(
    eui=st.binary(min_size=8, max_size=8),
    separator=st.sampled_from(["", "-", ":"]),
    group=st.sampled_from([1, 2, 4, 8]),
    upper=st.booleans(),
)
def test_normalize_dev_eui_round_trip(eui: bytes, separator: str, group: int, upper: bool) -> None:
    digits = eui.hex().upper() if upper else eui.hex()
    text = separator.join(digits[i : i + 2 * group] for i in range(0, 16, 2 * group))
    assert normalize_dev_eui(text) == eui.hex().upper()


# Properties: whatever arrives, the answer is an Uplink or a Rejection.

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=20)
    # Strings the decoders read as numbers, times, hex and base64.
    | st.from_regex(r"[+-]?[0-9]{0,22}(\.[0-9]*)?([eE][+-]?[0-9]{1,4})?", fullmatch=True)
    | st.from_regex(
        r"[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,12})?)?)?"
        r"(Z|[+-][0-9]{2}:?[0-9]{2})?",
        fullmatch=True,
    )
    | st.from_regex(r"[0-9a-fA-F:-]{0,24}", fullmatch=True)
    | st.from_regex(r"[A-Za-z0-9+/]{0,12}={0,2}", fullmatch=True)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(alphabet=st.characters(codec="utf-8"), max_size=8), children)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(alphabet=st.characters(codec="utf-8")), json_values)


def decode_or_rejection(fmt: str, payload: bytes) -> Uplink | Rejection:
    try:
        return decode(fmt, payload)
    except Rejection as exc:
        return exc


def check_decode(fmt: str, payload: bytes) -> None:
    """Decode, and when that works, render everything a sink would render."""
    uplink = decode_or_rejection(fmt, payload)
    if isinstance(uplink, Rejection):
        assert uplink.reason in {"not_json", "too_large", "wrong_shape", "bad_dev_eui"}
        return
    assert normalize_dev_eui(uplink.dev_eui) == uplink.dev_eui
    assert uplink.time.utcoffset() is not None
    document = actility_document(uplink)
    for send_metadata in (False, True):
        for send_raw_decoded in (False, True):
            render_body(document, send_metadata=send_metadata, send_raw_decoded=send_raw_decoded)
    Template("{DevEUI}/{CustomerData.name|FPort|'none'}/{Lrrs.Lrr.0.Lrrid}").render(document)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@given(payload=st.binary(max_size=256))
def test_decode_arbitrary_bytes(fmt: str, payload: bytes) -> None:
    check_decode(fmt, payload)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@given(document=json_objects)
def test_decode_arbitrary_objects(fmt: str, document: dict[str, Any]) -> None:
    check_decode(fmt, orjson.dumps(document))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@given(inner=json_objects)
def test_decode_arbitrary_objects_under_the_root(fmt: str, inner: dict[str, Any]) -> None:
    root = {"actility": "DevEUI_uplink", "chirpstack": "deviceInfo", "tts": "end_device_ids"}
    check_decode(fmt, orjson.dumps({root[fmt]: inner, "uplink_message": inner, "fCnt": 1}))


def key_paths(value: Any, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Every key path in a JSON value, containers included."""
    found: list[tuple[str | int, ...]] = []
    items: list[tuple[str | int, Any]] = []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    for key, child in items:
        found.append((*prefix, key))
        found.extend(key_paths(child, (*prefix, key)))
    return found


_DELETE = object()


def damage(document: Any, path: tuple[str | int, ...], value: Any) -> None:
    """Replace or delete the value at `path`, unless an earlier change removed it."""
    parent = document
    for key in path[:-1]:
        try:
            parent = parent[key]
        except (KeyError, IndexError, TypeError):
            return
    last = path[-1]
    if isinstance(parent, dict) and isinstance(last, str):
        if value is _DELETE:
            parent.pop(last, None)
        else:
            parent[last] = value
    elif isinstance(parent, list) and isinstance(last, int) and last < len(parent):
        parent[last] = None if value is _DELETE else value


@pytest.mark.parametrize("name", sorted(FIXTURE_FORMATS))
@given(data=st.data())
def test_decode_damaged_fixtures(name: str, data: st.DataObject) -> None:
    document = fixture(name)
    paths = key_paths(document)
    changes = data.draw(
        st.lists(
            st.tuples(st.sampled_from(paths), st.just(_DELETE) | json_values),
            min_size=1,
            max_size=4,
        )
    )
    damaged = copy.deepcopy(document)
    for path, value in changes:
        damage(damaged, path, value)
    check_decode(FIXTURE_FORMATS[name], orjson.dumps(damaged))
