"""sd_notify against a datagram socket standing in for systemd: the unit tests drive the
Notifier directly; the end-to-end test runs `iotflow run` with NOTIFY_SOCKET and
WATCHDOG_USEC set, as systemd would start it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from iotflow.telemetry.systemd import READY_STATUS, Notifier
from support.clock import SteppedSleep
from support.daemon import DaemonProcess
from support.mosquitto import Mosquitto

MakeNotifier = Callable[..., Notifier]


@dataclass(frozen=True, slots=True)
class Notification:
    fields: dict[str, str]
    at: float  # time.monotonic() when it arrived

    def has(self, key: str, value: str = "1") -> bool:
        return self.fields.get(key) == value


def parse(datagram: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in datagram.decode().split("\n"):
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r} in {datagram!r}"
        fields[key] = value
    return fields


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET: a bound AF_UNIX datagram socket."""

    def __init__(self, address: str) -> None:
        self.address = address  # a path, or "\0name" for the abstract namespace
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)
        self.received: list[Notification] = []
        self._changed = asyncio.Condition()

    @property
    def env_value(self) -> str:
        """What systemd would put in NOTIFY_SOCKET."""
        return "@" + self.address[1:] if self.address.startswith("\0") else self.address

    def drain(self) -> list[dict[str, str]]:
        """Everything queued on the socket now, without waiting."""
        found = []
        while True:
            try:
                found.append(parse(self.sock.recv(4096)))
            except BlockingIOError:
                return found

    async def collect(self) -> None:
        """Receive until cancelled, so that arrival times are those of the datagrams."""
        loop = asyncio.get_running_loop()
        while True:
            datagram = await loop.sock_recv(self.sock, 4096)
            async with self._changed:
                self.received.append(Notification(parse(datagram), time.monotonic()))
                self._changed.notify_all()

    async def wait_for(
        self, predicate: Callable[[Notification], bool], *, start: int = 0, timeout: float = 30
    ) -> int:
        """Index of the first notification from `start` on that matches."""

        def first() -> int | None:
            for index in range(start, len(self.received)):
                if predicate(self.received[index]):
                    return index
            return None

        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: first() is not None)
        except TimeoutError:
            raise AssertionError(
                f"no matching notification in {timeout}s; got {self.describe(start)}"
            ) from None
        found = first()
        assert found is not None
        return found

    def lifecycle(self, start: int = 0) -> list[dict[str, str]]:
        """What was received from `start` on, watchdog pings left out."""
        return [n.fields for n in self.received[start:] if "WATCHDOG" not in n.fields]

    def describe(self, start: int = 0) -> str:
        return repr([n.fields for n in self.received[start:]])

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fake_systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    # sun_path holds 108 bytes: a short name under tmp_path stays well inside it.
    fake = FakeSystemd(str(tmp_path / "notify"))
    yield fake
    fake.close()


@pytest.fixture
def abstract_systemd() -> Iterator[FakeSystemd]:
    fake = FakeSystemd(f"\0iotflow-test-{uuid.uuid4().hex}")
    yield fake
    fake.close()


@pytest.fixture
def make_notifier() -> Iterator[MakeNotifier]:
    """Notifiers on a given environment, closed at the end (their socket is real)."""
    made: list[Notifier] = []

    def make(environ: dict[str, str], **options: Any) -> Notifier:
        made.append(Notifier(environ, **options))
        return made[-1]

    yield make
    for notifier in made:
        notifier.close()


# -- the Notifier on its own ---------------------------------------------------------------


async def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.reloading() is False
    assert notifier.stopping() is False
    assert notifier.status("anything") is False
    assert notifier.watchdog() is False
    # No socket, no pings: the watchdog would have nowhere to go.
    assert notifier.watchdog_interval() is None
    await asyncio.wait_for(notifier.run_watchdog(), timeout=1)  # returns at once
    with notifier.reload_scope():
        pass
    assert not notifier.announced


def test_ready_status_stopping_on_a_path_socket(
    fake_systemd: FakeSystemd, make_notifier: MakeNotifier
) -> None:
    notifier = make_notifier({"NOTIFY_SOCKET": fake_systemd.env_value})
    assert notifier.enabled
    assert notifier.ready(status="Consuming 3 subscriptions")
    assert notifier.status("Draining")
    assert notifier.stopping()
    assert notifier.watchdog()
    assert fake_systemd.drain() == [
        {"READY": "1", "STATUS": "Consuming 3 subscriptions"},
        {"STATUS": "Draining"},
        {"STOPPING": "1", "STATUS": "Stopping: draining in-flight deliveries"},
        {"WATCHDOG": "1"},
    ]


def test_abstract_socket_name(abstract_systemd: FakeSystemd, make_notifier: MakeNotifier) -> None:
    assert abstract_systemd.env_value.startswith("@")
    notifier = make_notifier({"NOTIFY_SOCKET": abstract_systemd.env_value})
    assert notifier.ready()
    assert abstract_systemd.drain() == [{"READY": "1", "STATUS": READY_STATUS}]


