"""AMQP sink throughput: confirmed, persistent publishes to a durable queue of a RabbitMQ.

    PYTHONPATH=daemon:tests .venv/bin/python tests/bench/bench_amqp.py -n 5000 --in-flight 1 32

Starts a private RabbitMQ node (tests/support/rabbitmq.py; about fifteen seconds), binds a
durable queue to `amq.topic`, and sends `-n` ~600-byte uplinks through one AmqpSink with
`--in-flight` sends open at once (the worker's `max_in_flight`), each returning only once
the broker confirmed it. Prints sends per second and the median and 99th percentile of a
send's time, for each `--in-flight` value.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aio_pika
import orjson

from iotflow.connectors import parse_connection
from iotflow.sinks import SinkContext, create_sink
from iotflow.spool import Delivery
from support.rabbitmq import RabbitMQ
from support.uplinks import actility


async def run(node: RabbitMQ, count: int, in_flight: int) -> None:
    client = await aio_pika.connect(node.amqp_url)
    channel = await client.channel()
    queue = await channel.declare_queue(f"bench-{in_flight}", durable=True)
    await queue.bind("amq.topic", routing_key="bench.#")
    connection = parse_connection(
        {
            "id": "bench",
            "name": "bench",
            "connectorId": "actility-amqp-0.9.1-iot",
            "configuration": {
                "hostName": f"127.0.0.1:{node.amqp_port}",
                "username": node.username,
                "password": node.password,
                "uplinkTopicPattern": "bench.{DevEUI}",
                "downlinkEnabled": False,
            },
        }
    )
    sink = create_sink(connection, SinkContext(timeout=30, max_in_flight=in_flight))
    await sink.start()
    documents = [orjson.dumps(actility(f"{n % 100:016X}", n)) for n in range(count)]
    times: list[float] = []
    next_index = 0

    async def sender() -> None:
        nonlocal next_index
        while next_index < count:
            n = next_index
            next_index += 1
            now = time.time()
            began = time.perf_counter()
            await sink.send(Delivery(n, "bench", f"{n % 100:016X}", now, now, documents[n]))
            times.append(time.perf_counter() - began)

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(in_flight)))
    elapsed = time.perf_counter() - started
    await sink.close()
    await queue.purge()
    await client.close()
    times.sort()
    print(
        f"in flight {in_flight:3d}: {count / elapsed:8.0f} sends/s"
        f"  median {statistics.median(times) * 1000:6.2f} ms"
        f"  p99 {times[int(len(times) * 0.99) - 1] * 1000:6.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=5000, help="uplinks per run")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()
    with RabbitMQ() as node:
        print(f"RabbitMQ started in {node.start_seconds:.1f}s")
        for in_flight in args.in_flight:
            asyncio.run(run(node, args.n, in_flight))


if __name__ == "__main__":
    main()
