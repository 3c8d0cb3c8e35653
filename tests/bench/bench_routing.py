"""End to end routing: throughput, latency and memory of `iotflow run`, and the HTTP ceiling.

    .venv/bin/python tests/bench/bench_routing.py                  # 5000 uplinks, 1 connection
    .venv/bin/python tests/bench/bench_routing.py --fanout 3       # each device on 3 connections
    .venv/bin/python tests/bench/bench_routing.py --compare-fanout 5 --runs 3
                                    # fan-out 1 and 5 alternated: the cost of fan-out
    .venv/bin/python tests/bench/bench_routing.py --rate 500       # latency at a paced load
    .venv/bin/python tests/bench/bench_routing.py --json           # machine-readable figures
    .venv/bin/python tests/bench/bench_routing.py --flows 1000,10000,100000
                                    # per-uplink routing cost by flows (in process, no broker)
    .venv/bin/python tests/bench/bench_routing.py --bindings 1000,10000,100000
                                    # the same by device bindings
    .venv/bin/python tests/bench/bench_routing.py --processors     # with and without upOperations
    .venv/bin/python tests/bench/bench_routing.py --processors --driver
                                    # the second run also decodes every uplink with a driver

One run starts a real Mosquitto (support.mosquitto), a minimal webhook cloud in a process of
its own, and the daemon as a process (support.daemon) with `--fanout` provisioned
`actility-http-iot` connections to that cloud, each bound to `--devices` devices. A
publisher, also a process of its own, sends `-n` uplinks at QoS 1 as fast as the broker
acknowledges them (at most `--window` unacknowledged), or at `--rate` per second. Each
uplink carries its sequence number as its frame counter, so the cloud's record of
(path, DevEUI, FCntUp) gives every delivery's latency and any duplicate. With the daemon
stopped, a bare aiohttp client then posts the same number of bodies to the same cloud with
the same concurrency: the ceiling of this machine, cloud and HTTP stack.

Times are CLOCK_MONOTONIC (`time.monotonic()`), which is one clock for every process on
Linux. Memory and CPU come from /proc, so the script runs on Linux only. Everything listens
on and connects to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import orjson
from aiohttp import web

# `support` is the test suite's package of real parts (broker, daemon process, uplinks).
_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from bench.node_red import VERSION as NODE_RED_VERSION  # noqa: E402
from bench.node_red import NodeRed  # noqa: E402
from bench.node_red import install as install_node_red  # noqa: E402
from support.daemon import DaemonProcess  # noqa: E402
from support.mosquitto import Mosquitto  # noqa: E402
from support.ports import free_port  # noqa: E402
from support.uplinks import actility, uplink  # noqa: E402

HOST = "127.0.0.1"
FORMATS = ("actility", "chirpstack", "tts")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- child processes --------------------------------------------------------------------------
#
# The cloud, the publisher and the ceiling client each run in a process of their own (spawn,
# so no state leaks in from this one), so that none of them shares an event loop, or the GIL,
# with another. Each talks to the orchestrator over one multiprocessing pipe.


class Child:
    """A function run in a spawned process, with a pipe to it."""

    def __init__(self, name: str, target: Callable[..., None], *args: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self.name = name
        self._conn, theirs = context.Pipe()
        self.process: BaseProcess = context.Process(
            target=target, args=(theirs, *args), name=name, daemon=True
        )
        self.process.start()
        theirs.close()

    def has_message(self) -> bool:
        """Whether a message (or the end of the pipe) waits to be received."""
        return self._conn.poll()

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    async def receive(self, timeout: float) -> Any:
        """The next message from the child; its error, if it sent one, is raised here."""
        if not self._conn.poll():
            loop = asyncio.get_running_loop()
            readable: asyncio.Future[None] = loop.create_future()
            fd = self._conn.fileno()

            def wake() -> None:
                if not readable.done():
                    readable.set_result(None)

            loop.add_reader(fd, wake)
            try:
                await asyncio.wait_for(readable, timeout)
            except TimeoutError:
                raise TimeoutError(f"{self.name}: no answer within {timeout:g}s") from None
            finally:
                loop.remove_reader(fd)
        try:
            kind, value = self._conn.recv()
        except (EOFError, OSError):  # OSError: the child died in the middle of a message
            self.process.join(5)
            raise RuntimeError(
                f"{self.name} exited (code {self.process.exitcode}) without an answer"
            ) from None
        if kind == "error":
            raise RuntimeError(f"{self.name} failed: {value}")
        return value

    def tell(self, *message: Any) -> None:
        self._conn.send(message)

    async def ask(self, *message: Any, timeout: float = 30) -> Any:
        self.tell(*message)
        return await self.receive(timeout)

    def close(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._conn.close()


def _child_main(conn: Connection, run: Callable[[], Any]) -> None:
    try:
        result = asyncio.run(run())
    except BaseException as exc:
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    conn.send(("result", result))


# -- the cloud ----------------------------------------------------------------------------------


async def serve_cloud(
    conn: Connection,
    handle: Callable[[web.Request], Awaitable[web.StreamResponse]],
    on_command: Callable[[str, list[Any]], None],
) -> None:
    """`handle` every POST, on any path; tell the orchestrator the port, then answer its
    commands with `on_command(name, arguments)` until "stop" or until it is gone."""
    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0, backlog=1024)
    await site.start()
    conn.send(("port", int(runner.addresses[0][1])))

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def command() -> None:
        try:
            name, *rest = conn.recv()
        except EOFError:  # the orchestrator is gone
            stop.set()
            return
        if name == "stop":
            stop.set()
        else:
            on_command(name, rest)

    loop.add_reader(conn.fileno(), command)
    try:
        await stop.wait()
    finally:
        loop.remove_reader(conn.fileno())
        await runner.cleanup()


def cloud_process(conn: Connection, delay: float) -> None:
    """A webhook cloud as cheap as aiohttp allows: record, answer 200."""
    _child_main(conn, lambda: _cloud(conn, delay))


async def _cloud(conn: Connection, delay: float) -> None:
    # Parallel lists: arrival time, path, DevEUI, FCntUp of every request, in arrival order.
    at: list[float] = []
    paths: list[str] = []
    devs: list[str] = []
    fcnts: list[int] = []
    seen: set[tuple[str, str, int]] = set()
    malformed = 0

    async def handle(request: web.Request) -> web.StreamResponse:
        nonlocal malformed
        arrived = time.monotonic()
        body = await request.read()
        try:
            document = orjson.loads(body)
            inner = document.get("DevEUI_uplink", document)
            dev, fcnt = str(inner["DevEUI"]), int(inner["FCntUp"])
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            malformed += 1
            return web.Response(status=400)
        if delay:
            await asyncio.sleep(delay)
        at.append(arrived)
        paths.append(request.path)
        devs.append(dev)
        fcnts.append(fcnt)
        seen.add((request.path, dev, fcnt))
        return web.Response(body=b'{"ok":true}', content_type="application/json")

    def command(name: str, _: list[Any]) -> None:
        nonlocal malformed
        if name == "count":
            conn.send(("count", (len(at), len(seen), malformed)))
        elif name == "records":
            conn.send(("records", (at, paths, devs, fcnts, malformed)))
        elif name == "reset":
            for records in (at, paths, devs, fcnts):
                records.clear()
            seen.clear()
            malformed = 0
            conn.send(("reset", None))

    await serve_cloud(conn, handle, command)


# -- the publisher ------------------------------------------------------------------------------


class PublishWindow:
    """QoS 1 publishes through paho, called from the loop, at most `window` of them
    unacknowledged; a PUBACK is counted in paho's callback.

    The publisher stands for the network server, which runs on a machine of its own; here
    it shares 2 cores with the daemon, so it costs as little as it can: aiomqtt's `publish`
    made a task and a future per uplink (0.4 of a core at 1,350 uplinks/s)."""

    def __init__(self, client: aiomqtt.Client, window: int) -> None:
        self._paho = client._client
        self._window = self.free = window
        self._slot = asyncio.Event()
        aiomqtt_on_publish = self._paho.on_publish

        def on_publish(*args: Any) -> None:
            if aiomqtt_on_publish is not None:
                aiomqtt_on_publish(*args)  # nothing of ours is pending there: a no-op
            self.free += 1
            self._slot.set()

        self._paho.on_publish = on_publish

    async def room(self) -> None:
        """Return once one more publish may go."""
        while self.free == 0:
            self._slot.clear()
            await self._slot.wait()

    def publish(self, topic: str, payload: bytes) -> None:
        info = self._paho.publish(topic, payload, qos=1)
        if info.rc != 0:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish the uplink")
        self.free -= 1

    async def drained(self) -> None:
        """Return once every publish is acknowledged."""
        while self.free < self._window:
            self._slot.clear()
            await self._slot.wait()


@dataclass
class Published:
    times: list[float]  # monotonic time each uplink was handed to the client, by sequence
    acked: float  # monotonic time the last PUBACK arrived
    cpu: float  # CPU seconds the publisher used from the first publish to the last PUBACK


def publisher_process(
    conn: Connection,
    port: int,
    fmt: str,
    devices: list[str],
    n: int,
    window: int,
    rate: float | None,
) -> None:
    _child_main(conn, lambda: _publish(conn, port, fmt, devices, n, window, rate))


async def _publish(
    conn: Connection,
    port: int,
    fmt: str,
    devices: list[str],
    n: int,
    window: int,
    rate: float | None,
) -> Published:
    """QoS 1 publishes, at most `window` unacknowledged, at `rate` or as fast as acknowledged."""
    # Made before the clock starts: uplink n goes to device n % len(devices), FCnt n.
    messages = [uplink(fmt, devices[seq % len(devices)], seq) for seq in range(n)]
    times = [0.0] * n
    async with aiomqtt.Client(
        HOST, port, identifier="iotflow-bench-publisher", max_inflight_messages=window
    ) as client:
        publisher = PublishWindow(client, window)
        # Connected, uplinks made: the orchestrator starts its clocks and says go.
        conn.send(("ready", None))
        await asyncio.to_thread(conn.recv)
        start, cpu = time.monotonic(), time.process_time()
        for seq, (topic, payload) in enumerate(messages):
            if rate is not None:
                due = start + seq / rate
                now = time.monotonic()
                if due > now:
                    await asyncio.sleep(due - now)
            await publisher.room()
            times[seq] = time.monotonic()
            publisher.publish(topic, payload)
        async with asyncio.timeout(120):
            await publisher.drained()
        acked_at, cpu = time.monotonic(), time.process_time() - cpu
    return Published(times, acked_at, cpu)


# -- the ceiling --------------------------------------------------------------------------------


@dataclass
class Ceiling:
    requests: int
    errors: int
    seconds: float  # first request sent → last answer read

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def ceiling_process(
    conn: Connection, base_url: str, devices: list[str], n: int, fanout: int, in_flight: int
) -> None:
    _child_main(conn, lambda: _ceiling(base_url, devices, n, fanout, in_flight))


async def _ceiling(
    base_url: str, devices: list[str], n: int, fanout: int, in_flight: int
) -> Ceiling:
    """What the daemon's sinks do, and nothing else: `fanout` keep-alive sessions, each
    posting the n Actility documents with `in_flight` requests at once."""
    bodies = [orjson.dumps(actility(devices[seq % len(devices)], seq)) for seq in range(n)]
    headers = {"Content-Type": "application/json", "User-Agent": "iotflow-bench"}
    errors = 0

    async def connection(k: int) -> None:
        nonlocal errors
        url = f"{base_url}/ceiling{k}"
        queue = iter(bodies)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=in_flight, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=10),
            headers=headers,
            cookie_jar=aiohttp.DummyCookieJar(),
        ) as session:

            async def worker() -> None:
                nonlocal errors
                for body in queue:
                    try:
                        async with session.post(url, data=body, allow_redirects=False) as r:
                            if not 200 <= r.status < 300:
                                errors += 1
                    except (TimeoutError, aiohttp.ClientError):
                        errors += 1

            await asyncio.gather(*(worker() for _ in range(in_flight)))

    start = time.monotonic()
    await asyncio.gather(*(connection(k) for k in range(fanout)))
    return Ceiling(n * fanout - errors, errors, time.monotonic() - start)


# -- the daemon ---------------------------------------------------------------------------------


class BenchDaemon(DaemonProcess):
    """The suite's daemon process, at a log level that writes nothing per uplink."""

    log_level = "info"

    def config_text(self, connections: list[dict[str, Any]]) -> str:
        text = super().config_text(connections)
        # Debug (the suite's level) logs every uplink; info still logs "Consuming uplinks",
        # which start() waits for.
        replaced = text.replace('level = "debug"', f'level = "{self.log_level}"', 1)
        assert replaced != text, "the test daemon's config no longer sets the log level"
        return replaced