def test_reloading_carries_the_monotonic_clock(
    fake_systemd: FakeSystemd, make_notifier: MakeNotifier
) -> None:
    notifier = make_notifier({"NOTIFY_SOCKET": fake_systemd.env_value})
    before = monotonic_usec()
    assert notifier.reloading()
    after = monotonic_usec()
    (message,) = fake_systemd.drain()
    assert message["RELOADING"] == "1"
    # CLOCK_MONOTONIC in microseconds, as sd_notify(3) asks: not time.monotonic() (which
    # may be another clock) and not seconds.
    assert before <= int(message["MONOTONIC_USEC"]) <= after


def test_reload_scope_brackets_a_reload_even_a_failed_one(
    fake_systemd: FakeSystemd, make_notifier: MakeNotifier
) -> None:
    notifier = make_notifier({"NOTIFY_SOCKET": fake_systemd.env_value})
    # Before the first READY=1 systemd is still starting us: a reload then says nothing,
    # least of all READY=1.
    with notifier.reload_scope():
        pass
    assert fake_systemd.drain() == []

    notifier.ready(status="Consuming uplinks")
    fake_systemd.drain()
    with notifier.reload_scope():
        pass
    reloading, ready = fake_systemd.drain()
    assert reloading["RELOADING"] == "1"
    assert "MONOTONIC_USEC" in reloading
    assert ready == {"READY": "1", "STATUS": "Consuming uplinks"}

    # A reload that raises still ends with READY=1: the running config is kept.
    with pytest.raises(RuntimeError), notifier.reload_scope():
        raise RuntimeError("the new config did not apply")
    assert [m.get("RELOADING", m.get("READY")) for m in fake_systemd.drain()] == ["1", "1"]


def test_watchdog_interval_is_half_of_watchdog_usec(fake_systemd: FakeSystemd) -> None:
    def interval(**env: str) -> float | None:
        return Notifier({"NOTIFY_SOCKET": fake_systemd.env_value, **env}).watchdog_interval()

    assert interval() is None
    assert interval(WATCHDOG_USEC="30000000") == 15.0
    assert interval(WATCHDOG_USEC="30000000", WATCHDOG_PID=str(os.getpid())) == 15.0
    # Meant for another process (we inherited the environment): not ours to ping.
    assert interval(WATCHDOG_USEC="30000000", WATCHDOG_PID=str(os.getpid() + 1)) is None
    assert interval(WATCHDOG_USEC="0") is None
    assert interval(WATCHDOG_USEC="soon") is None


async def test_run_watchdog_pings_at_its_interval(
    fake_systemd: FakeSystemd, make_notifier: MakeNotifier
) -> None:
    sleep = SteppedSleep()
    notifier = make_notifier(
        {"NOTIFY_SOCKET": fake_systemd.env_value, "WATCHDOG_USEC": "200000"}, sleep=sleep
    )
    assert notifier.watchdog_interval() == pytest.approx(0.1)
    task = asyncio.create_task(notifier.run_watchdog())
    try:
        await sleep.until(1)
        assert fake_systemd.drain() == [{"WATCHDOG": "1"}]  # one at once
        for interval in range(2, 12):
            await sleep.step()  # ... and one after each interval
            await sleep.until(interval)
            assert fake_systemd.drain() == [{"WATCHDOG": "1"}]
        assert sleep.waits == [pytest.approx(0.1)] * 11
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_blocked_event_loop_stops_the_pings(
    fake_systemd: FakeSystemd, make_notifier: MakeNotifier
) -> None:
    notifier = make_notifier({"NOTIFY_SOCKET": fake_systemd.env_value, "WATCHDOG_USEC": "100000"})
    task = asyncio.create_task(notifier.run_watchdog())
    # The first ping (real sleeps here: the pings must come from the real event loop).
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(10):
        first = await loop.sock_recv(fake_systemd.sock, 4096)
    assert parse(first) == {"WATCHDOG": "1"}, "the watchdog should be pinging"
    fake_systemd.drain()
    # The very hang the watchdog exists for: the loop stuck in a synchronous call (the
    # fault injected, not a wait for something). Ten intervals pass without a ping.
    time.sleep(0.5)  # noqa: ASYNC251
    assert fake_systemd.drain() == []
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_a_send_failure_is_logged_once_and_never_raises(
    tmp_path: Path, make_notifier: MakeNotifier
) -> None:
    notifier = make_notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    with capture_logs() as logs:
        assert notifier.ready() is False
        assert notifier.watchdog() is False
        assert notifier.stopping() is False
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert warnings[0]["event"] == "Cannot notify the service manager"
    assert "error" in warnings[0]


def test_a_manager_that_does_not_read_never_blocks_us(
    fake_systemd: FakeSystemd, make_notifier: MakeNotifier
) -> None:
    notifier = make_notifier({"NOTIFY_SOCKET": fake_systemd.env_value})
    started = time.monotonic()
    with capture_logs():
        results = [notifier.watchdog() for _ in range(2000)]
    # The receive queue fills up (net.unix.max_dgram_qlen): the rest are dropped at once
    # instead of stalling the event loop.
    assert results[0] is True
    assert False in results
    assert time.monotonic() - started < 5


