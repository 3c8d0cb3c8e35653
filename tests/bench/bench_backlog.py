"""A dead cloud with a long backlog: memory, the live connection, and the drain at recovery.

    .venv/bin/python tests/bench/bench_backlog.py                  # 60 min at 1000/s, 500 devices
    .venv/bin/python tests/bench/bench_backlog.py --minutes 2      # a short run
    .venv/bin/python tests/bench/bench_backlog.py --minutes 45 --drain-deadline 2100 --in-flight 8

A real Mosquitto, `iotflow run` (bench_routing's daemon, at log level info), and two webhook
clouds, each a process of its own: the live cloud answers 200; the dead one answers 503 to
everything during the backlog phase, then 200 from the moment of recovery. Every device is
bound to both connections. A publisher sends uplinks at a steady `--rate` (QoS 1) for
`--minutes` (the backlog phase), then the dead cloud comes back while the same traffic goes
on (the drain), until the dead connection has caught up (its pending deliveries down to two
seconds of traffic), or `--drain-deadline` passes; then one more window.

Why 503 rather than a port nothing listens on: the dead cloud's port stays ours for the
whole hour (on a shared machine, a port freed for an hour can be taken by another program,
which would then answer in its place), and the probes the daemon sends while its circuit is
open are counted. For the daemon both are the same case: a retryable failure that opens
the circuit and keeps the deliveries in the spool.

Every `--window` seconds a row: uplinks published, live deliveries per second and their
latency (publish → live cloud), the live lag (published, not yet at the live cloud), the
dead connection's backlog (`iotflow_spool_pending` from the daemon's /metrics) and its
deliveries per second, the daemon's RSS and CPU, the spool's size on disk (database, WAL
and shared memory). Then a summary: RSS over the backlog phase (is memory flat?), live
latency in the first and last backlog windows and during the drain, how long the daemon
took to try the recovered cloud again, the drain's rate and duration.

Nothing is held per uplink beyond two numbers: the publisher makes each uplink as it sends
it, the clouds keep arrival times and frame counters in arrays and a bitmap of which
uplinks they have seen. Linux only (it reads /proc); everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
from aiohttp import web

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from bench.bench_routing import (  # noqa: E402
    HOST,
    BenchDaemon,
    Child,
    PublishWindow,
    _child_main,
    cpu_seconds,
    device_euis,
    filesystem_of,
    percentile,
    proc_status,
    serve_cloud,
)
from support.mosquitto import Mosquitto  # noqa: E402
from support.uplinks import uplink  # noqa: E402

LIVE, DEAD = "bench-live", "bench-dead"


# -- the clouds ---------------------------------------------------------------------------------


def cloud_process(conn: Connection, status: int) -> None:
    """A webhook cloud answering `status` until told "up" (then 200)."""
    _child_main(conn, lambda: _cloud(conn, status))


async def _cloud(conn: Connection, status: int) -> None:
    # Of the requests answered 200: arrival times and frame counters since the last "take"
    # (the orchestrator empties them every window), and a bitmap of the counters seen.
    at = array.array("d")
    fcnts = array.array("q")
    seen = bytearray()
    distinct = 0
    below = 0  # distinct counters under `threshold`
    threshold = 0
    refused = 0  # requests answered `status` while down
    malformed = 0

    async def handle(request: web.Request) -> web.StreamResponse:
        nonlocal distinct, below, refused, malformed
        arrived = time.monotonic()
        body = await request.read()
        if status != 200:
            refused += 1
            return web.Response(status=status, text="cloud down")
        try:
            inner = orjson.loads(body)["DevEUI_uplink"]
            fcnt = int(inner["FCntUp"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            malformed += 1
            return web.Response(status=400)
        at.append(arrived)
        fcnts.append(fcnt)
        if fcnt >= len(seen):
            seen.extend(bytes(max(fcnt + 1 - len(seen), len(seen))))
        if not seen[fcnt]:
            seen[fcnt] = 1
            distinct += 1
            if fcnt < threshold:
                below += 1
        return web.Response(body=b'{"ok":true}', content_type="application/json")

    def command(name: str, rest: list[Any]) -> None:
        nonlocal status, threshold, below
        if name == "count":
            conn.send(("count", (distinct, below, refused, malformed)))
        elif name == "take":
            conn.send(("take", (at.tobytes(), fcnts.tobytes())))
            del at[:]
            del fcnts[:]
        elif name == "up":
            # From now on 200; `below` counts the distinct uplinks under rest[0], those
            # published before the recovery (some may have arrived already: none while down).
            status, threshold = 200, int(rest[0])
            below = sum(seen[:threshold])
            conn.send(("up", None))

    await serve_cloud(conn, handle, command)


# -- the publisher ------------------------------------------------------------------------------


def publisher_process(conn: Connection, port: int, devices: list[str], rate: float) -> None:
    _child_main(conn, lambda: _publish(conn, port, devices, rate))


async def _publish(
    conn: Connection, port: int, devices: list[str], rate: float
) -> tuple[int, bytes]:
    """Uplink seq goes to device seq % len(devices) with FCnt seq, made as it is sent, at
    `rate` a second from "go" until "stop". "times" answers the publish times since the
    last "times" (monotonic, by sequence); the result is the first offset not taken yet
    and the times from there."""
    window = 100
    times = array.array("d")
    taken = 0
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def command() -> None:
        nonlocal taken
        try:
            name, *_ = conn.recv()
        except EOFError:
            stopping.set()
            return
        if name == "times":
            conn.send(("times", (taken, times[taken:].tobytes())))
            taken = len(times)
        elif name == "stop":
            stopping.set()

    async with aiomqtt.Client(
        HOST, port, identifier="iotflow-bench-backlog-publisher", max_inflight_messages=window
    ) as client:
        publisher = PublishWindow(client, window)
        conn.send(("ready", None))
        await asyncio.to_thread(conn.recv)  # "go"
        loop.add_reader(conn.fileno(), command)
        start = time.monotonic()
        seq = 0
        try:
            while not stopping.is_set():
                due = start + seq / rate
                now = time.monotonic()
                if due > now:
                    await asyncio.sleep(due - now)
                    continue  # a "stop" may have come meanwhile
                await publisher.room()
                topic, payload = uplink("actility", devices[seq % len(devices)], seq)
                times.append(time.monotonic())
                publisher.publish(topic, payload)
                seq += 1
            async with asyncio.timeout(120):  # the last PUBACKs
                await publisher.drained()
        finally:
            loop.remove_reader(conn.fileno())
    return taken, times[taken:].tobytes()


# -- figures ------------------------------------------------------------------------------------


@dataclass
class Row:
    at: float  # seconds since the first publish
    phase: str
    published: int
    live_per_second: float
    live_p50: float
    live_p99: float
    live_lag: int  # published and not yet at the live cloud (mostly in the broker)
    backlog: float  # the dead connection's pending deliveries (/metrics)
    dead_per_second: float
    rss_kib: int
    cpu_percent: float
    cpu_us_per_delivery: float
    spool_bytes: int
    load: float


@dataclass
class Run:
    rows: list[Row] = field(default_factory=list)
    rss_start_kib: int = 0
    rss_end_backlog_kib: int = 0
    hwm_end_backlog_kib: int = 0
    published_backlog: int = 0
    published_total: int = 0
    recovered_at: float = math.nan  # monotonic
    first_dead_delivery_after: float = math.nan  # seconds after recovery
    drained_after: float = math.nan  # seconds after recovery, or nan: not within the deadline
    drained_count: int = 0  # uplinks published before recovery that reached the dead cloud
    before_recovery_after: float = math.nan  # seconds after recovery: all of those delivered
    pending_at_first: float = math.nan  # the dead connection's pending at its first delivery
    dead_distinct_at_first: int = 0
    dead_distinct_at_end: int = 0
    drain_latencies: list[float] = field(default_factory=list)
    backlog_latencies_first: list[float] = field(default_factory=list)
    backlog_latencies_last: list[float] = field(default_factory=list)
    live_delivered: int = 0
    live_missing: int = 0
    counters: dict[str, float] = field(default_factory=dict)
    exit_code: int | None = None
    refused: int = 0


def spool_bytes(path: Path) -> int:
    """The spool's database, WAL and shared-memory files together."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            total += (path.parent / (path.name + suffix)).stat().st_size
    return total


