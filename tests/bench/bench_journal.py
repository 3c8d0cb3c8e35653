"""The journal's cost, and live latency during a replay (issue #14, docs/deadletters.md).

    .venv/bin/python tests/bench/bench_journal.py                  # both parts
    .venv/bin/python tests/bench/bench_journal.py --replay 100000  # uplinks replayed
    .venv/bin/python tests/bench/bench_journal.py --skip-cost --replay 0 --resend 20000

Part 1, journal off vs on: `-n` uplinks appended to the spool (`--concurrency` in flight,
each delivery completed once committed, as a steady stream does), without then with a
journal row each. Prints uplinks/s, the bytes the journal adds on disk per uplink (pages
in use after a checkpoint, on minus off), and per uplink the CPU time of the process and
the bytes it wrote (WAL and database, /proc/self/io): the figures a shared machine moves
least.

Part 2, a replay and live traffic to the same connection, in process (spool, worker,
recovery; a sink that answers after `--cloud-delay` ms, as a remote cloud does, with
`--in-flight` sends at most): live uplinks at `--rate` per second for `--seconds` alone,
then while `--replay` journaled uplinks are replayed to the same connection. Prints the
latency of live uplinks (receive to sink ack) both times, and the replay's throughput.
With `--resend N` (after the replay; `--replay 0` for none), N dead letters are re-sent in
one request beside the same live uplinks: their latency, and the re-send's throughput.
Files go in a temporary directory under `--dir` (default: the current one, a real disk).
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import orjson

from iotflow.config.model import DeadLetterSettings, DeliverySettings, JournalSettings
from iotflow.connectors import Connection, parse_connection
from iotflow.delivery.manager import Deliveries
from iotflow.delivery.recovery import LetterFilter, Recovery, route_of
from iotflow.routing import RoutingIndex
from iotflow.spool import Delivery, Spool
from iotflow.telemetry import logging as logs
from iotflow.telemetry.metrics import Metrics


def make_document(n: int) -> bytes:
    """An Actility-shaped uplink of about 560 bytes (as bench_spool.py's)."""
    inner = {
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
    return orjson.dumps({"DevEUI_uplink": inner})


ROUTE = route_of(frozenset({"site=a"}), "app", None)


def share(max_in_flight: int) -> int:
    """A replay's window (as the daemon's app.py: worker.background_share, written here
    too so that the script also measures the versions before it)."""
    return max(1, max_in_flight // 2)


def written() -> int:
    """Bytes this process has passed to write(2) so far (WAL and database), from /proc."""
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("wchar:"))


async def append_stream(
    path: Path, n: int, concurrency: int, journal: bool
) -> tuple[float, int, float, float]:
    """(uplinks/s, pages in use x page size after a checkpoint, CPU µs per uplink of the
    whole process (all threads), bytes written per uplink)."""
    spool = await Spool.open(path)
    documents = [make_document(i) for i in range(n)]
    next_n = 0

    async def client() -> None:
        nonlocal next_n
        while next_n < n:
            i = next_n
            next_n += 1
            now = time.time()
            deliveries = await spool.append(
                documents[i],
                dev_eui=f"{i % 5000:016X}",
                uplink_time=now,
                received_at=now,
                connection_ids=["c"],
                journal=ROUTE if journal else None,
            )
            for d in deliveries:
                spool.complete(d.id)

    started = time.perf_counter()
    cpu_start = time.process_time()
    written_start = written()
    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(client())
    await spool.flush()
    elapsed = time.perf_counter() - started
    cpu = (time.process_time() - cpu_start) / n * 1e6
    wrote = (written() - written_start) / n
    await spool.close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    free = db.execute("PRAGMA freelist_count").fetchone()[0]
    size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    return n / elapsed, (pages - free) * size, cpu, wrote


class Sink:
    """A cloud `delay` seconds away; records the latency of live deliveries."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.live: list[float] = []
        self.replayed = 0
        self.recording = False

    async def start(self) -> None:
        return None

    async def send(self, delivery: Delivery) -> None:
        await asyncio.sleep(self.delay)
        if delivery.replay is not None or delivery.letter is not None:
            self.replayed += 1
        elif self.recording:
            self.live.append(time.time() - delivery.received_at)

    async def healthcheck(self) -> bool:
        return True

    async def close(self) -> None:
        return None


def percentiles(values: list[float]) -> str:
    if not values:
        return "no samples"
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000

    return (
        f"n={len(ordered)} p50 {at(0.5):.1f} ms, p99 {at(0.99):.1f} ms,"
        f" max {ordered[-1] * 1000:.1f} ms"
    )


async def replay_latency(args: argparse.Namespace, path: Path) -> None:
    spool = await Spool.open(path)
    metrics = Metrics()
    sink = Sink(args.cloud_delay / 1000)
    settings = DeliverySettings(max_in_flight=args.in_flight)
    connection: Connection = parse_connection(
        {
            "id": "c",
            "name": "c",
            "connectorId": "actility-http-iot",
            "configuration": {"destinationURL": "http://127.0.0.1:9/"},
        }
    )

    def record(connection_id: str, kind: str, data: dict[str, Any]) -> None:
        return None

    deliveries = Deliveries(
        spool=spool,
        metrics=metrics,
        settings=settings,
        record=record,
        sink_factory=lambda c, s: sink,
    )
    devices = [f"{i:016X}" for i in range(args.devices)]
    index = RoutingIndex([connection], {d: ["c"] for d in devices})
    recovery = Recovery(
        spool=spool,
        dispatch=deliveries.dispatch,
        index=lambda: index,
        metrics=metrics,
        record=record,
        journal=JournalSettings(),
        letters=DeadLetterSettings(),
        window=lambda cid: share(deliveries.max_in_flight(cid)),
    )
    deliveries.replayed = recovery.replayed
    await deliveries.complete(deliveries.register([connection], settings, {}))
    await recovery.start(prune_every=3600)

    # The journal: `--replay` uplinks of the last hour, bound to no connection yet.
    origin = time.time() - 3600
    document = make_document(0)
    next_n = 0

    async def journal() -> None:
        nonlocal next_n
        while next_n < args.replay:
            i = next_n
            next_n += 1
            await spool.append(
                document,
                dev_eui=devices[i % len(devices)],
                uplink_time=origin + i * 3000 / args.replay,
                received_at=origin,
                connection_ids=(),
                journal=ROUTE,
            )

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(256):
            group.create_task(journal())
    print(f"journal filled  {args.replay:,} uplinks in {time.perf_counter() - started:.1f} s")

    live_n = 0

    async def live(seconds: float) -> None:
        nonlocal live_n
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            now = time.time()
            committed = await spool.append(
                document,
                dev_eui=devices[live_n % len(devices)],
                uplink_time=now,
                received_at=now,
                connection_ids=["c"],
            )
            live_n += 1
            deliveries.dispatch(committed)
            await asyncio.sleep(1 / args.rate)

    sink.recording = True
    await live(args.seconds)
    await asyncio.sleep(args.cloud_delay / 1000 * 4)
    alone = list(sink.live)
    sink.live.clear()
    print(f"live alone      {percentiles(alone)}")

    if args.replay:
        await replay_during_live(args, recovery, origin, live, sink)
    if args.resend:
        await resend_during_live(args, spool, recovery, devices, document, live, sink)
    await recovery.close()
    await deliveries.stop(1)
    await spool.close()


async def replay_during_live(
    args: argparse.Namespace,
    recovery: Recovery,
    origin: float,
    live: Callable[[float], Coroutine[Any, Any, None]],
    sink: Sink,
) -> None:
    started = time.perf_counter()
    replay = await recovery.start_replay("c", origin - 1, time.time(), None)
    print(f"replay counted  {replay.total:,} uplinks in {time.perf_counter() - started:.2f} s")
    started = time.perf_counter()
    feeding = asyncio.create_task(live(10**9))
    while True:
        row = await recovery.replay(replay.id)
        assert row is not None
        if row.state != "running":
            break
        await asyncio.sleep(0.5)
    elapsed = time.perf_counter() - started
    feeding.cancel()
    during = list(sink.live)
    print(f"live in replay  {percentiles(during)}")
    print(
        f"replay          {row.delivered:,} delivered in {elapsed:.1f} s"
        f" ({row.delivered / elapsed:,.0f}/s; cloud {args.cloud_delay} ms,"
        f" max_in_flight {args.in_flight}, replay window {share(args.in_flight)})"
    )
    sink.live.clear()


async def resend_during_live(
    args: argparse.Namespace,
    spool: Spool,
    recovery: Recovery,
    devices: list[str],
    document: bytes,
    live: Callable[[float], Coroutine[Any, Any, None]],
    sink: Sink,
) -> None:
    """`--resend` dead letters re-sent all at once (one request), beside live uplinks."""
    now = time.time()
    rows = [
        (
            "c",
            devices[i % len(devices)],
            now - 3600,
            now - 3600,
            document,
            None,
            None,
            "failed",
            "HTTP 400",
            400,
            "",
            1,
            now - 3600,
            now - 3600,
            now - 3600 + i / 1000,
        )
        for i in range(args.resend)
    ]

    async def insert(db: Any) -> None:
        await db.executemany(
            "INSERT INTO dead_letters (connection_id, dev_eui, uplink_time, received_at,"
            " document, original, validity, outcome, reason, status, body, attempts,"
            " first_attempt, last_attempt, time)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    await spool.write(insert)
    feeding = asyncio.create_task(live(10**9))
    started = time.perf_counter()
    count = await recovery.resend("c", filters=LetterFilter())
    while True:  # a letter leaves once delivered
        if not (await spool.read("SELECT count(*) FROM dead_letters"))[0][0]:
            break
        await asyncio.sleep(0.5)
    elapsed = time.perf_counter() - started
    feeding.cancel()
    print(f"live in resend  {percentiles(list(sink.live))}")
    print(f"resend          {count:,} delivered in {elapsed:.1f} s ({count / elapsed:,.0f}/s)")
    sink.live.clear()


async def run(args: argparse.Namespace, tmp: Path) -> None:
    if not args.skip_cost:
        off = await append_stream(tmp / "off.db", args.n, args.concurrency, False)
        on = await append_stream(tmp / "on.db", args.n, args.concurrency, True)
        off_rate, off_bytes, off_cpu, off_written = off
        on_rate, on_bytes, on_cpu, on_written = on
        print(f"n={args.n} concurrency={args.concurrency} document={len(make_document(0))} bytes")
        print(f"journal off     {off_rate:,.0f} uplinks/s")
        print(f"journal on      {on_rate:,.0f} uplinks/s ({on_rate / off_rate - 1:+.0%})")
        print(f"journal disk    {(on_bytes - off_bytes) / args.n:,.0f} bytes per uplink")
        # CPU and bytes written vary less than uplinks/s on a shared machine.
        print(f"CPU per uplink  {off_cpu:,.1f} µs off, {on_cpu:,.1f} µs on (all threads)")
        print(f"written/uplink  {off_written:,.0f} bytes off, {on_written:,.0f} bytes on")
    if args.replay or args.resend:
        await replay_latency(args, tmp / "replay.db")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20_000, help="uplinks appended per mode")
    parser.add_argument("--concurrency", type=int, default=256, help="appends in flight")
    parser.add_argument("--replay", type=int, default=100_000, help="uplinks replayed (0: none)")
    parser.add_argument(
        "--resend", type=int, default=0, help="dead letters re-sent at once, after the replay"
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=50, help="live uplinks per second")
    parser.add_argument("--seconds", type=float, default=10, help="live alone, before the replay")
    parser.add_argument("--cloud-delay", type=float, default=5, help="ms the sink takes")
    parser.add_argument("--in-flight", type=int, default=32, help="max_in_flight")
    parser.add_argument("--skip-cost", action="store_true", help="only the replay part")
    parser.add_argument("--dir", type=Path, default=Path.cwd())
    args = parser.parse_args()
    logs.configure("warning", "console")
    with tempfile.TemporaryDirectory(prefix="bench-journal-", dir=args.dir) as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()
