"""Start-up time and memory of `iotflow run` with many connections and bindings.

    .venv/bin/python tests/bench/bench_scale.py                       # 1000 connections x 100
    .venv/bin/python tests/bench/bench_scale.py --connections 100 --devices 1000

Writes a config with `--connections` provisioned `actility-http-iot` connections, each bound
to `--devices` devices of its own (connections x devices bindings), starts the daemon
against a real Mosquitto, and prints the time from the process start to "Consuming uplinks"
(everything loaded, the source subscribed), the daemon's CPU time (all threads) then, which
the rest of a shared machine changes least, and its memory: VmRSS then, 2 s later, and
VmHWM (peak). The connections point at a port nothing listens on: nothing is sent.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from bench.bench_routing import BenchDaemon, cpu_seconds, median, mib, proc_status  # noqa: E402
from support.mosquitto import Mosquitto  # noqa: E402
from support.ports import free_port  # noqa: E402


async def one(connections: int, devices: int, workdir: Path) -> tuple[float, float, int, int, int]:
    url = f"http://127.0.0.1:{free_port()}/"
    provisioned = [
        {
            "id": f"scale-{c}",
            "name": f"scale {c}",
            "connectorId": "actility-http-iot",
            "devices": [f"{(c << 24) + d:016X}" for d in range(devices)],
            "configuration": {"destinationURL": url},
        }
        for c in range(connections)
    ]
    broker = Mosquitto(autosave_interval=1800)
    broker.start()
    daemon = BenchDaemon(workdir, broker_url=broker.url, connections=provisioned)
    try:
        started = time.monotonic()
        await daemon.start()
        seconds = time.monotonic() - started
        assert daemon.process is not None
        cpu = cpu_seconds(daemon.process.pid)
        ready = proc_status(daemon.process.pid)["VmRSS"]
        await asyncio.sleep(2)
        status = proc_status(daemon.process.pid)
        await daemon.stop(timeout=120)
        return seconds, cpu, ready, status["VmRSS"], status["VmHWM"]
    finally:
        await daemon.close()
        broker.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=100, help="devices per connection")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    results = []
    for k in range(args.runs):
        workdir = Path(tempfile.mkdtemp(prefix="iotflow-scale-"))
        load = os.getloadavg()[0]
        try:
            seconds, cpu, ready, after, peak = asyncio.run(
                one(args.connections, args.devices, workdir)
            )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        results.append((seconds, cpu, ready, after, peak))
        print(
            f"run {k + 1}: start {seconds:.2f} s (CPU {cpu:.2f} s), RSS {mib(ready)} ready,"
            f" {mib(after)} 2 s later, peak {mib(peak)} (load average {load:.1f})",
            flush=True,
        )
    print(
        f"{args.connections} connections x {args.devices} devices"
        f" ({args.connections * args.devices:,} bindings), medians of {args.runs}:"
        f" start {median([r[0] for r in results]):.2f} s"
        f" (CPU {median([r[1] for r in results]):.2f} s),"
        f" peak RSS {mib(int(median([r[4] for r in results])))}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