def mib(kib: float) -> str:
    return f"{kib / 1024:,.1f} MiB"


def say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


HEADER = (
    "   t (s)  phase     published  live/s  live p50 ms  p99 ms  live lag   backlog  dead/s"
    "      RSS  CPU %  CPU µs/dlv     spool  load"
)


def row_text(r: Row) -> str:
    return (
        f"{r.at:8.0f}  {r.phase:<7} {r.published:11,} {r.live_per_second:7,.0f}"
        f"  {r.live_p50:11,.1f} {r.live_p99:7,.1f} {r.live_lag:9,}"
        f" {r.backlog:9,.0f} {r.dead_per_second:7,.0f}"
        f"  {r.rss_kib / 1024:7,.1f}M {r.cpu_percent:5.0f} {r.cpu_us_per_delivery:11,.0f}"
        f"  {r.spool_bytes / 2**20:7,.0f}M  {r.load:4.1f}"
    )


# -- the run ------------------------------------------------------------------------------------


class Windows:
    """What one window's row needs: deltas of deliveries, CPU and publish counts."""

    def __init__(
        self,
        args: argparse.Namespace,
        daemon: BenchDaemon,
        pid: int,
        live: Child,
        dead: Child,
        publisher: Child,
        run: Run,
    ) -> None:
        self.args = args
        self.daemon = daemon
        self.pid = pid
        self.live = live
        self.dead = dead
        self.publisher = publisher
        self.run = run
        self.times = array.array("d")  # publish time of every uplink, by sequence
        self.start = math.nan
        self.last = time.monotonic()
        self.cpu = cpu_seconds(pid)
        self.dead_seen = 0
        self.live_seen = bytearray()
        self.live_distinct = 0
        self.publisher_done = False  # its last times are in

    async def pull_times(self) -> None:
        if self.publisher_done:
            return
        self.add_times(*await self.publisher.ask("times"))

    def add_times(self, offset: int, raw: bytes) -> None:
        assert offset == len(self.times), "publish times out of step"
        self.times.frombytes(raw)

    async def live_latencies(self) -> tuple[int, list[float]]:
        """Distinct live deliveries since the last call and their latencies (ms)."""
        # The cloud first, then the publisher: every uplink the cloud holds was published
        # before this ask, so its publish time is in the answer that follows.
        raw_at, raw_fcnt = await self.live.ask("take", timeout=60)
        await self.pull_times()
        at, fcnts = array.array("d"), array.array("q")
        at.frombytes(raw_at)
        fcnts.frombytes(raw_fcnt)
        latencies = []
        fresh = 0
        for arrived, seq in zip(at, fcnts, strict=True):
            if seq >= len(self.live_seen):
                self.live_seen.extend(bytes(max(seq + 1 - len(self.live_seen), 1 << 16)))
            if self.live_seen[seq]:
                continue  # a repeated request: its first arrival was counted
            self.live_seen[seq] = 1
            fresh += 1
            latencies.append((arrived - self.times[seq]) * 1000)
        self.live_distinct += fresh
        return fresh, latencies

    async def pending(self) -> float:
        """The dead connection's deliveries waiting in the spool (the daemon's /metrics)."""
        samples = await self.daemon.metrics()
        return samples.get(("iotflow_spool_pending", (("connection", DEAD),)), math.nan)

    async def row(self, phase: str) -> tuple[Row, list[float]]:
        now = time.monotonic()
        fresh, latencies = await self.live_latencies()
        dead_distinct, *_ = await self.dead.ask("count")
        backlog = await self.pending()
        cpu = cpu_seconds(self.pid)
        span = max(1e-9, now - self.last)
        dead_fresh = dead_distinct - self.dead_seen
        latencies.sort()
        r = Row(
            at=now - self.start,
            phase=phase,
            published=len(self.times),
            live_per_second=fresh / span,
            live_p50=percentile(latencies, 50),
            live_p99=percentile(latencies, 99),
            live_lag=len(self.times) - self.live_distinct,
            backlog=backlog,
            dead_per_second=dead_fresh / span,
            rss_kib=proc_status(self.pid)["VmRSS"],
            cpu_percent=100 * (cpu - self.cpu) / span,
            cpu_us_per_delivery=1e6 * (cpu - self.cpu) / max(1, fresh + dead_fresh),
            spool_bytes=spool_bytes(self.daemon.spool_path),
            load=os.getloadavg()[0],
        )
        self.last, self.cpu, self.dead_seen = now, cpu, dead_distinct
        self.run.rows.append(r)
        print(row_text(r), flush=True)
        return r, latencies