def proc_status(pid: int) -> dict[str, int]:
    """The kB figures of /proc/<pid>/status (VmRSS, VmHWM, ...)."""
    figures: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            figures[key] = int(parts[0])
    return figures


def cpu_seconds(pid: int | None, thread: int | None = None) -> float:
    """User + system CPU time so far of a process (all its threads), or of one thread."""
    if pid is None:
        return 0.0
    where = f"/proc/{pid}/task/{thread}/stat" if thread is not None else f"/proc/{pid}/stat"
    try:
        stat = Path(where).read_text()
    except FileNotFoundError:
        return 0.0
    fields = stat.rpartition(")")[2].split()
    # utime, stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def cpu_figures(daemons: Sequence[int], broker: int | None, cloud: int) -> dict[str, float]:
    return {
        "daemon": sum(cpu_seconds(pid) for pid in daemons),
        # The event loop's thread: near 100% of one core means the loop is the bottleneck.
        "daemon_loop": sum(cpu_seconds(pid, thread=pid) for pid in daemons),
        "broker": cpu_seconds(broker),
        "cloud": cpu_seconds(cloud),
    }


def filesystem_of(path: Path) -> str:
    """The type of the filesystem that holds `path` (tmpfs makes fsync free)."""
    best, kind = "", "?"
    resolved = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3:
            mount = parts[1]
            inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) > len(best):
                best, kind = mount, parts[2]
    return kind


