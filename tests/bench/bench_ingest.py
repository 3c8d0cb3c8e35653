"""HTTP ingest: requests a second and latency to the 200 (which comes after the spool commit).

    .venv/bin/python tests/bench/bench_ingest.py -n 2000 --concurrency 16

Starts a Mosquitto (the daemon needs its broker), a fake webhook cloud and `iotflow run`
with one `[[ingest]]` entry (The Things Stack format, header auth) and one connection bound
to `--devices` devices; posts `-n` uplinks with `--concurrency` requests in flight, then
waits until the cloud has every one. Prints one line of figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

_TESTS = str(Path(__file__).resolve().parents[1])
# `support` is the test suite's package of real parts (broker, daemon process, uplinks).
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from support.clouds import FakeCloud  # noqa: E402
from support.daemon import DaemonProcess  # noqa: E402
from support.mosquitto import Mosquitto  # noqa: E402
from support.uplinks import tts  # noqa: E402

INGEST = (
    '[[ingest]]\nid = "tts"\nformat = "tts"\nauth = "header"\nheader = "X-Api-Key"\ntoken = "k"\n'
)


async def run(count: int, concurrency: int, devices: int) -> str:
    # In the current directory, on a real disk: the spool's fsync costs what it costs.
    workdir = Path.cwd()
    with Mosquitto() as broker, tempfile.TemporaryDirectory(dir=workdir) as tmp:
        async with FakeCloud() as cloud:
            euis = [f"0018B2000000{n:04X}" for n in range(devices)]
            connection: dict[str, Any] = {
                "id": "bench",
                "name": "bench",
                "connectorId": "actility-http-iot",
                "devices": euis,
                "configuration": {"destinationURL": cloud.url("/up"), "uplinkTimeValidity": "1h"},
            }
            daemon = DaemonProcess(
                Path(tmp) / "daemon",  # absolute: tmp is made under the absolute workdir
                broker_url=broker.url,
                connections=[connection],
                extra=INGEST,
            )
            try:
                await daemon.start()
                queue: asyncio.Queue[bytes] = asyncio.Queue()
                for i in range(count):
                    queue.put_nowait(orjson.dumps(tts(euis[i % devices], i)))
                latencies: list[float] = []
                url = f"{daemon.api}/iot-flow/v1/ingest/tts"
                headers = {"X-Api-Key": "k", "Content-Type": "application/json"}
                async with aiohttp.ClientSession() as session:

                    async def worker() -> None:
                        while not queue.empty():
                            body = queue.get_nowait()
                            started = time.perf_counter()
                            async with session.post(url, data=body, headers=headers) as r:
                                await r.read()
                                if r.status != 200:
                                    raise RuntimeError(f"answered {r.status}")
                            latencies.append(time.perf_counter() - started)

                    started = time.perf_counter()
                    await asyncio.gather(*(worker() for _ in range(concurrency)))
                    elapsed = time.perf_counter() - started
                await cloud.wait_for(count, timeout=600)
                await daemon.stop()
            finally:
                await daemon.close()
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    return (
        f"{count} requests, concurrency {concurrency}: {count / elapsed:.0f} req/s;"
        f" latency to the 200 p50 {p50:.1f} ms, p99 {p99:.1f} ms; all {count} delivered"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="uplinks to post")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--devices", type=int, default=50, help="devices bound")
    args = parser.parse_args()
    print(asyncio.run(run(args.n, args.concurrency, args.devices)))


if __name__ == "__main__":
    main()
