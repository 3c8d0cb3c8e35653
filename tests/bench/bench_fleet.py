"""A fleet's throughput: 1, 2 and 3 `iotflow run` instances side by side, on one PostgreSQL
registry and one Mosquitto shared subscription (docs/scale-out.md "Figures").

    .venv/bin/python tests/bench/bench_fleet.py                 # 1, 2, 3 instances, 6000 uplinks
    .venv/bin/python tests/bench/bench_fleet.py -n 3000 --instances 1 3

For each fleet size: a fresh database on a PostgreSQL started here, a fresh Mosquitto, the
webhook cloud and the publisher of bench_routing.py (processes of their own); the instances
share `[mqtt] shared_group`, each with its own spool. The publisher sends `-n` uplinks at
QoS 1 (at most `--window` unacknowledged); the clock stops when the cloud holds every one.
Prints uplinks per second end to end and the CPU each part used, which says what limits
the figure: on a machine of N cores, instances help while their sum of CPU stays below N.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import asyncpg

_HERE = Path(__file__).resolve().parent
# `support` is the test suite's package of real parts; bench_routing has the children.
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))

from bench.bench_routing import (  # noqa: E402
    BenchDaemon,
    Child,
    cloud_process,
    cpu_seconds,
    device_euis,
    publisher_process,
)
from support.mosquitto import Mosquitto  # noqa: E402
from support.postgres import Postgres  # noqa: E402


async def one_fleet(
    size: int, args: argparse.Namespace, postgres: Postgres, workdir: Path
) -> dict[str, float]:
    name = f"bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(postgres.dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    broker = Mosquitto(autosave_interval=1800)
    children: list[Child] = []
    daemons: list[BenchDaemon] = []
    devices = device_euis(args.devices)
    try:
        broker.start()
        cloud = Child("cloud", cloud_process, 0.0)
        children.append(cloud)
        port: int = await cloud.receive(60)
        connection = {
            "id": "c0",
            "name": "bench",
            "connectorId": "actility-http-iot",
            "devices": devices,
            "configuration": {
                "destinationURL": f"http://127.0.0.1:{port}/c0",
                "uplinkTimeValidity": "1h",
            },
        }
        for n in range(size):
            daemons.append(
                BenchDaemon(
                    workdir / f"fleet-{size}" / f"instance-{n}",
                    broker_url=broker.url,
                    client_id=f"iotflow-bench-{size}-{n}",
                    connections=[connection],
                    registry_url=postgres.dsn_for(name),
                    mqtt={"shared_group": "bench"},
                    delivery={"max_in_flight": args.in_flight},
                )
            )
        for daemon in daemons:  # one after the other: the first migrates
            await daemon.start()
        publisher = Child(
            "publisher",
            publisher_process,
            broker.port,
            "actility",
            devices,
            args.n,
            args.window,
            None,
        )
        children.append(publisher)
        await publisher.receive(120)
        pids = [d.process.pid for d in daemons if d.process is not None]
        before = {
            "daemons": sum(cpu_seconds(p) for p in pids),
            "broker": cpu_seconds(broker.pid),
            "cloud": cpu_seconds(cloud.pid),
            "postgres": postgres_cpu(postgres),
        }
        start = time.monotonic()
        publisher.tell("go")
        deadline = start + args.deadline
        published = None
        while True:
            _total, distinct, _ = await cloud.ask("count")
            if published is None and publisher.has_message():
                published = await publisher.receive(60)
            if published is not None and distinct >= args.n:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{distinct} of {args.n} delivered before the deadline")
            await asyncio.sleep(0.02)
        elapsed = time.monotonic() - start
        total, distinct, _ = await cloud.ask("count")
        after = {
            "daemons": sum(cpu_seconds(p) for p in pids),
            "broker": cpu_seconds(broker.pid),
            "cloud": cpu_seconds(cloud.pid),
            "postgres": postgres_cpu(postgres),
        }
        figures = {
            "instances": float(size),
            "seconds": elapsed,
            "per_second": args.n / elapsed,
            "duplicates": float(total - distinct),
            "publisher_cpu": published.cpu,
        }
        for part in before:
            figures[f"{part}_cpu"] = after[part] - before[part]
        cloud.tell("stop")
        await cloud.receive(30)
        return figures
    finally:
        for daemon in daemons:
            if daemon.process is not None and daemon.process.returncode is None:
                with contextlib.suppress(AssertionError):
                    await daemon.stop(timeout=30)
            await daemon.close()
        for child in children:
            child.close()
        broker.close()
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


def postgres_cpu(postgres: Postgres) -> float:
    """CPU seconds of every process of the cluster (the postmaster's children)."""
    pid_file = postgres.data_dir / "postmaster.pid"
    try:
        master = int(str(pid_file.read_text()).split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    total = cpu_seconds(master)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            if int(stat.rpartition(")")[2].split()[1]) == master:
                total += cpu_seconds(int(entry.name))
    return total


def report(results: list[dict[str, float]], cores: int) -> str:
    lines = [
        f"fleet throughput on {cores} cores (load average {os.getloadavg()[0]:.1f} at the end):",
        f"{'instances':>9} {'uplinks/s':>10} {'seconds':>8} {'dup':>4}"
        f" {'CPU s: daemons':>15} {'broker':>7} {'postgres':>9} {'cloud':>6} {'publisher':>10}",
    ]
    for r in results:
        lines.append(
            f"{int(r['instances']):>9} {r['per_second']:>10.0f} {r['seconds']:>8.1f}"
            f" {int(r['duplicates']):>4} {r['daemons_cpu']:>15.1f} {r['broker_cpu']:>7.1f}"
            f" {r['postgres_cpu']:>9.1f} {r['cloud_cpu']:>6.1f} {r['publisher_cpu']:>10.1f}"
        )
    busiest = max(results, key=lambda r: r["per_second"])
    used = sum(v for k, v in busiest.items() if k.endswith("_cpu")) / busiest["seconds"]
    lines.append(
        f"best: {busiest['per_second']:.0f}/s with {int(busiest['instances'])} instance(s);"
        f" all parts together kept {used:.1f} of {cores} cores busy"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=6000, help="uplinks per fleet size")
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--window", type=int, default=100, help="unacknowledged publishes")
    parser.add_argument("--in-flight", type=int, default=32, help="[delivery] max_in_flight")
    parser.add_argument("--deadline", type=float, default=600, help="seconds per fleet size")
    return parser.parse_args(argv)


async def main_async(args: argparse.Namespace) -> int:
    results = []
    with Postgres() as postgres, tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        for size in args.instances:
            print(f"{size} instance(s): {args.n} uplinks ...", file=sys.stderr, flush=True)
            results.append(await one_fleet(size, args, postgres, Path(tmp)))
    print(report(results, os.cpu_count() or 1))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    if not sys.platform.startswith("linux"):
        print("bench_fleet: Linux only (it reads /proc)", file=sys.stderr)
        return 2
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
