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


# Samples collected from the network servers' documentation (tests/fixtures/<server>/README.md)

SAMPLE_FORMATS = {"chirpstack": "chirpstack", "tts": "tts", "thingpark": "actility"}


def samples(*, uplinks: bool) -> dict[str, str]:
    """Relative path of each collected sample → its format; uplinks or the other messages."""
    found = {}
    for folder, fmt in SAMPLE_FORMATS.items():
        for path in sorted((FIXTURES / folder).glob("*.json")):
            if path.name.endswith(".expected.json"):
                continue
            if path.name.startswith("not-uplink-") != uplinks:
                found[f"{folder}/{path.name}"] = fmt
    return found


UPLINK_SAMPLES = samples(uplinks=True)
OTHER_SAMPLES = samples(uplinks=False)


def expected_document(name: str) -> dict[str, Any]:
    """What the sinks must send for a sample: written beside it, or the ThingPark sample itself."""
    if name.startswith("thingpark/"):
        return fixture(name)
    return fixture(name.removesuffix(".json") + ".expected.json")


def test_every_server_has_samples_of_both_kinds() -> None:
    for folder in SAMPLE_FORMATS:
        assert sum(n.startswith(folder + "/") for n in UPLINK_SAMPLES) >= 3, folder
        assert sum(n.startswith(folder + "/") for n in OTHER_SAMPLES) >= 3, folder
    # Every uplink converted from another format has its expected document, and no other.
    expected = {
        str(p.relative_to(FIXTURES)).removesuffix(".expected.json") + ".json"
        for p in FIXTURES.glob("*/*.expected.json")
    }
    assert expected == {n for n in UPLINK_SAMPLES if not n.startswith("thingpark/")}


@pytest.mark.parametrize(("name", "fmt"), UPLINK_SAMPLES.items())
def test_sample_becomes_its_expected_document(name: str, fmt: str) -> None:
    document = actility_document(decode(fmt, raw(name)))
    assert document == expected_document(name)  # every field, no more, no less
    inner = document["DevEUI_uplink"]
    assert set(inner) >= {"Time", "DevEUI", "payload_hex"}


@pytest.mark.parametrize(("name", "fmt"), OTHER_SAMPLES.items())
def test_other_messages_are_not_uplinks(name: str, fmt: str) -> None:
    caught = rejection(fmt, raw(name))
    assert caught.reason == "not_uplink", caught.message
    assert caught.routine


@pytest.mark.parametrize(("name", "fmt"), OTHER_SAMPLES.items())
def test_other_messages_are_wrong_shape_for_the_other_formats(name: str, fmt: str) -> None:
    for other in FORMATS - {fmt}:
        assert rejection(other, raw(name)).reason == "wrong_shape"


def test_chirpstack_v4_0_up_event_without_frame_counter() -> None:
    # The docs' own example: fCnt 0 left out, no gateway time.
    uplink = decode("chirpstack", raw("chirpstack/v4.0-docs-up.json"))
    assert uplink.f_cnt == 0
    assert uplink.f_port == 1
    assert uplink.payload == b"\xaa"
    assert uplink.time == datetime(2022, 7, 18, 9, 34, 15, 775023, tzinfo=UTC)  # event's time


def test_chirpstack_gateway_time_wins_over_network_server_times() -> None:
    document = fixture("chirpstack/v4.6-thingsboard-up.json")
    document["time"] = "2025-06-13T12:44:59+00:00"
    rx = document["rxInfo"][0]
    assert decode_doc("chirpstack", document).time == datetime(
        2025, 6, 13, 12, 44, 52, 653481, tzinfo=UTC
    )  # gwTime (v4.6)
    del rx["gwTime"]
    rx["time"] = "2025-06-13T12:44:51+00:00"
    assert decode_doc("chirpstack", document).time == datetime(
        2025, 6, 13, 12, 44, 51, tzinfo=UTC
    )  # time (before v4.6)
    del rx["time"]
    assert decode_doc("chirpstack", document).time == datetime(
        2025, 6, 13, 12, 44, 59, tzinfo=UTC
    )  # the event's time
    del document["time"]
    assert decode_doc("chirpstack", document).time == datetime(
        2025, 6, 13, 12, 44, 52, 670509, tzinfo=UTC
    )  # nsTime
    del rx["nsTime"]
    assert rejection("chirpstack", orjson.dumps(document)).message == (
        "time: missing (and no rxInfo[].gwTime, time or nsTime)"
    )