# -- figures ------------------------------------------------------------------------------------


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class Figures:
    uplinks: int
    fanout: int
    expected: int
    delivered: int = 0  # distinct (connection, uplink) that reached the cloud
    requests: int = 0  # requests the cloud recorded, duplicates included
    duplicates: int = 0
    missing: int = 0
    unexpected: int = 0  # a DevEUI that does not match the FCnt's device, or a bad body
    publish_seconds: float = 0.0
    publish_per_second: float = 0.0
    end_to_end_seconds: float = 0.0
    end_to_end_per_second: float = 0.0
    steady_per_second: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    rss_idle_kib: int = 0
    rss_peak_kib: int = 0
    rss_end_kib: int = 0
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    cpu_window_seconds: float = math.nan  # wall time the CPU figures were taken over
    daemon_metrics: dict[str, float] = field(default_factory=dict)
    daemon_exit_code: int | None = None
    ceiling_per_second: float = 0.0
    ceiling_errors: int = 0
    ratio_end_to_end: float = 0.0
    ratio_steady: float = 0.0
    # 1-minute load average of the machine before and after: others' work skews the figures.
    load_average: tuple[float, float] = (math.nan, math.nan)


def analyse(
    figures: Figures,
    published: Published,
    records: tuple[list[float], list[str], list[str], list[int], int],
    devices: list[str],
    paths: list[str],
) -> None:
    at, req_paths, devs, fcnts, malformed = records
    first: dict[tuple[str, int], float] = {}
    unexpected = malformed
    n = len(published.times)
    wanted = set(paths)
    for arrived, path, dev, seq in zip(at, req_paths, devs, fcnts, strict=True):
        if path not in wanted or not 0 <= seq < n or dev != devices[seq % len(devices)]:
            unexpected += 1
            continue
        key = (path, seq)
        if key not in first or arrived < first[key]:
            first[key] = arrived
    figures.requests = len(at)
    figures.delivered = len(first)
    # `at` holds well-formed requests only; the malformed ones were counted apart.
    figures.duplicates = len(at) - (unexpected - malformed) - len(first)
    figures.unexpected = unexpected
    figures.missing = figures.expected - len(first)
    start = min(published.times)
    figures.publish_seconds = published.acked - start
    figures.publish_per_second = n / figures.publish_seconds if figures.publish_seconds else 0.0
    if not first:
        return
    arrivals = sorted(first.values())
    figures.end_to_end_seconds = arrivals[-1] - start
    figures.end_to_end_per_second = len(arrivals) / figures.end_to_end_seconds
    low, high = int(0.1 * len(arrivals)), int(0.9 * len(arrivals)) - 1
    if high > low and arrivals[high] > arrivals[low]:
        figures.steady_per_second = (high - low) / (arrivals[high] - arrivals[low])
    latencies = sorted(
        (arrived - published.times[seq]) * 1000 for (_, seq), arrived in first.items()
    )
    figures.latency_ms = {
        "p50": percentile(latencies, 50),
        "p90": percentile(latencies, 90),
        "p99": percentile(latencies, 99),
        "max": latencies[-1],
        "min": latencies[0],
    }


_COUNTERS = (
    "iotflow_delivery_retries_total",
    "iotflow_uplinks_received_total",
    "iotflow_uplinks_rejected_total",
    "iotflow_uplinks_unrouted_total",
)


def metric_sums(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, float]:
    """The daemon's own counts, summed over connections."""
    sums: dict[str, float] = {}
    for (name, labels), value in samples.items():
        label = dict(labels)
        if name == "iotflow_deliveries_total":
            key = f"deliveries_{label.get('outcome', '?')}"
        elif name in _COUNTERS:
            key = name.removeprefix("iotflow_").removesuffix("_total")
        else:
            continue
        sums[key] = sums.get(key, 0.0) + value
    return sums


# -- the run ------------------------------------------------------------------------------------


def say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def device_euis(count: int) -> list[str]:
    return [f"0018B2BE{i:08X}" for i in range(count)]


# `--processors`: two operations on every connection, a simplifier and a JMESPath template
# that keeps what the cloud reads (DevEUI, FCntUp), so the same analysis applies.
PROCESSORS: list[dict[str, Any]] = [
    {"type": "callProcessor", "id": "MESSAGE_SIMPLIFIER"},
    {
        "type": "jmespath",
        "template": {
            "DevEUI": "{{ DevEUI_uplink.DevEUI }}",
            "FCntUp": "{{ DevEUI_uplink.FCntUp }}",
            "port": "{{ DevEUI_uplink.FPort }}",
            "rssi": "{{ DevEUI_uplink.LrrRSSI }}",
        },
    },
]


# `--driver`: a flow over every bench device whose driver is the shipped EM300-TH example
# codec (examples/drivers), so that every delivery of the second run is decoded first.
EXAMPLE_DRIVERS = Path(__file__).resolve().parents[2] / "examples" / "drivers"


def driver_flow(fanout: int) -> str:
    connectors = ", ".join(f'{{ connectionId = "bench-{k}" }}' for k in range(fanout))
    return (
        f'[drivers]\npath = "{EXAMPLE_DRIVERS}"\n\n'
        '[[flows]]\nid = "bench"\nname = "bench"\n'
        'driver = { id = "milesight:em300-th:1" }\n'
        'matchers = [{ type = "range", from = "0018B2BE00000000", to = "0018B2BEFFFFFFFF" }]\n'
        f"connectors = [{connectors}]\n"
    )