def test_a_socket_we_cannot_speak_disables_notifications(
    make_notifier: MakeNotifier,
) -> None:
    with capture_logs() as logs:
        notifier = make_notifier({"NOTIFY_SOCKET": "vsock:2:9999", "WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval() is None
    assert notifier.ready() is False
    assert [e["event"] for e in logs] == ["NOTIFY_SOCKET is not a unix socket; not notifying"]


# -- the daemon under a fake systemd -------------------------------------------------------

WATCHDOG_USEC = 1_000_000  # WatchdogSec=1s: a ping every 0.5 s


@pytest.fixture
async def notify_daemon(
    tmp_path: Path, fake_systemd: FakeSystemd, fresh_mosquitto: Mosquitto
) -> AsyncIterator[tuple[DaemonProcess, FakeSystemd]]:
    daemon = DaemonProcess(
        tmp_path / "d",
        broker_url=fresh_mosquitto.url,
        env={"NOTIFY_SOCKET": fake_systemd.env_value, "WATCHDOG_USEC": str(WATCHDOG_USEC)},
    )
    collector = asyncio.create_task(fake_systemd.collect())
    yield daemon, fake_systemd
    collector.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await collector
    await daemon.close()


@pytest.mark.slow
async def test_the_daemon_speaks_sd_notify(
    notify_daemon: tuple[DaemonProcess, FakeSystemd], fresh_mosquitto: Mosquitto
) -> None:
    daemon, systemd = notify_daemon

    # READY=1 means consuming: with the broker down the daemon is up (the watchdog pings
    # come from its event loop) but not ready.
    fresh_mosquitto.stop()
    await daemon.start(wait=False)
    await daemon.wait_log(lambda e: e.get("event") == "API listening")
    try:
        await systemd.wait_for(lambda n: n.has("WATCHDOG"), timeout=10)
    except AssertionError:
        if not systemd.received:
            pytest.fail(
                "the daemon sent nothing on NOTIFY_SOCKET: is Daemon.run (iotflow/app.py)"
                " wired to iotflow.telemetry.systemd.Notifier?"
            )
        raise
    # Not ready while it cannot consume: shown once it has failed to reach the broker (said
    # once: repeated failures of the same kind are not logged again), not after a fixed sleep.
    await daemon.wait_log(lambda e: e.get("event") == "Broker unreachable")
    assert not any(n.has("READY") for n in systemd.received), systemd.describe()
    fresh_mosquitto.start()  # same port: the daemon's reconnect finds it
    ready = await systemd.wait_for(lambda n: n.has("READY"))
    assert systemd.received[ready].fields == {"READY": "1", "STATUS": READY_STATUS}
    await daemon.wait_log(lambda e: e.get("event") == "Consuming uplinks", timeout=10)
    assert [m for m in systemd.lifecycle() if "READY" in m] == [
        {"READY": "1", "STATUS": READY_STATUS}
    ]

    # WATCHDOG=1 every WATCHDOG_USEC / 2 from the event loop: about 6 in 3 s.
    window_start = len(systemd.received)
    await asyncio.sleep(3)
    pings = [n for n in systemd.received[window_start:] if n.has("WATCHDOG")]
    assert 3 <= len(pings) <= 10, systemd.describe(window_start)

    # SIGHUP: RELOADING=1 (with the monotonic clock), then READY=1.
    start = len(systemd.received)
    before = monotonic_usec()
    await daemon.signal(signal.SIGHUP)
    reloading = await systemd.wait_for(lambda n: n.has("RELOADING"), start=start)
    await systemd.wait_for(lambda n: n.has("READY"), start=reloading)
    after = monotonic_usec()
    first, second = systemd.lifecycle(start)
    assert first["RELOADING"] == "1"
    assert before <= int(first["MONOTONIC_USEC"]) <= after
    assert second["READY"] == "1"
    await daemon.wait_log(lambda e: e.get("event") == "Config reloaded")

    # A config that does not validate: refused, and still RELOADING=1 then READY=1.
    daemon.write_config([], text="[mqtt\nthis is not TOML\n")
    start = len(systemd.received)
    await daemon.signal(signal.SIGHUP)
    reloading = await systemd.wait_for(lambda n: n.has("RELOADING"), start=start)
    await systemd.wait_for(lambda n: n.has("READY"), start=reloading)
    assert [sorted(m) for m in systemd.lifecycle(start)] == [
        ["MONOTONIC_USEC", "RELOADING", "STATUS"],
        ["READY", "STATUS"],
    ]
    await daemon.wait_log(lambda e: e.get("event") == "Reload refused; keeping the running config")

    # SIGTERM: STOPPING=1, then a clean exit.
    start = len(systemd.received)
    assert await daemon.stop() == 0
    await systemd.wait_for(lambda n: n.has("STOPPING"), start=start, timeout=5)
    assert not any(n.has("READY") for n in systemd.received[start:])
