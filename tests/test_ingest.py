"""HTTP ingest: `POST /iot-flow/v1/ingest/{id}` as ThingPark, The Things Stack and ChirpStack
push uplinks, through `iotflow run` (and one in-process daemon whose spool is closed).

The ThingPark Token is checked against a request that ThingPark itself signed (published
with its key, see docs/ingest.md), and against SHA-256 computed by openssl over a string
written out here by hand: neither goes through iotflow's own helpers.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest
from yarl import URL

from iotflow.app import Daemon
from iotflow.config.load import load_settings, parse_settings
from iotflow.errors import ConfigError
from iotflow.ingest.thingpark import ReplayGuard, Unauthorized, uplink_token, verify_uplink
from support.clouds import Behaviour, FakeCloud
from support.daemon import DaemonProcess
from support.mosquitto import Mosquitto
from support.uplinks import actility, chirpstack, tts

INGEST = "/iot-flow/v1/ingest"
AS_ID = "TWA_100000001.1.AS"
AS_KEY = "0123456789abcdef0123456789abcdef"
TTS_KEY = "tts-webhook-secret"
CS_TOKEN = "chirpstack-integration-token"
DEV = "0018B20000000A01"
UNBOUND = "0018B20000000A99"
NON_UP_EVENTS = ("join", "status", "ack", "txack", "log", "location", "integration")

# -- the Token, against vectors computed without iotflow -----------------------------------

# A request captured from ThingPark's network server (User-Agent ACTILITY-LRCLRN-DEVICE-AGENT)
# with the LRC-AS key 00112233445566778899aabbccddeeff, published in
# github.com/iotacademy/LoRaPayloadSimulator (1_KPN_LoRa_Example.md). Only the fields that
# ThingPark signs, and two that it does not, are kept from its body.
CAPTURED_KEY = "00112233445566778899aabbccddeeff"
CAPTURED_QUERY = (
    "LrnDevEui=0059AC000010020D&LrnFPort=2&LrnInfos=TWA_100006246.167.AS-1-1361149"
    "&AS_ID=hookbin&Time=2016-07-05T08:58:26.911%2B02:00"
    "&Token=18f44bb294f9dd33b5168eeb92a0c7f9fa807914097dc9bb2ed5a789a65fad33"
)
CAPTURED_BODY = {
    "DevEUI_uplink": {
        "Time": "2016-07-05T08:58:26.654+02:00",
        "DevEUI": "0059AC000010020D",
        "FPort": "2",
        "FCntUp": "3",
        "payload_hex": "00277c0878fd9b2e000000000000ffff",
        "LrrRSSI": "-100.000000",
        "CustomerID": "100006246",
        "CustomerData": {"alr": {"pro": "SMTC/LoRaMote", "ver": "1"}},
    }
}
CAPTURED_AT = datetime(2016, 7, 5, 6, 58, 30, tzinfo=UTC)


def test_the_token_of_a_request_thingpark_signed_is_accepted() -> None:
    token, sent_at = verify_uplink(
        CAPTURED_QUERY,
        CAPTURED_BODY,
        as_id="hookbin",
        key=CAPTURED_KEY,
        now=CAPTURED_AT,
        max_skew=timedelta(minutes=2),
    )
    assert token == "18f44bb294f9dd33b5168eeb92a0c7f9fa807914097dc9bb2ed5a789a65fad33"
    assert sent_at == datetime(2016, 7, 5, 6, 58, 26, 911000, tzinfo=UTC)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda q, b, k: (q, b, "00112233445566778899aabbccddeefe"), "another key"),
        (lambda q, b, k: (q.replace("LrnFPort=2", "LrnFPort=3"), b, k), "a query changed"),
        (lambda q, b, k: (q, _with(b, FCntUp="4"), k), "FCntUp changed"),
        (lambda q, b, k: (q, _with(b, payload_hex="00"), k), "payload changed"),
        (lambda q, b, k: (q, _with(b, CustomerID="100006247"), k), "CustomerID changed"),
        (lambda q, b, k: (q.replace("AS_ID=hookbin", "AS_ID=other"), b, k), "another AS_ID"),
    ],
)
def test_a_changed_request_or_key_does_not_verify(change: Any, why: str) -> None:
    query, body, key = change(CAPTURED_QUERY, CAPTURED_BODY, CAPTURED_KEY)
    with pytest.raises(Unauthorized):
        verify_uplink(
            query, body, as_id="hookbin", key=key, now=CAPTURED_AT, max_skew=timedelta(minutes=2)
        )


def test_fields_thingpark_does_not_sign_may_change() -> None:
    body = _with(CAPTURED_BODY, LrrRSSI="-50.000000", Lrrid="FF0103E7")
    verify_uplink(
        CAPTURED_QUERY,
        body,
        as_id="hookbin",
        key=CAPTURED_KEY,
        now=CAPTURED_AT,
        max_skew=timedelta(minutes=2),
    )


def test_the_token_is_sha256_of_body_elements_query_and_key_as_openssl_computes_it() -> None:
    # The example of KPN's ThingPark documentation, written out by hand: CustomerID
    # 100000507, DevEUI 000000000F1D8693, FPort 2, FCntUp 7, payload_hex 0110027bd00... as
    # its post concatenates them, then the query without Token, then the AS key.
    text = (
        "100000507000000000F1D8693270110027bd00"
        "LrnDevEui=000000000F1D8693&LrnFPort=2&LrnInfos=UPHTTP_LAB_LORA"
        "&AS_ID=app1.sample.com&Time=2016-01-11T14:11:11"
        "46ab678cd45df4a4e4b375Eacd096acc"
    )
    digest = subprocess.run(
        ["openssl", "dgst", "-sha256", "-r"], input=text.encode(), capture_output=True, check=True
    ).stdout.split()[0]
    # The Token the documentation gives for it.
    assert digest.decode() == "9bf99ba78791ad7f02c8d24dafe0a47da895ded5a0add99584d48d45c0e750a3"
    assert (
        uplink_token(
            "100000507000000000F1D8693270110027bd00",
            "LrnDevEui=000000000F1D8693&LrnFPort=2&LrnInfos=UPHTTP_LAB_LORA"
            "&AS_ID=app1.sample.com&Time=2016-01-11T14:11:11",
            "46ab678cd45df4a4e4b375Eacd096acc",
        )
        == digest.decode()
    )


def test_a_time_outside_the_skew_is_refused_even_when_signed() -> None:
    with pytest.raises(Unauthorized, match="from the server's clock"):
        verify_uplink(
            CAPTURED_QUERY,
            CAPTURED_BODY,
            as_id="hookbin",
            key=CAPTURED_KEY,
            now=CAPTURED_AT + timedelta(minutes=3),
            max_skew=timedelta(minutes=2),
        )


def test_the_replay_guard_refuses_a_token_within_the_window_and_forgets_it_after() -> None:
    now = [1_000_000.0]
    guard = ReplayGuard(clock=lambda: now[0])
    sent = datetime.fromtimestamp(now[0], UTC)
    skew = timedelta(minutes=2)
    guard.use("a" * 64, sent, skew)
    with pytest.raises(Unauthorized, match="replay"):
        guard.use("a" * 64, sent, skew)
    guard.use("b" * 64, sent + timedelta(seconds=30), skew)
    now[0] += 121  # past a's window, inside b's
    guard.use("c" * 64, datetime.fromtimestamp(now[0], UTC), skew)
    assert len(guard) == 2  # a was dropped: memory holds the window only
    with pytest.raises(Unauthorized):
        guard.use("b" * 64, sent + timedelta(seconds=30), skew)
    guard.release("c" * 64)  # a request not taken (503) may come again
    guard.use("c" * 64, datetime.fromtimestamp(now[0], UTC), skew)


# -- config ---------------------------------------------------------------------------------


def _config_problems(entries: list[dict[str, Any]]) -> list[str]:
    try:
        parse_settings({"ingest": entries}, "test.toml", {})
    except ConfigError as exc:
        return [str(p) for p in exc.problems]
    return []


def test_ingest_entries_are_validated_with_key_paths_and_no_secret_in_messages() -> None:
    good = {"id": "tp", "format": "actility", "auth": "thingpark", "as_id": AS_ID}
    assert _config_problems([{**good, "as_key": AS_KEY}]) == []
    problems = _config_problems(
        [
            good,  # no as_key
            {"id": "cs", "format": "chirpstack", "auth": "thingpark", "as_id": "x", "as_key": "k"},
            {"id": "h", "format": "tts", "auth": "header", "token": "s3cr3t-value"},
            {"id": "b", "format": "tts", "auth": "bearer", "token": "t", "as_key": "s3cr3t-k"},
            {"id": "bad id/x", "format": "nope", "auth": "basic", "token": "t"},
            {"id": "tp", "format": "actility", "auth": "bearer", "token": "t", "extra": 1},
        ]
    )
    text = "\n".join(problems)
    for expected in (
        "ingest.0: auth = 'thingpark' needs as_key",
        "ingest.1: auth = 'thingpark' signs ThingPark uplinks: format must be 'actility'",
        "ingest.2: auth = 'header' needs header",
        "ingest.3: auth = 'bearer' does not use as_key",
        "ingest.4.id: ",
        "ingest.4.format: unknown format 'nope'",
        "ingest.4.auth: ",
    ):
        assert expected in text
    assert "ingest.5.extra: unknown field" in text
    assert "s3cr3t" not in text
    duplicate = {"id": "same", "format": "tts", "auth": "bearer", "token": "t"}
    assert any("duplicate ingest id same" in p for p in _config_problems([duplicate, duplicate]))


# -- end to end -------------------------------------------------------------------------------


def _with(document: dict[str, Any], **fields: Any) -> dict[str, Any]:
    inner = {**document["DevEUI_uplink"], **fields}
    return {"DevEUI_uplink": inner}


def _sign(body: dict[str, Any], query: str, key: str) -> str:
    """ThingPark's Token, written here without iotflow's helpers."""
    up = body["DevEUI_uplink"]
    elements = "".join(
        str(up.get(k, "")) for k in ("CustomerID", "DevEUI", "FPort", "FCntUp", "payload_hex")
    )
    return hashlib.sha256((elements + query + key).encode()).hexdigest()


def thingpark_url(
    base: str, body: dict[str, Any], *, key: str = AS_KEY, at: datetime | None = None
) -> URL:
    """The URL ThingPark posts an uplink to: its query parameters, Token last."""
    sent = (at or datetime.now(UTC)).isoformat(timespec="milliseconds")
    up = body["DevEUI_uplink"]
    query = (
        f"LrnDevEui={up['DevEUI']}&LrnFPort={up['FPort']}&LrnInfos=TWA_100000001.1.AS-1-42"
        f"&AS_ID={AS_ID}&Time={sent}"
    )
    token = _sign(body, query, key)
    encoded = query.replace(f"Time={sent}", f"Time={quote(sent, safe=':')}")
    return URL(f"{base}{INGEST}/thingpark?{encoded}&Token={token}", encoded=True)


def tp_uplink(fcnt: int, dev: str = DEV) -> dict[str, Any]:
    doc = actility(dev, fcnt)
    doc["DevEUI_uplink"]["CustomerID"] = "100000001"
    return doc


INGEST_TOML = f"""
[[ingest]]
id = "thingpark"
format = "actility"
auth = "thingpark"
as_id = "{AS_ID}"
as_key = "${{TEST_AS_KEY}}"