def connections_for(
    base_url: str,
    fanout: int,
    devices: list[str],
    operations: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    extra = {"upOperations": operations} if operations else {}
    return [
        {
            "id": f"bench-{k}",
            "name": f"benchmark {k}",
            "connectorId": "actility-http-iot",
            "devices": devices,
            **extra,
            "configuration": {"destinationURL": f"{base_url}/c{k}"},
        }
        for k in range(fanout)
    ]


async def daemon_sums(daemons: Sequence[DaemonProcess | NodeRed]) -> dict[str, float]:
    """`metric_sums` of every daemon, added up."""
    sums: dict[str, float] = {}
    for daemon in daemons:
        for key, value in metric_sums(await daemon.metrics()).items():
            sums[key] = sums.get(key, 0.0) + value
    return sums


async def taken_in(daemons: Sequence[DaemonProcess | NodeRed]) -> str:
    """What the daemons have taken in and delivered so far, by their own counters: whether
    uplinks wait at the broker or in the daemon (ingest comes first, `delivery/pressure.py`)."""
    if any(isinstance(daemon, NodeRed) for daemon in daemons):
        return ""  # no such counters
    sums = await daemon_sums(daemons)
    received = sums.get("uplinks_received", 0.0)
    return f" (taken in {received:.0f}, sent {sums.get('deliveries_delivered', 0.0):.0f})"


async def wait_delivered(
    args: argparse.Namespace,
    cloud: Child,
    publisher: Child,
    daemons: Sequence[DaemonProcess | NodeRed],
    expected: int,
    until: float,
) -> Published:
    """Poll the cloud until it holds every expected delivery, or until nothing new has
    reached it for `--stall` seconds once everything is published (what is lost then counts
    as missing); return the publish record."""
    published: Published | None = None
    last_report = last_change = time.monotonic()
    seen = -1
    while True:
        total, distinct, _ = await cloud.ask("count")
        if published is None and publisher.has_message():
            published = await publisher.receive(60)
        if published is not None and distinct >= expected:
            return published
        if distinct != seen:
            seen, last_change = distinct, time.monotonic()
        elif published is not None and time.monotonic() - last_change > args.stall:
            say(
                args,
                f"  nothing new for {args.stall:g} s: {expected - distinct} of {expected}"
                f" deliveries never came; log:\n{daemons[0].tail(20)}",
            )
            return published
        for daemon in daemons:
            assert daemon.process is not None
            if daemon.process.returncode is not None:
                raise RuntimeError(f"the daemon exited early:\n{daemon.tail()}")
        now = time.monotonic()
        if now > until:
            raise TimeoutError(
                f"{distinct} of {expected} deliveries (+{total - distinct} repeated) reached"
                f" the cloud before the deadline; daemon log:\n{daemons[0].tail(20)}"
            )
        if now - last_report > args.progress:
            last_report = now
            say(args, f"  {distinct}/{expected} delivered{await taken_in(daemons)}")
        await asyncio.sleep(0.02)


async def run(
    args: argparse.Namespace,
    workdir: Path,
    figures: Figures,
    operations: list[dict[str, Any]] | None = None,
    red: Path | None = None,
) -> None:
    until = time.monotonic() + args.deadline
    devices = device_euis(args.devices)
    children: list[Child] = []
    # The suite saves the broker's persistence every second, for its crash tests; here that
    # would be the broker's work rather than the daemon's (1800 s is mosquitto's default).
    broker = Mosquitto(autosave_interval=1800)
    daemons: list[BenchDaemon | NodeRed] = []
    try:
        broker.start()
        say(args, f"broker on {broker.url}")
        cloud = Child("cloud", cloud_process, args.cloud_delay / 1000)
        children.append(cloud)
        port: int = await cloud.receive(60)
        base_url = f"http://{HOST}:{port}"
        say(args, f"cloud on {base_url} (pid {cloud.pid})")

        if red is not None:
            # Node-RED instead of the daemon: the same broker, publisher, cloud and ceiling.
            daemons.append(
                NodeRed(
                    red,
                    workdir / "node-red",
                    broker_port=broker.port,
                    topic="#",
                    url=f"{base_url}/c0",
                )
            )
        # --dead: connections bound to the same devices whose cloud never answers (nothing
        # listens on its port): their deliveries wait in the spool, the others must not care.
        dead_url = f"http://{HOST}:{free_port()}"
        dead = [
            {
                "id": f"dead-{k}",
                "name": f"dead cloud {k}",
                "connectorId": "actility-http-iot",
                "devices": devices,
                "configuration": {"destinationURL": f"{dead_url}/dead{k}"},
            }
            for k in range(args.dead)
        ]
        for k in range(args.processes if red is None else 0):
            # Several: one subscription shared by all ($share/<group>/...), each with its
            # own spool, registry and API (docs/performance.md, "More cores").
            shared = {"shared_group": "bench"} if args.processes > 1 else {}
            daemons.append(
                BenchDaemon(
                    workdir / f"daemon{k}",
                    broker_url=broker.url,
                    client_id=f"iotflow-bench-{k}",
                    connections=connections_for(base_url, args.fanout, devices, operations) + dead,
                    delivery={"max_in_flight": args.in_flight},
                    extra=driver_flow(args.fanout) if operations and args.driver else "",
                    mqtt={"protocol": args.protocol, **shared},
                )
            )
        await asyncio.gather(*(daemon.start() for daemon in daemons))
        pids = []
        for daemon in daemons:
            assert daemon.process is not None
            pids.append(daemon.process.pid)
        say(args, f"running (pids {pids}), spool on {filesystem_of(workdir)}")
        await asyncio.sleep(1.0)  # let start-up allocations settle before the idle figure
        figures.rss_idle_kib = sum(proc_status(pid)["VmRSS"] for pid in pids)

        publisher = Child(
            "publisher",
            publisher_process,
            broker.port,
            args.format,
            devices,
            args.n,
            args.window,
            args.rate,
        )
        children.append(publisher)
        await publisher.receive(max(1.0, until - time.monotonic()))
        cpu_start = time.monotonic()
        cpu_before = cpu_figures(pids, broker.pid, cloud.pid)
        publisher.tell("go")
        say(args, f"publishing {args.n} {args.format} uplinks (pid {publisher.pid})")
        published = await wait_delivered(args, cloud, publisher, daemons, figures.expected, until)
        cpu_after = cpu_figures(pids, broker.pid, cloud.pid)
        figures.cpu_seconds = {k: cpu_after[k] - cpu_before[k] for k in cpu_before}
        figures.cpu_seconds["publisher"] = published.cpu
        figures.cpu_window_seconds = time.monotonic() - cpu_start
        # A short grace, so that a late duplicate is counted rather than missed.
        await asyncio.sleep(args.grace)
        statuses = [proc_status(pid) for pid in pids]
        figures.rss_peak_kib = sum(status["VmHWM"] for status in statuses)
        figures.rss_end_kib = sum(status["VmRSS"] for status in statuses)
        figures.daemon_metrics = await daemon_sums(daemons)
        codes = await asyncio.gather(
            *(daemon.stop(timeout=max(5.0, until - time.monotonic())) for daemon in daemons)
        )
        figures.daemon_exit_code = max(codes, key=abs)
        say(args, f"stopped (exit {codes})")

        records = await cloud.ask("records", timeout=60)
        paths = [f"/c{k}" for k in range(args.fanout)]
        analyse(figures, published, records, devices, paths)
        await cloud.ask("reset")

        say(args, f"ceiling: {args.n * args.fanout} posts, {args.in_flight} in flight each")
        client = Child(
            "ceiling", ceiling_process, base_url, devices, args.n, args.fanout, args.in_flight
        )
        children.append(client)
        ceiling: Ceiling = await client.receive(max(1.0, until - time.monotonic()))
        figures.ceiling_per_second = ceiling.per_second
        figures.ceiling_errors = ceiling.errors
        if ceiling.per_second:
            figures.ratio_end_to_end = figures.end_to_end_per_second / ceiling.per_second
            figures.ratio_steady = figures.steady_per_second / ceiling.per_second
        cloud.tell("stop")
        await cloud.receive(30)
    finally:
        for daemon in daemons:
            if daemon.process is not None and daemon.process.returncode is None:
                with contextlib.suppress(AssertionError, RuntimeError):
                    await daemon.stop(timeout=30)
            await daemon.close()
        for child in children:
            child.close()
        broker.close()


# -- output -------------------------------------------------------------------------------------


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def report(
    args: argparse.Namespace, figures: Figures, spool_fs: str, subject: str = "iotflow"
) -> str:
    f = figures
    pace = f"{args.rate:g}/s" if args.rate else f"as fast as acknowledged (window {args.window})"
    lat = f.latency_ms
    cpu = f.cpu_seconds

    def share(name: str) -> str:
        return f"{100 * cpu.get(name, 0) / f.cpu_window_seconds:.0f}%"

    m = f.daemon_metrics
    rows = [
        (
            "publish (broker PUBACKs)",
            f"{f.publish_per_second:,.0f} uplinks/s  ({f.uplinks} in {f.publish_seconds:.2f} s)",
        ),
        (
            "deliveries",
            f"{f.delivered} of {f.expected}, {f.duplicates} duplicates,"
            f" {f.missing} missing, {f.unexpected} unexpected",
        ),
        (
            "throughput, end to end",
            f"{f.end_to_end_per_second:,.0f} deliveries/s"
            f"  (first publish → last delivery, {f.end_to_end_seconds:.2f} s)",
        ),
        (
            "throughput, steady state",
            f"{f.steady_per_second:,.0f} deliveries/s  (10th → 90th percentile of deliveries)",
        ),
        (
            "latency publish → cloud",
            "  ".join(f"{k} {lat.get(k, math.nan):,.1f} ms" for k in ("p50", "p90", "p99", "max")),
        ),
        (
            "daemon RSS",
            f"idle {mib(f.rss_idle_kib)}, peak (VmHWM) {mib(f.rss_peak_kib)},"
            f" after the run {mib(f.rss_end_kib)}",
        ),
        (
            "CPU during the run",
            f"daemon {share('daemon')} of a core (event loop thread {share('daemon_loop')}),"
            f" broker {share('broker')}, cloud {share('cloud')}, publisher {share('publisher')}"
            f"  over {f.cpu_window_seconds:.2f} s",
        ),
        (
            # CPU time, not wall time: much less sensitive to the machine's other load.
            "daemon CPU per delivery",
            f"{1e6 * cpu.get('daemon', 0) / max(1, f.delivered):,.0f} µs"
            f" (event loop thread {1e6 * cpu.get('daemon_loop', 0) / max(1, f.delivered):,.0f} µs)",
        ),
        (
            "daemon counters",
            f"delivered {m.get('deliveries_delivered', 0):.0f},"
            f" retries {m.get('delivery_retries', 0):.0f},"
            f" expired {m.get('deliveries_expired', 0):.0f},"
            f" failed {m.get('deliveries_failed', 0):.0f}, exit code {f.daemon_exit_code}",
        ),
        (
            "ceiling (bare aiohttp)",
            f"{f.ceiling_per_second:,.0f} requests/s"
            f"  ({args.fanout} × {args.in_flight} in flight, {f.ceiling_errors} errors)",
        ),
        (
            f"{subject} / ceiling",
            f"{f.ratio_end_to_end:.2f} end to end, {f.ratio_steady:.2f} steady",
        ),
    ]
    head = (
        f"{subject} routing: {f.uplinks} {args.format} uplinks from {args.devices} devices,"
        f" fanout {args.fanout} ({f.expected} deliveries), max_in_flight {args.in_flight},"
        f" publish {pace}, cloud delay {args.cloud_delay:g} ms\n"
        f"machine: {os.cpu_count()} CPUs, load average {f.load_average[0]:.2f} before,"
        f" {f.load_average[1]:.2f} after; Python {platform.python_version()};"
        f" spool on {spool_fs}"
    )
    width = max(len(name) for name, _ in rows)
    return "\n".join([head, "", *(f"  {name:<{width}}  {value}" for name, value in rows)])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Routing throughput, latency and memory of `iotflow run` against a local"
        " broker and cloud, and the bare-HTTP ceiling of the same machine."
    )
    parser.add_argument("-n", type=int, default=5000, help="uplinks to publish (default 5000)")
    parser.add_argument("--devices", type=int, default=100, help="devices bound (default 100)")
    parser.add_argument(
        "--fanout", type=int, default=1, help="connections each device is bound to (default 1)"
    )
    parser.add_argument(
        "--compare-fanout",
        type=int,
        metavar="K",
        help="alternate runs with --fanout 1 and --fanout K (--runs pairs) and print the"
        " cost of fan-out: CPU per uplink, its ratio, and what taking an uplink in and each"
        " delivery cost",
    )
    parser.add_argument("--format", choices=FORMATS, default="actility", help="input format")
    parser.add_argument(
        "--in-flight", type=int, default=32, help="delivery.max_in_flight (default 32)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="publish at this many uplinks/s (default: flat out)",
    )
    parser.add_argument(
        "--window", type=int, default=100, help="unacknowledged publishes at most (default 100)"
    )
    parser.add_argument(
        "--cloud-delay", type=float, default=0.0, help="ms the cloud waits before answering"
    )
    parser.add_argument(
        "--deadline", type=float, default=600.0, help="seconds for the whole run (default 600)"
    )
    parser.add_argument(
        "--stall",
        type=float,
        default=20.0,
        help="once all is published, stop waiting when nothing new reaches the cloud for this"
        " many seconds, and count what never came as missing (default 20)",
    )
    parser.add_argument(
        "--grace", type=float, default=0.5, help="seconds to wait for late duplicates"
    )
    parser.add_argument("--dir", help="where the daemon's spool and registry go (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument(
        "--progress",
        type=float,
        default=5.0,
        metavar="S",
        help="a progress line every S seconds (default 5): delivered, taken in, sent",
    )
    parser.add_argument(
        "--flows",
        help="comma-separated flow counts: print the routing index's per-uplink cost with"
        " that many flows (key, thing, application and range matchers) and exit",
    )
    parser.add_argument(
        "--bindings",
        help="comma-separated binding counts: print the routing index's per-uplink cost with"
        " that many device bindings over 1,000 connections and exit",
    )
    parser.add_argument(
        "--processors",
        action="store_true",
        help="run twice, without and then with two upOperations, and print both",
    )
    parser.add_argument(
        "--driver",
        action="store_true",
        help="with --processors: the second run also decodes each uplink with a driver",
    )
    parser.add_argument(
        "--protocol", choices=("5", "3.1.1"), default="5", help="the daemon's [mqtt] protocol"
    )
    parser.add_argument(
        "--runs", type=int, default=1, help="flat-out runs; several print their medians"
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="then one run at each offered load of --loads (fractions of the median"
        " sustained throughput, first publish to last delivery): delivered throughput and"
        " latency against offered load",
    )
    parser.add_argument(
        "--loads",
        default="0.25,0.5,0.75,1,1.25",
        help="with --sweep: offered loads as fractions of the flat-out sustained throughput",
    )
    parser.add_argument("--plot", help="with --sweep: write the plot (PNG) to this path")
    parser.add_argument(
        "--dead",
        type=int,
        default=0,
        help="connections to a cloud that never answers, bound to the same devices",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="daemons sharing the subscription (shared_group), each with its own spool",
    )
    parser.add_argument(
        "--node-red",
        action="store_true",
        help="also measure Node-RED 4 (mqtt in -> http request) once, installed from npm"
        " into a temporary directory",
    )
    args = parser.parse_args(argv)
    for name in ("n", "devices", "fanout", "in_flight", "window", "runs", "processes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be positive")
    if args.compare_fanout is not None:
        if args.compare_fanout < 2:
            parser.error("--compare-fanout must be at least 2")
        if args.fanout != 1 or args.sweep or args.processors or args.node_red:
            parser.error(
                "--compare-fanout goes alone (not with --fanout, --sweep, --processors, --node-red)"
            )
    if args.node_red and args.fanout != 1:
        parser.error("--node-red goes with --fanout 1 (its flow has one http request node)")
    if args.plot and not args.sweep:
        parser.error("--plot goes with --sweep")
    try:
        args.load_fractions = [float(x) for x in args.loads.split(",")]
    except ValueError:
        parser.error("--loads: comma-separated numbers")
    if args.driver and not args.processors:
        parser.error("--driver goes with --processors (it changes the second run)")
    if args.deadline <= 0 or args.stall <= 0 or args.cloud_delay < 0 or args.grace < 0:
        parser.error(
            "--deadline and --stall must be positive, --cloud-delay and --grace not negative"
        )
    return args