def test_fsk_has_no_snr_and_no_spreading_factor() -> None:
    for name, fmt in (
        ("chirpstack/v4.6-fsk-up.json", "chirpstack"),
        ("tts/fsk-uplink.json", "tts"),
    ):
        uplink = decode(fmt, raw(name))
        assert uplink.radio.snr is None
        assert uplink.radio.spreading_factor is None
        inner = actility_document(uplink)["DevEUI_uplink"]
        assert "LrrSNR" not in inner
        assert "SpFact" not in inner
        assert all("LrrSNR" not in lrr for lrr in inner["Lrrs"]["Lrr"])


def test_lora_gateway_without_snr_had_zero_snr_in_both_stacks() -> None:
    document = fixture("tts/docs-uplink.json")
    del document["uplink_message"]["rx_metadata"][0]["snr"]
    assert decode_doc("tts", document).radio.snr == 0.0
    del document["uplink_message"]["settings"]["data_rate"]
    assert decode_doc("tts", document).radio.snr is None  # modulation unknown


def test_tts_zero_time_is_unset() -> None:
    uplink = decode("tts", raw("tts/zero-time-uplink.json"))
    # Not 0001-01-01 (which would expire on arrival): the network server's reception.
    assert uplink.time == datetime(2020, 2, 12, 15, 15, 45, 789585, tzinfo=UTC)


@pytest.mark.parametrize(
    "unset", ["0001-01-01T00:00:00Z", "1970-01-01T00:00:00Z", "0001-01-01T00:00:00+01:00"]
)
def test_unset_thingpark_time_is_rejected(unset: str) -> None:
    document = fixture("actility_uplink.json")
    document["DevEUI_uplink"]["Time"] = unset
    caught = rejection("actility", orjson.dumps(document))
    assert caught.reason == "wrong_shape"
    assert caught.message == "DevEUI_uplink.Time: missing (or unset)"


def test_packet_broker_gateway_is_the_forwarder() -> None:
    uplink = decode("tts", raw("tts/packet-broker-uplink.json"))
    ids = [g.id for g in uplink.radio.gateways]
    assert "packetbroker" not in ids
    assert "7076FF0056050C89" in ids  # packet_broker.forwarder_gateway_eui
    assert uplink.f_cnt == 0  # f_cnt 0 left out
    # The own gateways' time, not the forwarder's clock (2 s ahead in this real sample).
    assert uplink.time == datetime(2024, 6, 26, 13, 24, 35, 891, tzinfo=UTC)


def test_packet_broker_forwarder_alone_is_lrrid() -> None:
    document = fixture("tts/packet-broker-uplink.json")
    up = document["uplink_message"]
    up["rx_metadata"] = up["rx_metadata"][:1]
    inner = actility_document(decode_doc("tts", document))["DevEUI_uplink"]
    assert inner["Lrrid"] == "7076FF0056050C89"
    assert inner["Lrrs"] == {
        "Lrr": [{"Lrrid": "7076FF0056050C89", "LrrRSSI": -113.0, "LrrSNR": 5.5}]
    }
    assert inner["Time"] == "2024-06-26T13:24:37.052+00:00"  # no other gateway time
    del up["rx_metadata"][0]["packet_broker"]["forwarder_gateway_eui"]
    inner = actility_document(decode_doc("tts", document))["DevEUI_uplink"]
    assert inner["Lrrid"] == "eui-7076ff0056050c89"  # forwarder_gateway_id