[[ingest]]
id = "tts"
format = "tts"
auth = "header"
header = "X-Api-Key"
token = "{TTS_KEY}"
max_body_bytes = 2048

[[ingest]]
id = "chirpstack"
format = "chirpstack"
auth = "bearer"
token = "{CS_TOKEN}"
"""


def connection(url: str) -> dict[str, Any]:
    return {
        "id": "sink",
        "name": "ingest test",
        "connectorId": "actility-http-iot",
        "devices": [DEV],
        "configuration": {"destinationURL": url, "uplinkTimeValidity": "1h"},
    }


def make_daemon(tmp_path: Path, mosquitto: Mosquitto, cloud: FakeCloud) -> DaemonProcess:
    return DaemonProcess(
        tmp_path / "ingest",
        broker_url=mosquitto.url,
        connections=[connection(cloud.url("/up"))],
        extra=INGEST_TOML,
        env={"TEST_AS_KEY": AS_KEY},
    )


@pytest.fixture
async def daemon(
    tmp_path: Path, mosquitto: Mosquitto, cloud: FakeCloud, daemons: list[DaemonProcess]
) -> DaemonProcess:
    process = make_daemon(tmp_path, mosquitto, cloud)
    daemons.append(process)
    await process.start()
    return process


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(
    http: aiohttp.ClientSession, url: str | URL, body: Any, **headers: str
) -> tuple[int, Any, dict[str, str]]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = {"Content-Type": "application/json", **headers}
    async with http.post(url, data=data, headers=headers) as r:
        text = await r.read()
        return r.status, (orjson.loads(text) if text else None), dict(r.headers)


def fcnts(cloud: FakeCloud) -> list[int]:
    return [r.json["DevEUI_uplink"]["FCntUp"] for r in cloud.accepted]


@pytest.mark.slow
async def test_thingpark_signed_uplink_is_delivered_and_bad_stale_or_replayed_are_refused(
    daemon: DaemonProcess, cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    body = tp_uplink(1)
    url = thingpark_url(daemon.api, body)
    status, answer, _ = await post(http, url, body)
    assert (status, answer) == (200, {"accepted": True, "routed": True})
    await cloud.wait_for(1)
    assert fcnts(cloud) == [1]

    status, replayed, _ = await post(http, url, body)  # the same request again
    assert status == 401
    assert replayed["code"] == "unauthorized"

    other = tp_uplink(2)
    refused = [
        (thingpark_url(daemon.api, other, key="f" * 32), other),  # not our key
        (thingpark_url(daemon.api, tp_uplink(3)), other),  # signed for another body
        (  # a valid signature of a Time beyond max_clock_skew (2m)
            thingpark_url(daemon.api, other, at=datetime.now(UTC) - timedelta(minutes=5)),
            other,
        ),
        (URL(f"{daemon.api}{INGEST}/thingpark"), other),  # no query at all
        (URL(str(thingpark_url(daemon.api, other)).rsplit("&Token=", 1)[0]), other),
    ]
    for target, payload in refused:
        status, answer, _ = await post(http, target, payload)
        assert status == 401, (target, answer)
        assert answer == replayed  # one answer, whatever was wrong
    assert (
        await daemon.metric("iotflow_ingest_requests_total", ingest="thingpark", result="accepted")
        == 1
    )
    assert await daemon.metric(
        "iotflow_ingest_requests_total", ingest="thingpark", result="unauthorized"
    ) == 1 + len(refused)
    assert await daemon.metric("iotflow_uplinks_received_total", format="actility") == 1
    assert fcnts(cloud) == [1]
    # The key never reaches a log line.
    assert not [line for line in daemon.output if AS_KEY in line]


@pytest.mark.slow
async def test_header_and_bearer_tokens_and_unknown_ids(
    daemon: DaemonProcess, cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    tts_url = f"{daemon.api}{INGEST}/tts"
    cs_url = f"{daemon.api}{INGEST}/chirpstack?event=up"
    assert (await post(http, tts_url, tts(DEV, 10), **{"X-Api-Key": TTS_KEY}))[0] == 200
    assert (await post(http, cs_url, chirpstack(DEV, 11), Authorization=f"Bearer {CS_TOKEN}"))[
        0
    ] == 200
    # Unrouted: accepted, nothing to deliver.
    status, answer, _ = await post(
        http, cs_url, chirpstack(UNBOUND, 12), Authorization=f"Bearer {CS_TOKEN}"
    )
    assert (status, answer) == (200, {"accepted": True, "routed": False})
    await cloud.wait_for(2)

    unauthorized = [
        (tts_url, tts(DEV, 20), {"X-Api-Key": TTS_KEY + "x"}),
        (tts_url, tts(DEV, 21), {}),
        (tts_url, tts(DEV, 22), {"X-Api-Key": TTS_KEY[:-1]}),
        (tts_url, tts(DEV, 23), {"Authorization": f"Bearer {TTS_KEY}"}),  # not the header
        (cs_url, chirpstack(DEV, 24), {"Authorization": f"Bearer {CS_TOKEN}x"}),
        (cs_url, chirpstack(DEV, 25), {"Authorization": CS_TOKEN}),  # no scheme
        (cs_url, chirpstack(DEV, 26), {"Authorization": "Bearer test-token"}),  # the API's
        (cs_url, chirpstack(DEV, 27), {}),
    ]
    answers = []
    for url, body, headers in unauthorized:
        status, answer, _ = await post(http, url, body, **headers)
        assert status == 401, (url, headers, answer)
        answers.append(answer)
    # An unknown ingest id gets the very same answer as bad credentials.
    for unknown in ("nope", "thingpark2", "TTS"):
        status, answer, _ = await post(
            http, f"{daemon.api}{INGEST}/{unknown}", tts(DEV, 30), **{"X-Api-Key": TTS_KEY}
        )
        assert status == 401
        answers.append(answer)
    assert all(a == answers[0] for a in answers)
    assert sorted(fcnts(cloud)) == [10, 11]
    assert (
        await daemon.metric("iotflow_ingest_requests_total", ingest="tts", result="unauthorized")
        == 4
    )
    assert (
        await daemon.metric(
            "iotflow_ingest_requests_total", ingest="chirpstack", result="unauthorized"
        )
        == 4
    )
    assert (
        await daemon.metric(
            "iotflow_ingest_requests_total", ingest="(unknown)", result="unauthorized"
        )
        == 3
    )
    assert await daemon.metric("iotflow_uplinks_received_total", format="tts") == 1
    assert await daemon.metric("iotflow_uplinks_received_total", format="chirpstack") == 2
    assert not [line for line in daemon.output if TTS_KEY in line or CS_TOKEN in line]


@pytest.mark.slow
async def test_chirpstack_events_that_are_not_uplinks_are_answered_204_and_counted(
    daemon: DaemonProcess, cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    auth = {"Authorization": f"Bearer {CS_TOKEN}"}
    for event in NON_UP_EVENTS:
        # ChirpStack's event bodies are not up events; an up body proves the event decides.
        status, answer, _ = await post(
            http, f"{daemon.api}{INGEST}/chirpstack?event={event}", chirpstack(DEV, 40), **auth
        )
        assert (status, answer) == (204, None), event
    status, _, _ = await post(
        http, f"{daemon.api}{INGEST}/chirpstack?event=up", chirpstack(DEV, 41), **auth
    )
    assert status == 200
    await cloud.wait_for(1)
    assert fcnts(cloud) == [41]
    rejected = await daemon.metric("iotflow_uplinks_rejected_total", reason="not_uplink")
    assert rejected == len(NON_UP_EVENTS)
    assert await daemon.metric(
        "iotflow_ingest_requests_total", ingest="chirpstack", result="rejected"
    ) == len(NON_UP_EVENTS)
    # A non-up event still needs the credentials.
    status, _, _ = await post(
        http, f"{daemon.api}{INGEST}/chirpstack?event=join", chirpstack(DEV, 42)
    )
    assert status == 401


@pytest.mark.slow
async def test_oversized_and_malformed_bodies_are_refused_and_change_nothing(
    daemon: DaemonProcess, cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    key = {"X-Api-Key": TTS_KEY}
    url = f"{daemon.api}{INGEST}/tts"
    big = tts(DEV, 50)
    big["uplink_message"]["decoded_payload"] = {"padding": "x" * 4096}  # past max_body_bytes
    status, answer, _ = await post(http, url, big, **key)
    assert (status, answer["code"]) == (413, "payload_too_large")

    for body, code in (
        (b"{not json", "not_json"),
        (b"[1, 2]", "not_json"),
        (orjson.dumps(chirpstack(DEV, 51)), "wrong_shape"),  # another network server's
        (orjson.dumps({**tts(DEV, 52), "end_device_ids": {"dev_eui": "xyz"}}), "bad_dev_eui"),
    ):
        status, answer, _ = await post(http, url, body, **key)
        assert status == 400, body
        assert answer["code"] == code
        assert set(answer) == {"code", "message", "details"}
    # ThingPark: a body that is not JSON cannot carry the signed elements: 401, not 400.
    status, _, _ = await post(http, thingpark_url(daemon.api, tp_uplink(53)), b"{oops")
    assert status == 401
    assert (
        await daemon.metric("iotflow_ingest_requests_total", ingest="tts", result="rejected") == 5
    )
    assert await daemon.metric("iotflow_uplinks_rejected_total", reason="not_json") == 2
    assert await daemon.metric("iotflow_uplinks_rejected_total", reason="wrong_shape") == 1
    # The daemon still takes uplinks, and took none of those.
    assert (await post(http, url, tts(DEV, 54), **key))[0] == 200
    await cloud.wait_for(1)
    assert fcnts(cloud) == [54]


@pytest.mark.slow
async def test_kill_9_right_after_a_200_the_uplink_is_delivered_after_restart(
    tmp_path: Path,
    mosquitto: Mosquitto,
    cloud: FakeCloud,
    daemons: list[DaemonProcess],
    http: aiohttp.ClientSession,
) -> None:
    cloud.set_behaviour(Behaviour(status=503))  # nothing can leave before the kill
    process = make_daemon(tmp_path, mosquitto, cloud)
    daemons.append(process)
    await process.start()
    body = tp_uplink(60)
    status, _, _ = await post(http, thingpark_url(process.api, body), body)
    assert status == 200
    await process.kill()  # SIGKILL at once: no drain, no goodbye
    assert cloud.accepted == []
    cloud.set_behaviour(Behaviour(status=200))
    await process.start()
    await cloud.wait_for(1, timeout=60)
    assert 60 in fcnts(cloud)
    assert await process.stop() == 0


@pytest.mark.slow
async def test_503_with_retry_after_when_the_spool_cannot_commit(
    tmp_path: Path, mosquitto: Mosquitto, cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    # In process: the daemon's real spool, closed under it, refuses every commit.
    layout = make_daemon(tmp_path, mosquitto, cloud)  # writes the config; not started
    settings = load_settings(layout.config_path, env={"TEST_AS_KEY": AS_KEY})
    daemon = Daemon(settings)
    await daemon.start()
    try:
        assert daemon.spool is not None
        await daemon.spool.close()
        body = tp_uplink(70)
        url = thingpark_url(layout.api, body)
        status, answer, headers = await post(http, url, body)
        assert status == 503
        assert answer["code"] == "spool_unavailable"
        assert headers["Retry-After"] == "10"
        # The same signed request may come again: it is not taken for a replay.
        status, _, _ = await post(http, url, body)
        assert status == 503
        labels = {"ingest": "thingpark", "result": "unavailable"}
        assert (
            daemon.metrics.registry.get_sample_value("iotflow_ingest_requests_total", labels) == 2
        )
    finally:
        await daemon.shutdown()


@pytest.mark.slow
async def test_a_reload_rotates_the_credentials_without_a_restart(
    daemon: DaemonProcess, cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    url = f"{daemon.api}{INGEST}/tts"
    assert (await post(http, url, tts(DEV, 80), **{"X-Api-Key": TTS_KEY}))[0] == 200
    daemon.extra = INGEST_TOML.replace(TTS_KEY, "rotated-key")
    daemon.write_config([connection(cloud.url("/up"))])
    await daemon.signal(signal.SIGHUP)
    await daemon.wait_log(lambda e: e.get("event") == "Config reloaded")
    assert (await post(http, url, tts(DEV, 81), **{"X-Api-Key": TTS_KEY}))[0] == 401
    assert (await post(http, url, tts(DEV, 82), **{"X-Api-Key": "rotated-key"}))[0] == 200
    await cloud.wait_for(2)
    assert sorted(fcnts(cloud)) == [80, 82]