async def bounded(
    args: argparse.Namespace,
    workdir: Path,
    figures: Figures,
    operations: list[dict[str, Any]] | None = None,
    red: Path | None = None,
) -> None:
    # SIGTERM (a CI timeout, `kill`) stops the run the way Ctrl-C does: everything started
    # is stopped on the way out, nothing is left running.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        async with asyncio.timeout(args.deadline):
            await run(args, workdir, figures, operations, red)
    except TimeoutError as exc:
        raise TimeoutError(f"the run passed its deadline ({args.deadline:g}s): {exc}") from None


def index_connections(count: int) -> list[Any]:
    """`count` HTTP connections `c0`, `c1`...: what the routing index figures route to."""
    from iotflow.connectors.connection import parse_connection

    return [
        parse_connection(
            {
                "id": f"c{k}",
                "name": "x",
                "connectorId": "actility-http-iot",
                "configuration": {"destinationURL": "http://127.0.0.1:9/"},
            }
        )
        for k in range(count)
    ]


def flows_figure(counts: Sequence[int], lookups: int = 200_000) -> str:
    """Per-uplink cost of `RoutingIndex.targets` with N flows, against the same lookups.

    Flow i has a key matcher (its own DevEUI), a thing matcher on two tags (`site=<i % 500>`,
    `floor=<i>`), an application matcher (`app-<i>`), and every 100th a range of 50 DevEUIs,
    to one of 10 connections. Uplinks: a random DevEUI of the flows' (or not), two tags, an
    application, drawn with a fixed seed; about half match a flow.
    """
    import random

    from iotflow.flows import parse_flow
    from iotflow.routing import RoutingIndex

    connections = index_connections(10)
    lines = ["routing cost by flows (RoutingIndex.targets, one thread, in process):"]
    for n in counts:
        flows = []
        for i in range(n):
            matchers: list[dict[str, Any]] = [
                {"type": "key", "key": f"{0x0018B20000000000 + i:016X}"},
                {"type": "thing", "tags": [f"site={i % 500}", f"floor={i}"]},
                {"type": "application", "id": f"app-{i}"},
            ]
            if i % 100 == 0:
                lo = 0x0018C20000000000 + i
                matchers.append({"type": "range", "from": f"{lo:016X}", "to": f"{lo + 49:016X}"})
            flows.append(
                parse_flow(
                    {
                        "id": f"f{i:06d}",
                        "name": "f",
                        "matchers": matchers,
                        "connectors": [{"connectionId": f"c{i % 10}"}],
                    }
                )
            )
        started = time.perf_counter()
        index = RoutingIndex(connections, {}, flows)
        built = time.perf_counter() - started
        rng = random.Random(13)
        uplinks = []
        for _ in range(10_000):
            i = rng.randrange(2 * n)  # half beyond the flows: no match
            dev = f"{(0x0018B20000000000 if rng.random() < 0.7 else 0x0018C20000000000) + i:016X}"
            tags = frozenset({f"site={i % 500}", f"floor={i}"})
            uplinks.append((dev, tags, f"app-{rng.randrange(2 * n)}"))
        routed = 0
        started = time.perf_counter()
        for k in range(lookups):
            dev, tags, app = uplinks[k % len(uplinks)]
            routed += len(index.targets(dev, tags, app))
        per_uplink = (time.perf_counter() - started) / lookups
        lines.append(
            f"  {n:>7} flows: {per_uplink * 1e6:6.2f} µs per uplink"
            f" ({routed / lookups:.2f} targets on average), index built in {built:.2f} s"
        )
    return "\n".join(lines)


