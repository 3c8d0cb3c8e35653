"""ThingsBoard, Splunk HEC and InfluxDB sinks: what one uplink costs. Prints figures.

1. The pure part, per uplink: decoding the stored document and building the request body
   (telemetry record, HEC envelope, line-protocol point), in microseconds.
2. Sends per second of each sink against its local double (tests/support/webdoubles.py)
   in this process, `--in-flight` sends at once: the double's own work is in the figure,
   so it is a floor of what the sink can do, not a measure of the cloud.

    .venv/bin/python tests/bench/bench_web_connectors.py [-n 2000] [--in-flight 8]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from iotflow.connectors import parse_connection
from iotflow.sinks import Sink, SinkContext, create_sink
from iotflow.sinks.influxdb import point
from iotflow.sinks.points import uplink_of
from iotflow.sinks.splunk import SplunkSink
from iotflow.sinks.thingsboard import telemetry
from iotflow.spool import Delivery

_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from support.uplinks import actility  # noqa: E402
from support.webdoubles import (  # noqa: E402
    FakeInfluxDb,
    FakeSplunkHec,
    FakeThingsBoard,
    ServiceDouble,
)

DEV = "0018B20000000B20"
DECODED = {"temperature": 21.5, "humidity": 40, "battery": {"level": 90, "low": False}}


def deliveries(n: int) -> list[Delivery]:
    out = []
    for i in range(n):
        doc = actility(DEV, i)
        doc["DevEUI_uplink"]["payload"] = DECODED
        now = time.time()
        out.append(Delivery(i + 1, "bench", DEV, now, now, orjson.dumps(doc)))
    return out


def pure(n: int) -> None:
    batch = deliveries(n)
    splunk = create_sink(
        parse_connection(
            {
                "id": "s",
                "name": "s",
                "connectorId": "actility-splunk-iot",
                "configuration": {"hostName": "splunk", "hecToken": "t"},
            }
        ),
        SinkContext(timeout=5, max_in_flight=1),
    )
    assert isinstance(splunk, SplunkSink)
    cases: dict[str, Any] = {
        "thingsboard telemetry": lambda d: orjson.dumps(telemetry(uplink_of(d))),
        "splunk envelope": lambda d: orjson.dumps(splunk.event(d)),
        "influxdb point": lambda d: point("uplink", uplink_of(d)),
    }
    for name, build in cases.items():
        started = time.perf_counter()
        for delivery in batch:
            build(delivery)
        elapsed = time.perf_counter() - started
        print(f"{name:24} {elapsed / n * 1e6:8.1f} µs per uplink (decode + body)")


async def sends(n: int, in_flight: int) -> None:
    doubles: dict[str, tuple[ServiceDouble, dict[str, Any]]] = {}
    board = FakeThingsBoard()
    board.add_device(DEV, "tb-token")
    hec = FakeSplunkHec("hec-token")
    influx = FakeInfluxDb("influx-token")
    for double in (board, hec, influx):
        await double.start()
    try:
        doubles = {
            "actility-thingsboard-iot": (
                board,
                {"hostName": board.base_url, "accessTokens": {DEV: "tb-token"}},
            ),
            "actility-splunk-iot": (hec, {"hostName": hec.base_url, "hecToken": "hec-token"}),
            "actility-influxdb-iot": (
                influx,
                {"hostName": influx.base_url, "org": "acme", "bucket": "lora",
                 "token": "influx-token"},
            ),
        }  # fmt: skip
        for connector, (_, configuration) in doubles.items():
            made = parse_connection(
                {"id": "b", "name": "b", "connectorId": connector, "configuration": configuration}
            )
            sink: Sink = create_sink(made, SinkContext(timeout=10, max_in_flight=in_flight))
            await sink.start()
            gate = asyncio.Semaphore(in_flight)

            async def one(
                delivery: Delivery, sink: Sink = sink, gate: asyncio.Semaphore = gate
            ) -> None:
                async with gate:
                    await sink.send(delivery)

            batch = deliveries(n)
            started = time.perf_counter()
            await asyncio.gather(*(one(d) for d in batch))
            elapsed = time.perf_counter() - started
            await sink.close()
            print(f"{connector:26} {n / elapsed:8.0f} sends/s ({in_flight} in flight, {n} sends)")
    finally:
        for double in (board, hec, influx):
            await double.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="uplinks per connector")
    parser.add_argument("--in-flight", type=int, default=8)
    args = parser.parse_args()
    pure(args.n)
    asyncio.run(sends(args.n, args.in_flight))


if __name__ == "__main__":
    main()