async def run(args: argparse.Namespace, workdir: Path, result: Run) -> None:
    devices = device_euis(args.devices)
    children: list[Child] = []
    broker = Mosquitto(autosave_interval=1800)
    daemon: BenchDaemon | None = None
    try:
        broker.start()
        live = Child("live cloud", cloud_process, 200)
        dead = Child("dead cloud", cloud_process, 503)
        children += [live, dead]
        live_url = f"http://{HOST}:{await live.receive(60)}"
        dead_url = f"http://{HOST}:{await dead.receive(60)}"
        # Longer than the backlog phase and the drain together: nothing may expire.
        validity = math.ceil(args.minutes * 60 + args.drain_deadline + 3600)
        connections = [
            {
                "id": LIVE,
                "name": "live cloud",
                "connectorId": "actility-http-iot",
                "devices": devices,
                "configuration": {"destinationURL": f"{live_url}/live"},
            },
            {
                "id": DEAD,
                "name": "dead cloud",
                "connectorId": "actility-http-iot",
                "devices": devices,
                "configuration": {
                    "destinationURL": f"{dead_url}/dead",
                    "uplinkTimeValidity": f"{validity}s",
                },
            },
        ]
        # [delivery] (but max_in_flight) and [journal] at their defaults (memory_queue
        # 10,000; the journal kept 24 h, at most 1 GiB), as an operator would run it.
        daemon = BenchDaemon(
            workdir / "daemon",
            broker_url=broker.url,
            client_id="iotflow-bench-backlog",
            connections=connections,
            delivery={"max_in_flight": args.in_flight},
        )
        await daemon.start()
        assert daemon.process is not None
        pid = daemon.process.pid
        say(args, f"daemon pid {pid}, spool on {filesystem_of(workdir)} ({workdir})")
        await asyncio.sleep(1.0)
        result.rss_start_kib = proc_status(pid)["VmRSS"]

        publisher = Child("publisher", publisher_process, broker.port, devices, args.rate)
        children.append(publisher)
        await publisher.receive(60)
        windows = Windows(args, daemon, pid, live, dead, publisher, result)
        print(HEADER, flush=True)
        windows.start = windows.last = time.monotonic()
        windows.cpu = cpu_seconds(pid)
        publisher.tell("go")
        say(args, f"publishing {args.rate:g}/s; the dead cloud answers 503 for {args.minutes} min")

        backlog_end = windows.start + args.minutes * 60
        k = 1
        while True:
            due = min(windows.start + k * args.window, backlog_end)
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if daemon.process.returncode is not None:
                raise RuntimeError(f"the daemon exited:\n{daemon.tail()}")
            _, latencies = await windows.row("backlog")
            if k == 1:
                result.backlog_latencies_first = latencies
            result.backlog_latencies_last = latencies
            k += 1
            if due >= backlog_end:
                break
        status = proc_status(pid)
        result.rss_end_backlog_kib, result.hwm_end_backlog_kib = status["VmRSS"], status["VmHWM"]

        # Recovery: what was published until now is the backlog to drain.
        await windows.pull_times()
        threshold = len(windows.times)
        result.published_backlog = threshold
        await dead.ask("up", threshold)
        result.recovered_at = recovered = time.monotonic()
        say(args, f"the dead cloud answers 200; {threshold:,} uplinks published before")
        drain_end = recovered + args.drain_deadline
        # The dead connection has caught up once its pending deliveries are a couple of
        # seconds of traffic: the new uplinks published meanwhile were backlog too.
        caught_up = max(100.0, 2 * args.rate)
        distinct = below = 0
        while time.monotonic() < drain_end:
            await asyncio.sleep(1.0)
            if daemon.process.returncode is not None:
                raise RuntimeError(f"the daemon exited:\n{daemon.tail()}")
            distinct, below, _, _ = await dead.ask("count")
            now = time.monotonic()
            if not distinct:
                continue  # the daemon's circuit has not probed the recovered cloud yet
            if math.isnan(result.first_dead_delivery_after):
                result.first_dead_delivery_after = now - recovered
                result.pending_at_first = await windows.pending()
                result.dead_distinct_at_first = distinct
                say(
                    args,
                    f"first delivery to the recovered cloud after {now - recovered:.0f} s;"
                    f" {result.pending_at_first:,.0f} deliveries pending",
                )
            if below >= threshold and math.isnan(result.before_recovery_after):
                result.before_recovery_after = now - recovered
                say(
                    args,
                    f"the uplinks published before recovery delivered ({now - recovered:.0f} s)",
                )
            done = await windows.pending() <= caught_up
            if done or now - windows.last >= args.window:
                _, latencies = await windows.row("drain")
                result.drain_latencies += latencies
            if done:
                result.drained_after = now - recovered
                result.dead_distinct_at_end = distinct
                say(args, f"caught up {now - recovered:.0f} s after recovery")
                break
        result.drained_count = below
        if not math.isnan(result.drained_after):
            # One more window of the same traffic: does the live connection recover too?
            await asyncio.sleep(max(0.0, windows.last + args.window - time.monotonic()))
            await windows.row("after")
        publisher.tell("stop")
        windows.add_times(*await publisher.receive(120))
        windows.publisher_done = True
        result.published_total = len(windows.times)
        result.refused = (await dead.ask("count"))[2]
        # The live connection's last uplinks: a few seconds at most.
        settle = time.monotonic() + 30
        while time.monotonic() < settle:
            await windows.live_latencies()
            if windows.live_distinct >= result.published_total:
                break
            await asyncio.sleep(0.5)
        result.live_delivered = windows.live_distinct
        result.live_missing = result.published_total - windows.live_distinct
        samples = await daemon.metrics()
        for (name, labels), value in samples.items():
            if name == "iotflow_deliveries_total":
                label = dict(labels)
                key = f"{label.get('connection')}:{label.get('outcome')}"
                result.counters[key] = result.counters.get(key, 0.0) + value
        result.exit_code = await daemon.stop(timeout=60)
        for child in (live, dead):
            child.tell("stop")
            await child.receive(30)
    finally:
        if daemon is not None:
            if daemon.process is not None and daemon.process.returncode is None:
                with contextlib.suppress(AssertionError, RuntimeError):
                    await daemon.stop(timeout=30)
            await daemon.close()
        for child in children:
            child.close()
        broker.close()