def bindings_figure(counts: Sequence[int], lookups: int = 200_000) -> str:
    """Per-uplink cost of `RoutingIndex.targets` with N device bindings over 1,000
    connections (N / 1,000 devices each), against the same lookups: a random DevEUI, bound
    or not (half each), drawn with a fixed seed."""
    import random

    from iotflow.routing import RoutingIndex

    connections = index_connections(1000)
    lines = ["routing cost by bindings (RoutingIndex.targets, one thread, in process):"]
    for n in counts:
        bindings = {f"{0x0018B20000000000 + i:016X}": [f"c{i % 1000}"] for i in range(n)}
        started = time.perf_counter()
        index = RoutingIndex(connections, bindings)
        built = time.perf_counter() - started
        rng = random.Random(13)
        uplinks = [f"{0x0018B20000000000 + rng.randrange(2 * n):016X}" for _ in range(10_000)]
        routed = 0
        started = time.perf_counter()
        for k in range(lookups):
            routed += len(index.targets(uplinks[k % len(uplinks)]))
        per_uplink = (time.perf_counter() - started) / lookups
        lines.append(
            f"  {n:>7} bindings: {per_uplink * 1e6:6.2f} µs per uplink"
            f" ({routed / lookups:.2f} targets on average), index built in {built:.2f} s"
        )
    return "\n".join(lines)