def test_thingpark_samples_decode_their_fields() -> None:
    old = decode("actility", raw("thingpark/tpns-as-uplink-2015.json"))
    assert (old.dev_eui, old.f_port, old.f_cnt) == ("000000000F1D8693", 2, 7011)
    assert old.time == datetime(2015, 7, 9, 14, 6, 38, 490000, tzinfo=UTC)
    assert [(g.id, g.rssi, g.snr) for g in old.radio.gateways] == [
        ("08040059", -60.0, 9.75),
        ("33d13a41", -73.0, 9.75),
    ]
    assert old.radio.gateways[0].latitude == 48.874931
    assert old.device_name is None
    as_string = decode("actility", raw("thingpark/tpns-as-uplink-2015-customerdata-string.json"))
    assert as_string.device_name is None
    assert as_string.dev_eui == old.dev_eui
    flow = decode("actility", raw("thingpark/tpx-flow-modbus-uplink.json"))
    assert (flow.dev_eui, flow.f_port, flow.f_cnt) == ("A81758FFFE05A086", 5, 42435)
    assert flow.decoded is not None
    assert flow.decoded["co2"] == 491
    assert [g.id for g in flow.radio.gateways] == ["10000035", "100001F7"]  # ThingPark's best first


def test_thingpark_message_with_a_malformed_deveui_is_still_not_an_uplink() -> None:
    # Actility's own DevEUI_downlink_Sent example has "000000000F1D8693</DevEUI".
    assert rejection("actility", raw("thingpark/not-uplink-downlink-sent.json")).reason == (
        "not_uplink"
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
    assert caught.reason == "not_uplink"
    assert caught.routine
    assert caught.message == "a The Things Stack join_accept message, not an uplink"


def test_tts_message_of_no_known_type_is_wrong_shape() -> None:
    document = {"end_device_ids": {"dev_eui": "70B3D57ED005A1B2"}, "received_at": "x"}
    caught = rejection("tts", orjson.dumps(document))
    assert caught.reason == "wrong_shape"
    assert not caught.routine
    assert caught.message == "uplink_message: missing (not an uplink message)"


def test_chirpstack_event_that_is_not_an_up_event() -> None:
    join = {
        "time": "2026-11-21T14:38:46.882Z",
        "deviceInfo": {"devEui": "a840414fc182f6c2"},
        "devAddr": "00189440",
    }
    caught = rejection("chirpstack", orjson.dumps(join))
    assert caught.reason == "not_uplink"
    assert caught.message == "a ChirpStack event that is not an up event (has no uplink field)"


def test_chirpstack_up_event_without_frame_counter_is_frame_counter_zero() -> None:
    # ChirpStack's protobuf JSON leaves fCnt out when it is 0: it is an up event still.
    document = fixture("chirpstack_up.json")
    del document["fCnt"]
    assert decode_doc("chirpstack", document).f_cnt == 0


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
            "DevEUI_uplink.Time: missing (or unset)",
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
        assert uplink.reason in {
            "not_json",
            "too_large",
            "wrong_shape",
            "bad_dev_eui",
            "not_uplink",
        }
        return
    assert normalize_dev_eui(uplink.dev_eui) == uplink.dev_eui
    assert uplink.time.utcoffset() is not None
    uplink.time.timestamp()  # what the spool stores
    assert uplink.time.astimezone(UTC).year >= 2000  # an unset time is never read as one
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


@pytest.mark.parametrize("name", sorted({**FIXTURE_FORMATS, **UPLINK_SAMPLES, **OTHER_SAMPLES}))
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
    fmt = {**FIXTURE_FORMATS, **UPLINK_SAMPLES, **OTHER_SAMPLES}[name]
    check_decode(fmt, orjson.dumps(damaged))


def every_key(value: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(value, dict):
        for key, child in value.items():
            found.add(key)
            found |= every_key(child)
    elif isinstance(value, list):
        for child in value:
            found |= every_key(child)
    return found


# Objects built from the keys the network servers really use, so that the decoders' own
# paths (markers of other events, gateway lists, times, Packet Broker) are reached often.
KNOWN_KEYS = sorted(
    set().union(
        *(every_key(fixture(n)) for n in {**FIXTURE_FORMATS, **UPLINK_SAMPLES, **OTHER_SAMPLES})
    )
)
known_objects = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(KNOWN_KEYS), children, max_size=8)
    ),
    max_leaves=30,
)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@given(document=st.dictionaries(st.sampled_from(KNOWN_KEYS), known_objects, max_size=12))
def test_decode_objects_of_known_keys(fmt: str, document: dict[str, Any]) -> None:
    check_decode(fmt, orjson.dumps(document))
