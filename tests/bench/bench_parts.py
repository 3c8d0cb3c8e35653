"""What each part of an uplink's way through the daemon costs, measured alone, in one process.

    .venv/bin/python tests/bench/bench_parts.py            # every part, medians of 5
    .venv/bin/python tests/bench/bench_parts.py --repeat 9

`bench_routing.py` says what an uplink costs end to end (µs of daemon CPU per delivery);
the profile says how that splits. This prints the parts that the profile names, each in
isolation, so that a change to one can be measured without a broker and a cloud, and so
that the budget is written down:

- decoding each input format (`iotflow.formats.decode`), and orjson's parse alone;
- paho decoding one PUBLISH packet as MQTT 3.1.1 and as MQTT 5 (paho builds and parses a
  `Properties` object for every MQTT 5 PUBLISH, even one without properties), and the
  source's gate taking it from its read buffer, as the daemon does since round 6;
- one aiohttp POST to a local aiohttp server (in a process of its own), client CPU only, 32
  in flight on keep-alive connections, on the daemon's event loop (uvloop when installed;
  `IOTFLOW_EVENT_LOOP=asyncio` for the standard one): what `HttpSink.send` stands on, with
  aiohttp's own total timeout (before round 6) and under the sinks' `Deadlines`;
- a connection's delivery worker around a sink that answers at once, with the spool's
  completes (their deletes, committed): what a delivery costs besides the sink's request.

Each figure is the median over `--repeat` rounds of the CPU time per call of this process,
which other work on the machine changes little. Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import struct
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import orjson
from aiohttp import web
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for support/

from iotflow import mqtt_properties
from iotflow.cli import event_loop
from iotflow.config.model import DeliverySettings
from iotflow.connectors.connection import parse_connection
from iotflow.delivery.worker import ConnectionWorker
from iotflow.formats.decode import decode
from iotflow.mqtt_properties import SharedTableProperties
from iotflow.sinks.webapi import Deadlines
from iotflow.sources.ack import InflightGate
from iotflow.spool import Delivery, Spool
from iotflow.telemetry import logging as logs
from iotflow.telemetry.metrics import Metrics
from support.ports import free_port
from support.uplinks import uplink

DEV_EUI = "0018B20000000A01"


def per_call(fn: Callable[[], object], number: int, repeat: int) -> float:
    """µs of CPU per call: the median over `repeat` rounds of `number` calls each (CPU
    time, not wall time: another process on the core does not count)."""
    rounds = timeit.repeat(fn, number=number, repeat=repeat, timer=time.process_time)
    return statistics.median(rounds) / number * 1e6


def decoding(repeat: int) -> None:
    print("decoding an uplink (iotflow.formats.decode)")
    for fmt in ("actility", "chirpstack", "tts"):
        _, payload = uplink(fmt, DEV_EUI, 7)
        whole = per_call(lambda: decode(fmt, payload), 20_000, repeat)  # noqa: B023
        parse = per_call(lambda: orjson.loads(payload), 20_000, repeat)  # noqa: B023
        print(
            f"  {fmt:<11} {whole:6.1f} µs  (orjson.loads alone {parse:4.1f} µs, {len(payload)} B)"
        )


def publish_packet(topic: bytes, payload: bytes, *, mqtt5: bool) -> bytes:
    """The variable header and payload of a QoS 1 PUBLISH (what paho's decoder is given)."""
    properties = b"\x00" if mqtt5 else b""  # MQTT 5: a properties length of zero
    return struct.pack("!H", len(topic)) + topic + struct.pack("!H", 7) + properties + payload


def mqtt_decoding(repeat: int) -> None:
    topic, payload = uplink("actility", DEV_EUI, 7)
    print("paho decoding one QoS 1 PUBLISH of an Actility uplink")
    # paho's own Properties class, then the daemon's (iotflow.mqtt_properties).
    for name, mqtt5, version, properties in (
        ("MQTT 3.1.1", False, MQTTProtocolVersion.MQTTv311, Properties),
        ("MQTT 5, paho's Properties", True, MQTTProtocolVersion.MQTTv5, Properties),
        ("MQTT 5, shared tables", True, MQTTProtocolVersion.MQTTv5, SharedTableProperties),
    ):
        packet = publish_packet(topic.encode(), payload, mqtt5=mqtt5)
        _packet.Properties = properties  # type: ignore[attr-defined]
        cost = per_call(lambda: _packet.decode_publish(0x32, packet, version), 20_000, repeat)  # noqa: B023
        print(f"  {name:<26} {cost:6.1f} µs")
    mqtt_properties.install()
    packet = publish_packet(topic.encode(), payload, mqtt5=True)
    whole = bytes([0x32, 0x80 | len(packet) & 0x7F, len(packet) >> 7]) + packet  # <16 KiB
    costs = [asyncio.run(gate_taking(whole, 10_000)) for _ in range(repeat)]
    print(f"  {'MQTT 5, the gate (round 6)':<26} {statistics.median(costs):6.1f} µs")


async def gate_taking(packet: bytes, count: int) -> float:
    """CPU µs per message of the source's gate cutting `count` QoS 1 PUBLISH packets from
    its read buffer and handing each on (to a callback that does nothing)."""
    gate = InflightGate(
        aiomqtt.Client("127.0.0.1", protocol=aiomqtt.ProtocolVersion.V5),
        count,
        on_message=lambda *_: None,
    )
    gate._buffer = packet * count
    started = time.process_time()
    taken = gate._publishes()
    cost = (time.process_time() - started) / count * 1e6
    assert taken == count
    return cost


def serve(port: int, ready: multiprocessing.synchronize.Event) -> None:
    async def main() -> None:
        async def hook(request: web.Request) -> web.Response:
            await request.read()
            return web.Response()

        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


async def posts(url: str, body: bytes, count: int, in_flight: int, deadlines: bool) -> float:
    """Client CPU µs per POST, `in_flight` at once, as HttpSink makes them: under the sinks'
    `Deadlines` (one timer for all), or with aiohttp's total timeout (a timer per request)."""
    connector = aiohttp.TCPConnector(limit=in_flight, keepalive_timeout=60)
    timer = Deadlines(10)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout() if deadlines else aiohttp.ClientTimeout(total=10),
        headers={"Content-Type": "application/json"},
        cookie_jar=aiohttp.DummyCookieJar(),
    ) as session:
        left = count

        async def post() -> None:
            async with session.post(url, data=body, allow_redirects=False) as response:
                response.raise_for_status()

        async def sender() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                if deadlines:
                    with timer:
                        await post()
                else:
                    await post()

        await asyncio.gather(*(sender() for _ in range(in_flight)))  # warm: connections open
        left = count
        started = time.process_time()
        await asyncio.gather(*(sender() for _ in range(in_flight)))
        timer.close()
        return (time.process_time() - started) / count * 1e6