def measure(
    args: argparse.Namespace,
    operations: list[dict[str, Any]] | None = None,
    red: Path | None = None,
) -> tuple[Figures, str]:
    """One run in a work directory of its own; its figures and the spool's filesystem."""
    workdir = Path(tempfile.mkdtemp(prefix="iotflow-bench-", dir=args.dir))
    spool_fs = filesystem_of(workdir)
    figures = Figures(uplinks=args.n, fanout=args.fanout, expected=args.n * args.fanout)
    load_before = os.getloadavg()[0]
    try:
        asyncio.run(bounded(args, workdir, figures, operations, red))
    finally:
        figures.load_average = (load_before, os.getloadavg()[0])
        if args.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return figures, spool_fs


def median(values: Sequence[float]) -> float:
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return math.nan
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def cpu_per_delivery(f: Figures) -> float:
    """µs of daemon CPU time per delivery: what the machine's other load changes least."""
    return 1e6 * f.cpu_seconds.get("daemon", 0.0) / max(1, f.delivered)


def cpu_per_uplink(f: Figures) -> float:
    """µs of daemon CPU time per uplink published, whatever its fan-out."""
    return 1e6 * f.cpu_seconds.get("daemon", 0.0) / max(1, f.uplinks)


def summary(label: str, runs: Sequence[Figures]) -> str:
    """The medians of several runs, each ratio taken within its own run first."""
    loads = ", ".join(f"{f.load_average[0]:.1f}" for f in runs)

    def m(get: Callable[[Figures], float]) -> float:
        return median([get(f) for f in runs])

    return "\n".join(
        [
            f"{label}: medians of {len(runs)} runs (load average before each: {loads})",
            f"  throughput, steady state  {m(lambda f: f.steady_per_second):,.0f} deliveries/s"
            f"  (end to end {m(lambda f: f.end_to_end_per_second):,.0f})",
            f"  ceiling (bare aiohttp)    {m(lambda f: f.ceiling_per_second):,.0f} requests/s",
            f"  iotflow / ceiling         {m(lambda f: f.ratio_steady):.2f} steady,"
            f" {m(lambda f: f.ratio_end_to_end):.2f} end to end (each run against its own ceiling)",
            f"  latency p50 / p99         {m(lambda f: f.latency_ms.get('p50', math.nan)):,.1f}"
            f" / {m(lambda f: f.latency_ms.get('p99', math.nan)):,.1f} ms",
            f"  daemon CPU per delivery   {m(cpu_per_delivery):,.0f} µs",
            f"  daemon peak RSS           {mib(int(m(lambda f: f.rss_peak_kib)))}",
        ]
    )


def fanout_cost(k: int, pairs: Sequence[tuple[Figures, Figures]]) -> str:
    """The cost of fan-out from alternated runs with one connection and with `k`.

    The daemon's CPU per uplink is I + D with one connection and I + k·D' with `k`, where I
    is taking an uplink in (read, decode, route, spool row, acknowledgement) and D a
    delivery (its POST and its completion). Taking D' = D gives both: what `k` connections
    cost against one is (I + k·D) / (I + D), under 3 for k = 5 only while D < I.
    """
    one = median([cpu_per_uplink(f) for f, _ in pairs])
    many = median([cpu_per_uplink(f) for _, f in pairs])
    ratios = ", ".join(f"{cpu_per_uplink(b) / cpu_per_uplink(a):.2f}" for a, b in pairs)
    delivery = (many - one) / (k - 1)
    return "\n".join(
        [
            f"fan-out to {k}: medians of {len(pairs)} alternated pairs",
            f"  daemon CPU per uplink     {one:,.0f} µs with 1 connection, {many:,.0f} µs"
            f" with {k}: {many / one:.2f} × (each pair: {ratios})",
            f"  implied                   a delivery {delivery:,.0f} µs, taking an uplink in"
            f" {one - delivery:,.0f} µs",
        ]
    )


def sweep_table(rows: Sequence[tuple[float, Figures]]) -> str:
    lines = [
        "offered load sweep (one run each):",
        "   offered/s  delivered/s   p50 ms    p99 ms   CPU µs/delivery  load",
    ]
    for rate, f in rows:
        lines.append(
            f"  {rate:10,.0f}  {f.end_to_end_per_second:11,.0f}"
            f"  {f.latency_ms.get('p50', math.nan):7,.1f}"
            f"  {f.latency_ms.get('p99', math.nan):8,.1f}"
            f"  {cpu_per_delivery(f):16,.0f}  {f.load_average[0]:4.1f}"
        )
    return "\n".join(lines)


