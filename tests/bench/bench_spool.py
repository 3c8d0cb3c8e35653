"""Spool throughput and append latency under concurrent appends of ~600-byte documents.

    PYTHONPATH=daemon .venv/bin/python tests/bench/bench_spool.py -n 20000 --fanout 2

`--concurrency` is the number of appends in flight at once, as an MQTT client with that
many unacknowledged QoS 1 messages would have. The spool file goes in a temporary
directory under `--dir` (default: the current directory, so it is on a real disk and
fsync costs what it costs; /tmp may be tmpfs). It also prints the WAL's peak size, its size
at the end and once the writer has been idle for 1.5 s (`--complete`: a steady stream with a
small backlog, where the WAL must stay small too).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import orjson

import iotflow.spool.store as spool_store
from iotflow.spool import Spool


def make_document(n: int) -> bytes:
    """An Actility-shaped uplink of about 600 bytes."""
    document = {
        "DevEUI_uplink": {
            "Time": "2024-05-01T12:00:00.000+00:00",
            "DevEUI": f"{n % 5000:016X}",
            "FPort": 2,
            "FCntUp": n,
            "payload_hex": "0102030405060708090a0b0c0d0e0f10",
            "LrrRSSI": -97.0,
            "LrrSNR": 7.25,
            "Lrrid": "FF0109A4",
            "SpFact": 7,
            "Frequency": 868.1,
            "DevAddr": "0407A1B2",
            "Lrrs": {
                "Lrr": [
                    {"Lrrid": "FF0109A4", "LrrRSSI": -97.0, "LrrSNR": 7.25, "LrrESP": -97.8},
                    {"Lrrid": "FF0109A5", "LrrRSSI": -110.0, "LrrSNR": -2.5, "LrrESP": -114.6},
                ]
            },
            "CustomerData": {"name": f"sensor-{n % 5000}", "alr": {"pro": "LORA/Generic"}},
            "payload": {"temperature": 21.5, "humidity": 48, "battery": 3.61, "counter": n},
            "Late": 0,
            "ADRbit": 1,
        }
    }
    return orjson.dumps(document)


async def run(args: argparse.Namespace, path: Path) -> None:
    spool_store.SYNCHRONOUS = args.synchronous
    spool = await Spool.open(path, max_batch=args.max_batch, wal_limit=args.wal_limit)
    connections = [f"conn-{i}" for i in range(args.fanout)]
    documents = [make_document(n) for n in range(args.n)]
    latencies: list[float] = []
    next_n = 0

    async def client() -> None:
        nonlocal next_n
        while next_n < args.n:
            n = next_n
            next_n += 1
            started = time.perf_counter()
            deliveries = await spool.append(
                documents[n],
                dev_eui=f"{n % 5000:016X}",
                uplink_time=time.time(),
                received_at=time.time(),
                connection_ids=connections,
            )
            latencies.append(time.perf_counter() - started)
            if args.complete:
                for d in deliveries:
                    spool.complete(d.id)

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(args.concurrency):
            group.create_task(client())
    await spool.flush()
    elapsed = time.perf_counter() - started
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    wal_end = spool.wal_bytes()
    await asyncio.sleep(1.5)  # a benchmark may sleep: the writer empties an idle WAL
    wal_idle = spool.wal_bytes()
    await spool.close()

    latencies.sort()
    stats = spool.stats
    print(
        f"synchronous={args.synchronous} n={args.n} fanout={args.fanout} "
        f"concurrency={args.concurrency} max_batch={args.max_batch} complete={args.complete}"
    )
    print(f"document        {len(documents[0])} bytes")
    print(
        f"uplinks/s       {args.n / elapsed:,.0f}  ({args.n * args.fanout / elapsed:,.0f} rows/s)"
    )
    print(
        f"transactions    {stats.transactions}  "
        f"(mean {stats.uplinks / max(stats.transactions, 1):.1f} uplinks, "
        f"largest {stats.largest_batch})"
    )
    print(f"append median   {statistics.median(latencies) * 1000:.2f} ms")
    print(f"append p99      {latencies[int(len(latencies) * 0.99) - 1] * 1000:.2f} ms")
    print(f"file size       {size / 1e6:.1f} MB (database + WAL, before close)")
    print(
        f"WAL             {stats.wal_peak / 1e3:,.0f} kB peak, {wal_end / 1e3:,.0f} kB at the end,"
        f" {wal_idle / 1e3:,.0f} kB 1.5 s later (limit {args.wal_limit / 1e3:,.0f} kB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20_000, help="uplinks to append")
    parser.add_argument("--fanout", type=int, default=1, help="connections per uplink")
    parser.add_argument("--concurrency", type=int, default=256, help="appends in flight")
    parser.add_argument("--max-batch", type=int, default=512)
    parser.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="FULL")
    parser.add_argument(
        "--complete", action="store_true", help="complete each delivery once appended"
    )
    parser.add_argument(
        "--wal-limit", type=int, default=1 << 20, help="WAL bytes past which the spool checkpoints"
    )
    parser.add_argument("--dir", type=Path, default=Path.cwd())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-spool-", dir=args.dir) as tmp:
        asyncio.run(run(args, Path(tmp) / "spool.db"))


if __name__ == "__main__":
    main()
