"""Processors (`upOperations`): each one on the product's uplink, field by field; conditions,
filters, the bound on JSONata, validation with key paths; and the worker applying them
before the sink (outcomes `filtered` and `failed`)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest

from iotflow.config.model import DeliverySettings
from iotflow.connectors import parse_connection
from iotflow.delivery.worker import ConnectionWorker
from iotflow.errors import ConfigError, SinkError
from iotflow.processors import Pipeline, ProcessorError, parse_operations
from iotflow.sinks import SinkContext, create_sink
from iotflow.spool import Delivery, Spool
from iotflow.states import Outcome
from iotflow.telemetry.metrics import Metrics
from support.mosquitto import Mosquitto
from test_delivery import Outcomes, ScriptedSink, settings
from test_sink_contract import RaisingSink

# The uplink of the product's documentation ("Uplink Message", ThingPark X IoT Flow), cut to
# the fields these tests read, with the values of a frame on port 2.
UPLINK: dict[str, Any] = {
    "DevEUI_uplink": {
        "Time": "2018-10-03T15:38:46.882+02:00",
        "DevEUI": "0018B20000000B20",
        "FPort": 2,
        "FCntUp": 1174,
        "MType": 4,
        "payload_hex": "9e1c4852512000220020e3831071",
        "mic_hex": "cfffc70f",
        "Lrcid": "00000206",
        "LrrRSSI": -80.0,
        "LrrSNR": 7.0,
        "SpFact": 7,
        "Lrrid": "004A18E3",
        "LrrLAT": 45.851032,
        "LrrLON": 1.266230,
        "Lrrs": {
            "Lrr": [
                {"Lrrid": "004A18E3", "Chain": 0, "LrrRSSI": -80.0, "LrrSNR": 7.0},
                {"Lrrid": "FF0101A2", "Chain": 0, "LrrRSSI": -112.0, "LrrSNR": -3.5},
            ]
        },
        "CustomerID": "1100000077",
        "CustomerData": {"alr": {"pro": "ADRF/DEMO", "ver": "2"}, "tags": ["site=Paris"]},
        "payload": {"temperature": 21.5, "humidity": 40},
        "BatteryLevel": 254,
        "BatteryTime": "2018-10-03T15:30:00.000+02:00",
    }
}


def run(operations: list[dict[str, Any]], document: Any = None) -> Any:
    parsed, problems = parse_operations(operations)
    assert problems == []
    assert parsed is not None
    return Pipeline(parsed).apply(copy.deepcopy(UPLINK if document is None else document))


# -- each processor ------------------------------------------------------------------------


def test_flattener_joins_keys_with_dots_into_one_level() -> None:
    out = run([{"type": "callProcessor", "id": "MESSAGE_FLATTENER"}])
    assert out == {
        "DevEUI_uplink.Time": "2018-10-03T15:38:46.882+02:00",
        "DevEUI_uplink.DevEUI": "0018B20000000B20",
        "DevEUI_uplink.FPort": 2,
        "DevEUI_uplink.FCntUp": 1174,
        "DevEUI_uplink.MType": 4,
        "DevEUI_uplink.payload_hex": "9e1c4852512000220020e3831071",
        "DevEUI_uplink.mic_hex": "cfffc70f",
        "DevEUI_uplink.Lrcid": "00000206",
        "DevEUI_uplink.LrrRSSI": -80.0,
        "DevEUI_uplink.LrrSNR": 7.0,
        "DevEUI_uplink.SpFact": 7,
        "DevEUI_uplink.Lrrid": "004A18E3",
        "DevEUI_uplink.LrrLAT": 45.851032,
        "DevEUI_uplink.LrrLON": 1.266230,
        # Arrays are values: kept whole.
        "DevEUI_uplink.Lrrs.Lrr": UPLINK["DevEUI_uplink"]["Lrrs"]["Lrr"],
        "DevEUI_uplink.CustomerID": "1100000077",
        "DevEUI_uplink.CustomerData.alr.pro": "ADRF/DEMO",
        "DevEUI_uplink.CustomerData.alr.ver": "2",
        "DevEUI_uplink.CustomerData.tags": ["site=Paris"],
        "DevEUI_uplink.payload.temperature": 21.5,
        "DevEUI_uplink.payload.humidity": 40,
        "DevEUI_uplink.BatteryLevel": 254,
        "DevEUI_uplink.BatteryTime": "2018-10-03T15:30:00.000+02:00",
    }
    assert all(not isinstance(v, dict) for v in out.values())


def test_simplifier_keeps_the_device_the_frame_the_payload_and_the_best_gateway() -> None:
    out = run([{"type": "callProcessor", "id": "MESSAGE_SIMPLIFIER"}])
    assert out == {
        "DevEUI_uplink": {
            "DevEUI": "0018B20000000B20",
            "Time": "2018-10-03T15:38:46.882+02:00",
            "FPort": 2,
            "FCntUp": 1174,
            "payload_hex": "9e1c4852512000220020e3831071",
            "payload": {"temperature": 21.5, "humidity": 40},
            # Battery fields: part of the product's simplified message since 1.7.16.
            "BatteryLevel": 254,
            "BatteryTime": "2018-10-03T15:30:00.000+02:00",
            # The best gateway's radio (ThingPark's top-level Lrr* fields), not the others'.
            "Lrrid": "004A18E3",
            "LrrRSSI": -80.0,
            "LrrSNR": 7.0,
            "SpFact": 7,
            "LrrLAT": 45.851032,
            "LrrLON": 1.266230,
        }
    }


def test_simplifier_leaves_out_what_the_uplink_does_not_have() -> None:
    document = {"DevEUI_uplink": {"DevEUI": "AA", "FPort": 1, "Lrrs": {"Lrr": []}}}
    out = run([{"type": "callProcessor", "id": "MESSAGE_SIMPLIFIER"}], document)
    assert out == {"DevEUI_uplink": {"DevEUI": "AA", "FPort": 1}}


def test_jmespath_placeholders_keep_their_json_type() -> None:
    template = {
        "port": "{{ DevEUI_uplink.FPort }}",
        "eui": "{{DevEUI_uplink.DevEUI}}",
        "values": "{{ DevEUI_uplink.payload }}",
        "rssi": ["{{ DevEUI_uplink.Lrrs.Lrr[*].LrrRSSI }}", "literal"],
        "missing": "{{ DevEUI_uplink.nothing }}",
        "text": "port {{ DevEUI_uplink.FPort }}",  # not exactly a placeholder: kept as text
        "fixed": 3,
    }
    out = run([{"type": "jmespath", "template": template}])
    assert out == {
        "port": 2,
        "eui": "0018B20000000B20",
        "values": {"temperature": 21.5, "humidity": 40},
        "rssi": [[-80.0, -112.0], "literal"],
        "missing": None,
        "text": "port {{ DevEUI_uplink.FPort }}",
        "fixed": 3,
    }
    assert isinstance(out["port"], int)


def test_jsonata_result_is_the_new_document() -> None:
    expression = (
        '{"device": DevEUI_uplink.DevEUI, "t": DevEUI_uplink.payload.temperature * 10,'
        ' "gateways": $count(DevEUI_uplink.Lrrs.Lrr)}'
    )
    out = run([{"type": "jsonata", "expression": expression}])
    assert out == {"device": "0018B20000000B20", "t": 215, "gateways": 2}


def test_operations_run_in_order_on_the_previous_result() -> None:
    out = run(
        [
            {"type": "callProcessor", "id": "MESSAGE_SIMPLIFIER"},
            {"type": "callProcessor", "id": "MESSAGE_FLATTENER"},
            {"type": "jmespath", "template": {"t": '{{ "DevEUI_uplink.payload.temperature" }}'}},
        ]
    )
    assert out == {"t": 21.5}


def test_condition_applies_an_operation_only_when_truthy() -> None:
    operations = [
        {
            "type": "jmespath",
            "condition": "DevEUI_uplink.FPort == `2`",
            "template": {"port2": "{{ DevEUI_uplink.DevEUI }}"},
        },
        {
            "type": "jmespath",
            "condition": "DevEUI_uplink.FPort == `3`",
            "template": {"port3": "{{ DevEUI_uplink.DevEUI }}"},
        },
    ]
    assert run(operations) == {"port2": "0018B20000000B20"}
    on_3 = copy.deepcopy(UPLINK)
    on_3["DevEUI_uplink"]["FPort"] = 3
    assert run(operations, on_3) == {"port3": "0018B20000000B20"}
    on_4 = copy.deepcopy(UPLINK)
    on_4["DevEUI_uplink"]["FPort"] = 4
    assert run(operations, on_4) == on_4  # neither applies: the document as it came


def test_filter_drops_on_falsy_and_keeps_on_truthy() -> None:
    keep_port_2 = [{"type": "filter", "expression": "DevEUI_uplink.FPort == `2`"}]
    assert run(keep_port_2) == UPLINK
    other = copy.deepcopy(UPLINK)
    other["DevEUI_uplink"]["FPort"] = 9
    assert run(keep_port_2, other) is None
    # JMESPath's falsy values: null (a missing field), "", [], {}, false.
    assert run([{"type": "filter", "expression": "DevEUI_uplink.absent"}]) is None
    assert run([{"type": "filter", "expression": "DevEUI_uplink.Lrrs.Lrr"}]) == UPLINK
    # A filter with a condition only filters when its condition holds.
    guarded = [
        {"type": "filter", "condition": "DevEUI_uplink.FPort == `9`", "expression": "`false`"}
    ]
    assert run(guarded) == UPLINK
    assert run(guarded, other) is None


def test_a_failing_operation_names_itself() -> None:
    with pytest.raises(ProcessorError) as caught:
        run(
            [
                {"type": "callProcessor", "id": "MESSAGE_FLATTENER"},
                {"type": "jsonata", "expression": '$number("not a number")'},
            ]
        )
    assert str(caught.value).startswith("upOperations[1] jsonata: ")
    with pytest.raises(ProcessorError, match=r"^upOperations\[0\] MESSAGE_SIMPLIFIER: "):
        run([{"type": "callProcessor", "id": "MESSAGE_SIMPLIFIER"}], {"not": "an uplink"})


def test_a_jsonata_expression_that_never_ends_is_stopped() -> None:
    looping = "( $f := function($n) { $n < 0 ? 0 : $f($n + 1) }; $f(0) )"
    long = "$sum([1..9999999].($ * 2))"
    for expression in (looping, long):
        started = time.monotonic()
        with pytest.raises(ProcessorError, match=r"^upOperations\[0\] jsonata: "):
            run([{"type": "jsonata", "expression": expression}])
        assert time.monotonic() - started < 2.0


# -- validation ----------------------------------------------------------------------------


def connection(**fields: Any) -> dict[str, Any]:
    return {
        "id": "c1",
        "name": "test",
        "connectorId": "actility-http-iot",
        "configuration": {"destinationURL": "http://127.0.0.1:9/"},
        **fields,
    }


def test_valid_operations_are_stored_and_shown() -> None:
    operations = [
        {"type": "callProcessor", "id": "MESSAGE_FLATTENER"},
        {"type": "filter", "expression": "`true`", "condition": "FPort"},
    ]
    parsed = parse_connection(connection(upOperations=operations))
    assert parsed.upOperations == operations
    assert parsed.document()["upOperations"] == operations
    # Round trip: what is shown validates again to the same.
    assert parse_connection(parsed.document()).upOperations == operations
    # None given, none shown (documents of existing connections do not change).
    assert "upOperations" not in parse_connection(connection()).document()


def test_invalid_operations_are_refused_with_key_paths() -> None:
    operations = [
        {"type": "callProcessor", "id": "MESSAGE_FLATTENER"},
        {"type": "jsonata", "expression": "$foo("},
        {"type": "filter", "expression": "a["},
        {"type": "jmespath", "template": {"a": ["{{ b[ }}"]}},
        {"type": "callProcessor", "id": "NO_SUCH"},
        {"type": "teleport"},
        {"type": "filter", "expression": "a", "condition": "=="},
        {"type": "jsonata"},
        {"type": "jsonata", "expression": "a", "extra": 1},
        "not an object",
    ]
    with pytest.raises(ConfigError) as caught:
        parse_connection(connection(upOperations=operations))
    paths = [p.path for p in caught.value.problems]
    assert paths == [
        "upOperations.1.expression",
        "upOperations.2.expression",
        "upOperations.3.template.a.0",
        "upOperations.4.id",
        "upOperations.5.type",
        "upOperations.6.condition",
        "upOperations.7.expression",
        "upOperations.8.extra",
        "upOperations.9",
    ]
    messages = {p.path: p.message for p in caught.value.problems}
    assert messages["upOperations.1.expression"].startswith("not a JSONata expression")
    assert messages["upOperations.2.expression"].startswith("not a JMESPath expression")


def test_operations_that_are_not_a_list_are_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_connection(connection(upOperations={"type": "filter"}))
    assert [p.path for p in caught.value.problems] == ["upOperations"]


# -- the worker ----------------------------------------------------------------------------


@pytest.fixture
async def spool(tmp_path: Path) -> Any:
    spool = await Spool.open(tmp_path / "spool.db")
    yield spool
    await spool.close()


def worker_for(
    spool: Spool,
    sink: Any,
    outcomes: Outcomes,
    operations: list[dict[str, Any]] | None,
    *,
    delivery: DeliverySettings | None = None,
    connector: str = "actility-http-iot",
    configuration: dict[str, Any] | None = None,
) -> ConnectionWorker:
    document = connection(
        connectorId=connector,
        configuration=configuration or {"destinationURL": "http://127.0.0.1:9/"},
    )
    if operations is not None:
        document["upOperations"] = operations
    original = spool.complete

    def complete(delivery_id: int, **final: Any) -> None:
        original(delivery_id, **final)
        asyncio.get_running_loop().create_task(outcomes.notify(delivery_id))

    spool.complete = complete  # type: ignore[method-assign]
    return ConnectionWorker(
        parse_connection(document),
        sink,
        spool=spool,
        metrics=Metrics(),
        settings=delivery or settings(),
        record=outcomes.record,
    )


async def feed(spool: Spool, worker: ConnectionWorker, documents: list[Any]) -> list[Delivery]:
    now = time.time()
    out = []
    for document in documents:
        eui = document["DevEUI_uplink"]["DevEUI"]
        for d in await spool.append(
            orjson.dumps(document),
            dev_eui=eui,
            uplink_time=now,
            received_at=now,
            connection_ids=["c1"],
        ):
            worker.offer(d)
            out.append(d)
    return out


def uplink(fport: int, eui: str = "0018B20000000B20") -> dict[str, Any]:
    document = copy.deepcopy(UPLINK)
    document["DevEUI_uplink"]["FPort"] = fport
    document["DevEUI_uplink"]["DevEUI"] = eui
    return document


def outcome_count(worker: ConnectionWorker, outcome: Outcome) -> float | None:
    return worker._metrics.registry.get_sample_value(
        "iotflow_deliveries_total", {"connection": "c1", "outcome": outcome}
    )


TWO: list[dict[str, Any]] = [
    {"type": "callProcessor", "id": "MESSAGE_FLATTENER"},
    {
        "type": "jmespath",
        "template": {"eui": '{{ "DevEUI_uplink.DevEUI" }}', "port": '{{ "DevEUI_uplink.FPort" }}'},
    },
]


async def test_the_sink_gets_the_transformed_document(spool: Spool) -> None:
    sink, outcomes = ScriptedSink(), Outcomes()
    worker = worker_for(spool, sink, outcomes, TWO)
    await worker.start()
    await feed(spool, worker, [uplink(2), uplink(3)])
    await outcomes.completed_count(2)
    bodies = sorted((orjson.loads(d.document) for _, d in sink.calls), key=lambda b: b["port"])
    assert bodies == [
        {"eui": "0018B20000000B20", "port": 2},
        {"eui": "0018B20000000B20", "port": 3},
    ]
    assert worker.stats.delivered == 2
    await worker.stop(time.monotonic())


async def test_without_processors_the_stored_bytes_go_out_untouched(spool: Spool) -> None:
    sink, outcomes = ScriptedSink(), Outcomes()
    worker = worker_for(spool, sink, outcomes, None)
    await worker.start()
    (sent,) = await feed(spool, worker, [uplink(2)])
    await outcomes.completed_count(1)
    ((_, got),) = sink.calls
    assert got is sent  # the same Delivery, its bytes never parsed nor copied
    await worker.stop(time.monotonic())


async def test_filtered_deliveries_are_counted_not_sent(spool: Spool) -> None:
    sink, outcomes = ScriptedSink(), Outcomes()
    operations = [{"type": "filter", "expression": "DevEUI_uplink.FPort == `2`"}]
    worker = worker_for(spool, sink, outcomes, operations)
    await worker.start()
    await feed(spool, worker, [uplink(2), uplink(5), uplink(5, "0018B20000000B21"), uplink(2)])
    await outcomes.completed_count(4)
    assert [orjson.loads(d.document)["DevEUI_uplink"]["FPort"] for _, d in sink.calls] == [2, 2]
    stats = worker.stats.document()
    assert (stats["delivered"], stats["filtered"], stats["failed"], stats["pending"]) == (
        2,
        2,
        0,
        0,
    )
    assert outcome_count(worker, Outcome.FILTERED) == 2
    assert outcome_count(worker, Outcome.DELIVERED) == 2
    # An operator's choice, not a fault: no event per filtered delivery, no lastError.
    assert [kind for kind, _ in outcomes.events if kind.startswith("delivery_")] == []
    assert worker.stats.lastError is None
    await worker.stop(time.monotonic())
    await spool.flush()
    assert await spool.pending_counts() == {}


async def test_a_failing_processor_fails_its_delivery_and_the_next_goes_out(spool: Spool) -> None:
    sink, outcomes = ScriptedSink(), Outcomes()
    # FPort 7 makes the JSONata expression divide a string: an error for that uplink only.
    operations = [
        {"type": "callProcessor", "id": "MESSAGE_SIMPLIFIER"},
        {
            "type": "jsonata",
            "expression": '{"v": DevEUI_uplink.FPort = 7 ? "x" * 2 : DevEUI_uplink.FPort}',
        },
    ]
    worker = worker_for(spool, sink, outcomes, operations, delivery=settings(max_in_flight=1))
    await worker.start()
    await feed(spool, worker, [uplink(7), uplink(2)])
    await outcomes.completed_count(2)
    assert [orjson.loads(d.document) for _, d in sink.calls] == [{"v": 2}]
    assert (worker.stats.failed, worker.stats.delivered) == (1, 1)
    (event,) = outcomes.kinds("delivery_failed")
    assert event["reason"].startswith("upOperations[1] jsonata: ")
    assert event["attempts"] == 0  # nothing was sent
    assert worker.stats.lastError == event["reason"]
    assert outcome_count(worker, Outcome.FAILED) == 1
    await worker.stop(time.monotonic())


class _Raises:
    """A sink that must never be reached: the filter is before it."""

    def __init__(self) -> None:
        self.calls = 0

    async def start(self) -> None:
        pass

    async def send(self, delivery: Delivery) -> None:
        self.calls += 1
        raise SinkError("must not be called")

    async def healthcheck(self) -> bool:
        return True

    async def close(self) -> None:
        pass


async def test_a_filter_stops_before_any_sink(spool: Spool) -> None:
    sink, outcomes = _Raises(), Outcomes()
    worker = worker_for(spool, sink, outcomes, [{"type": "filter", "expression": "`false`"}])
    await worker.start()
    await feed(spool, worker, [uplink(2)])
    await outcomes.completed_count(1)
    assert sink.calls == 0
    assert worker.stats.filtered == 1
    await worker.stop(time.monotonic())


async def test_the_same_processors_through_a_real_mqtt_sink(
    spool: Spool, mosquitto: Mosquitto
) -> None:
    """Applied by the worker, not by a connector: an MQTT connection to Mosquitto publishes
    the same reshaped documents, and its filter keeps the same uplinks out."""
    operations = [{"type": "filter", "expression": "DevEUI_uplink.FPort != `9`"}, *TWO]
    outcomes = Outcomes()
    mqtt = parse_connection(
        connection_document := {
            **connection(
                connectorId="actility-mqtt-iot",
                configuration={
                    "hostName": f"{mosquitto.host}:{mosquitto.port}",
                    "uplinkTopicPattern": "processed/c1/uplink",
                    "downlinkTopicPattern": None,
                },
            ),
            "upOperations": operations,
        }
    )
    assert connection_document["upOperations"] == operations
    sink = create_sink(mqtt, SinkContext(timeout=5, max_in_flight=4))
    worker = worker_for(
        spool,
        sink,
        outcomes,
        operations,
        connector="actility-mqtt-iot",
        configuration=connection_document["configuration"],
    )
    received: list[Any] = []
    arrived = asyncio.Event()
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
        await client.subscribe("processed/#", qos=1)

        async def listen() -> None:
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                received.append(orjson.loads(message.payload))
                arrived.set()

        task = asyncio.create_task(listen())
        try:
            await worker.start()
            await feed(spool, worker, [uplink(2), uplink(9), uplink(3)])
            await outcomes.completed_count(3)
            async with asyncio.timeout(10):
                while len(received) < 2:
                    arrived.clear()
                    await arrived.wait()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await worker.stop(time.monotonic())
    assert sorted(received, key=lambda b: b["port"]) == [
        {"eui": "0018B20000000B20", "port": 2},
        {"eui": "0018B20000000B20", "port": 3},
    ]
    assert (worker.stats.delivered, worker.stats.filtered) == (2, 1)


def test_a_provisioned_connection_with_a_bad_expression_is_a_config_error() -> None:
    from iotflow.config.load import parse_settings

    raw = {
        "connections": [
            connection(
                devices=["0018B20000000B20"],
                upOperations=[
                    {"type": "callProcessor", "id": "MESSAGE_FLATTENER"},
                    {"type": "jsonata", "expression": "$foo("},
                ],
            )
        ]
    }
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw, "test.toml", {})
    assert [p.path for p in caught.value.problems] == ["connections[0].upOperations.1.expression"]
    raw["connections"][0]["upOperations"][1]["expression"] = "$"
    (provisioned,) = parse_settings(raw, "test.toml", {}).connections
    assert provisioned.connection.upOperations == raw["connections"][0]["upOperations"]


async def test_the_same_processors_through_the_contract_s_raising_sink(spool: Spool) -> None:
    """The raising sink of the sink contract: a sink fault after the processors fails that
    delivery as the catch-all says, and the next one arrives processed."""
    sink, outcomes = RaisingSink(), Outcomes()
    sink.next_error = ValueError("a bug in a sink")
    worker = worker_for(spool, sink, outcomes, TWO, delivery=settings(max_in_flight=1))
    await worker.start()
    await feed(spool, worker, [uplink(2), uplink(3)])
    await outcomes.completed_count(2)
    assert [orjson.loads(body) for body in sink.delivered] == [
        {"eui": "0018B20000000B20", "port": 3}
    ]
    (event,) = outcomes.kinds("delivery_failed")
    assert event["reason"] == "ValueError: a bug in a sink"
    await worker.stop(time.monotonic())