def plot(
    path: str,
    args: argparse.Namespace,
    flat: Sequence[Figures],
    rows: Sequence[tuple[float, Figures]],
    node_red: Figures | None,
) -> None:
    """Throughput and latency against offered load, with the ceiling of the same runs."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file
    import matplotlib.pyplot as plt

    ceiling = median([f.ceiling_per_second for f in flat])
    sustained = median([f.end_to_end_per_second for f in flat])
    offered = [rate for rate, _ in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    top.plot(offered, [f.end_to_end_per_second for _, f in rows], "o-", label="iotflow, paced")
    top.plot(offered, offered, ":", color="grey", label="offered")
    top.axhline(
        sustained,
        color="C0",
        ls="--",
        lw=1,
        label=f"iotflow flat out, sustained ({sustained:,.0f}/s)",
    )
    top.axhline(ceiling, color="C3", lw=1, label=f"bare aiohttp ceiling ({ceiling:,.0f}/s)")
    top.axhline(0.6 * ceiling, color="C3", ls=":", lw=1, label="0.6 × ceiling")
    if node_red is not None:
        top.axhline(
            node_red.end_to_end_per_second,
            color="C2",
            ls="-.",
            lw=1,
            label=f"Node-RED flat out, sustained ({node_red.end_to_end_per_second:,.0f}/s)",
        )
    top.set_ylabel("deliveries/s")
    top.legend(fontsize="small")
    top.grid(alpha=0.3)
    for key, style in (("p50", "o-"), ("p99", "s-")):
        bottom.plot(offered, [f.latency_ms.get(key, math.nan) for _, f in rows], style, label=key)
    bottom.axhline(25, color="C3", ls=":", lw=1, label="25 ms")
    bottom.set_yscale("log")
    bottom.set_xlabel("offered load, uplinks/s")
    bottom.set_ylabel("publish → cloud latency, ms")
    bottom.legend(fontsize="small")
    bottom.grid(alpha=0.3, which="both")
    loads = [f.load_average[0] for f in flat] + [f.load_average[0] for _, f in rows]
    fig.suptitle(
        f"iotflow: {args.n} {args.format} uplinks, {args.devices} devices, fanout"
        f" {args.fanout}, max_in_flight {args.in_flight}\n{os.cpu_count()} CPUs, load average"
        f" {min(loads):.1f}-{max(loads):.1f} (shared machine), {len(flat)} flat-out runs",
        fontsize="medium",
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.flows or args.bindings:
        if args.flows:
            print(flows_figure([int(n) for n in args.flows.split(",")]))
        if args.bindings:
            print(bindings_figure([int(n) for n in args.bindings.split(",")]))
        return 0
    if not sys.platform.startswith("linux"):
        print("bench_routing: Linux only (it reads /proc)", file=sys.stderr)
        return 2
    # With --processors, the same runs twice: without, then with the two operations.
    # --compare-fanout makes its own runs, alternated, instead.
    variants: list[tuple[str, list[dict[str, Any]] | None]] = (
        [("without processors", None)] if args.compare_fanout is None else []
    )
    if args.processors:
        label = "with a driver and 2 processors" if args.driver else "with 2 processors"
        variants.append((label, PROCESSORS))
    results: list[tuple[str, list[Figures]]] = []
    everything: list[Figures] = []

    def show(label: str, figures: Figures, spool_fs: str, run_args: argparse.Namespace) -> None:
        everything.append(figures)
        if args.json:
            document = {
                "parameters": vars(run_args) | {"cpus": os.cpu_count()},
                "variant": label,
                **asdict(figures),
            }
            print(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
        else:
            print(f"== {label}")
            subject = "Node-RED" if label.startswith("Node-RED") else "iotflow"
            print(report(run_args, figures, spool_fs, subject), flush=True)

    try:
        if args.compare_fanout is not None:
            k = args.compare_fanout
            pairs: list[tuple[Figures, Figures]] = []
            for run in range(args.runs):
                pair = []
                for fanout in (1, k):
                    these = argparse.Namespace(**(vars(args) | {"fanout": fanout}))
                    say(args, f"-- fanout {fanout}, run {run + 1} of {args.runs}")
                    figures, spool_fs = measure(these)
                    show(f"fanout {fanout}, run {run + 1}", figures, spool_fs, these)
                    pair.append(figures)
                pairs.append((pair[0], pair[1]))
            if not args.json:
                print(fanout_cost(k, pairs))
        for label, operations in variants:
            runs: list[Figures] = []
            for k in range(args.runs):
                say(args, f"-- {label}, run {k + 1} of {args.runs}")
                figures, spool_fs = measure(args, operations)
                show(f"{label}, run {k + 1}", figures, spool_fs, args)
                runs.append(figures)
            results.append((label, runs))
            if args.runs > 1 and not args.json:
                print(summary(label, runs), flush=True)
        node_red: Figures | None = None
        if args.node_red:
            with tempfile.TemporaryDirectory(prefix="iotflow-bench-node-red-") as root:
                say(args, f"installing node-red@{NODE_RED_VERSION} from npm into {root}")
                red = install_node_red(Path(root))
                node_red, spool_fs = measure(args, red=red)
                show("Node-RED (mqtt in -> http request, no spool)", node_red, "-", args)
        rows: list[tuple[float, Figures]] = []
        if args.sweep:
            flat = results[0][1]
            # Fractions of what the flat-out runs sustained, first publish to last delivery:
            # their steady rate is a burst once the ingest is done ("ingest first").
            sustained = median([f.end_to_end_per_second for f in flat])
            for fraction in args.load_fractions:
                rate = max(1.0, fraction * sustained)
                paced = argparse.Namespace(**(vars(args) | {"rate": rate}))
                say(args, f"-- offered {rate:,.0f}/s ({fraction:g} of {sustained:,.0f}/s)")
                figures, spool_fs = measure(paced)
                show(f"offered {rate:,.0f}/s", figures, spool_fs, paced)
                rows.append((rate, figures))
            if not args.json:
                print(sweep_table(rows))
            if args.plot:
                plot(args.plot, args, flat, rows, node_red)
                print(f"plot written to {args.plot}")
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench_routing: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"bench_routing: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.processors and not args.json:
        (_, plain_runs), (_, shaped_runs) = results
        plain = median([f.end_to_end_per_second for f in plain_runs])
        shaped = median([f.end_to_end_per_second for f in shaped_runs])
        what = "a driver and 2 processors" if args.driver else "2 processors"
        print(
            f"processors: {shaped:.0f} deliveries/s with {what}, {plain:.0f} without"
            f" ({shaped / plain:.2f}x; steady"
            f" {median([f.steady_per_second for f in shaped_runs]):.0f}"
            f" vs {median([f.steady_per_second for f in plain_runs]):.0f})"
        )
    # Node-RED is the point of comparison: what it loses is a figure, not a failed run.
    ok = all(f.missing == 0 and f.unexpected == 0 for f in everything if f is not node_red)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