def summary(args: argparse.Namespace, r: Run) -> str:
    backlog_rows = [row for row in r.rows if row.phase == "backlog"]
    drain_rows = [row for row in r.rows if row.phase == "drain"]

    def lat(values: list[float]) -> str:
        ordered = sorted(values)
        return f"p50 {percentile(ordered, 50):,.1f} ms, p99 {percentile(ordered, 99):,.1f} ms"

    warm = backlog_rows[0].rss_kib if backlog_rows else 0
    peak = max((row.rss_kib for row in backlog_rows), default=0)
    lines = [
        "summary:",
        f"  RSS                 start {mib(r.rss_start_kib)}, after the first window {mib(warm)},"
        f" peak sampled in the backlog phase {mib(peak)}, end of backlog phase"
        f" {mib(r.rss_end_backlog_kib)} (VmHWM {mib(r.hwm_end_backlog_kib)})",
    ]
    if len(backlog_rows) >= 2:
        later = backlog_rows[1:]
        lines.append(
            f"  RSS after warm-up   min {mib(min(x.rss_kib for x in later))},"
            f" max {mib(max(x.rss_kib for x in later))} over {len(later)} windows"
            f" while the backlog grew from {backlog_rows[0].backlog:,.0f}"
            f" to {backlog_rows[-1].backlog:,.0f}"
        )
    if backlog_rows:
        lines.append(
            f"  spool on disk       {backlog_rows[-1].spool_bytes / 2**20:,.0f} MiB at the end of"
            f" the backlog phase ({backlog_rows[-1].spool_bytes / max(1, r.published_backlog):,.0f}"
            " bytes per uplink)"
        )
    lines += [
        f"  live latency        first window {lat(r.backlog_latencies_first)};"
        f" last backlog window {lat(r.backlog_latencies_last)}",
        f"                      during the drain {lat(r.drain_latencies)}",
    ]
    if drain_rows:
        worst = max(drain_rows, key=lambda x: x.live_p99)
        lines.append(
            f"                      worst drain window p50 {worst.live_p50:,.1f} ms,"
            f" p99 {worst.live_p99:,.1f} ms (t = {worst.at:,.0f} s)"
        )
    if backlog_rows and drain_rows:
        before = sorted(x.cpu_us_per_delivery for x in backlog_rows[1:] or backlog_rows)
        during = sorted(x.cpu_us_per_delivery for x in drain_rows)
        lines.append(
            f"  daemon CPU          {before[len(before) // 2]:,.0f} µs per delivery in the"
            f" backlog phase (median of windows), {during[len(during) // 2]:,.0f} during the drain"
        )
    lines.append(
        f"  recovery            the first delivery to the recovered cloud"
        f" {r.first_dead_delivery_after:,.0f} s after it came back (circuit probe backoff);"
        f" {r.refused:,} requests answered 503 while down"
    )
    if not math.isnan(r.before_recovery_after):
        lines.append(
            f"                      every uplink published before recovery"
            f" ({r.published_backlog:,}) delivered {r.before_recovery_after:,.0f} s after it"
        )
    if not math.isnan(r.drained_after):
        busy = max(1e-9, r.drained_after - r.first_dead_delivery_after)
        gross = (r.dead_distinct_at_end - r.dead_distinct_at_first) / busy
        lines.append(
            f"  drain               caught up {r.drained_after:,.0f} s after recovery,"
            f" {busy:,.0f} s after the first delivery, with {r.pending_at_first:,.0f} pending then:"
            f" {gross:,.0f} deliveries/s to the recovered cloud, the backlog shrinking by"
            f" {r.pending_at_first / busy:,.0f}/s net, beside {args.rate:g} new uplinks/s"
        )
    else:
        lines.append(
            f"  drain               NOT caught up within {args.drain_deadline:g} s:"
            f" {r.drained_count:,} of the {r.published_backlog:,} uplinks published before"
            " recovery delivered"
        )
    counters = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(r.counters.items()))
    lines += [
        f"  live connection     {r.live_delivered:,} of {r.published_total:,} published"
        f" delivered ({r.live_missing:,} missing at the end)",
        f"  daemon counters     {counters}; exit code {r.exit_code}",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="A dead cloud with a long backlog: the daemon's memory, the live"
        " connection's throughput and latency, and the drain when the cloud comes back."
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="uplinks/s (default 1000)")
    parser.add_argument(
        "--minutes", type=float, default=60.0, help="backlog phase: minutes the cloud is down"
    )
    parser.add_argument("--devices", type=int, default=500, help="devices (default 500)")
    parser.add_argument(
        "--window", type=float, default=60.0, help="seconds per row of figures (default 60)"
    )
    parser.add_argument(
        "--drain-deadline",
        type=float,
        default=3600.0,
        help="seconds the drain may take after recovery (default 3600)",
    )
    parser.add_argument(
        "--in-flight", type=int, default=32, help="delivery.max_in_flight (default 32)"
    )
    parser.add_argument("--dir", help="where the daemon's spool goes (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.minutes <= 0 or args.window <= 0 or args.drain_deadline <= 0:
        parser.error("--rate, --minutes, --window and --drain-deadline must be positive")
    if args.devices < 1 or args.in_flight < 1:
        parser.error("--devices and --in-flight must be at least 1")
    return args


async def bounded(args: argparse.Namespace, workdir: Path, result: Run) -> None:
    # SIGTERM stops the run as Ctrl-C does: everything started is stopped on the way out.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    await run(args, workdir, result)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("bench_backlog: Linux only (it reads /proc)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="iotflow-bench-backlog-", dir=args.dir))
    free = shutil.disk_usage(workdir).free
    expected = args.rate * args.minutes * 60
    print(
        f"backlog: {args.rate:g} uplinks/s for {args.minutes:g} min ({expected:,.0f} uplinks),"
        f" {args.devices} devices each bound to a live and a dead connection,"
        f" max_in_flight {args.in_flight};"
        f" drain deadline {args.drain_deadline:g} s\n"
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f};"
        f" Python {platform.python_version()}; spool on {filesystem_of(workdir)}"
        f" with {free / 2**30:,.1f} GiB free",
        flush=True,
    )
    result = Run()
    try:
        asyncio.run(bounded(args, workdir, result))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench_backlog: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"bench_backlog: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(summary(args, result))
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    drained = not math.isnan(result.drained_after)
    return 0 if drained and result.live_missing == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