def rounds(what: str, repeat: int, measure: Callable[[], Coroutine[Any, Any, float]]) -> None:
    """Print the median of `repeat` rounds of `measure`, each on a fresh event loop of the
    daemon's kind (uvloop when installed, unless IOTFLOW_EVENT_LOOP=asyncio)."""
    factory = event_loop()
    costs = []
    for _ in range(repeat):
        with asyncio.Runner(loop_factory=factory) as runner:
            costs.append(runner.run(measure()))
    print(f"  {what} {statistics.median(costs):6.1f} µs  (rounds: "
          + ", ".join(f"{c:.0f}" for c in costs) + ")")  # fmt: skip


def http_posts(repeat: int) -> None:
    port = free_port()
    ready = multiprocessing.Event()
    server = multiprocessing.Process(target=serve, args=(port, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(30):
            raise SystemExit("the local server did not start")
        _, body = uplink("actility", DEV_EUI, 7)
        url = f"http://127.0.0.1:{port}/hook"
        loop = "uvloop" if event_loop() is not None else "asyncio"
        print(f"aiohttp POST to a local server, 32 in flight (client CPU, {loop})")
        rounds(
            "per request, aiohttp's total timeout  ",
            repeat,
            lambda: posts(url, body, 5_000, 32, False),
        )
        rounds(
            "per request, under the sinks' Deadlines",
            repeat,
            lambda: posts(url, body, 5_000, 32, True),
        )
    finally:
        server.kill()
        server.join()


class _AtOnce:
    """A sink that answers every delivery at once: the worker's own cost is what is left."""

    def __init__(self, expected: int) -> None:
        self.sent = 0
        self.expected = expected
        self.all_sent = asyncio.Event()

    async def start(self) -> None:
        pass

    async def send(self, delivery: Delivery) -> None:
        self.sent += 1
        if self.sent == self.expected:
            self.all_sent.set()

    async def healthcheck(self) -> bool:
        return True

    async def close(self) -> None:
        pass


async def worker_deliveries(count: int) -> float:
    """CPU µs per delivery of a ConnectionWorker (32 in flight, 500 devices) and the spool's
    completes, from the offer of committed deliveries to their deletes committed."""
    with tempfile.TemporaryDirectory() as tmp:
        spool = await Spool.open(Path(tmp) / "spool.db")
        _, document = uplink("actility", DEV_EUI, 7)
        now = time.time()
        appended = [
            spool.submit(
                document,
                dev_eui=f"{n % 500:016X}",
                uplink_time=now,
                received_at=now,
                connection_ids=("bench",),
            )
            for n in range(count)
        ]
        deliveries = [d for batch in await asyncio.gather(*appended) for d in batch]
        connection = parse_connection(
            {
                "id": "bench",
                "name": "bench",
                "connectorId": "actility-http-iot",
                "configuration": {"destinationURL": "http://127.0.0.1:9/"},
            }
        )
        sink = _AtOnce(count)
        worker = ConnectionWorker(
            connection,
            sink,
            spool=spool,
            metrics=Metrics(),
            settings=DeliverySettings(max_in_flight=32, memory_queue=2 * count),
            record=lambda *_: None,
        )
        worker.nothing_stored()
        await worker.start()
        started = time.process_time()
        for delivery in deliveries:
            worker.offer(delivery)
        await sink.all_sent.wait()
        await spool.flush()  # the last completes committed
        cost = (time.process_time() - started) / count * 1e6
        await worker.stop(time.monotonic() + 1)
        await spool.close()
        return cost


def delivery_worker(repeat: int) -> None:
    print("a delivery worker around a sink that answers at once, with the spool's completes")
    rounds("per delivery", repeat, lambda: worker_deliveries(20_000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="rounds per figure (median)")
    args = parser.parse_args()
    logs.configure("warning", "console")  # the worker's state changes are not figures
    with open("/proc/loadavg") as f:
        print(f"load average {f.read().split()[0]}; Python {sys.version.split()[0]}")
    decoding(args.repeat)
    mqtt_decoding(args.repeat)
    http_posts(args.repeat)
    delivery_worker(args.repeat)


if __name__ == "__main__":
    main()
