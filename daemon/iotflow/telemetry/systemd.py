"""The service manager's notifications (sd_notify), written against the socket protocol.

systemd passes `NOTIFY_SOCKET` (a path, or `@name` for an abstract socket) to a
`Type=notify` service and reads newline-separated `KEY=VALUE` datagrams from it: READY=1
once we are up, RELOADING=1 … READY=1 around a reload, STOPPING=1 on the way out, and
WATCHDOG=1 keep-alives when `WatchdogSec=` is set (`WATCHDOG_USEC`). The protocol is a
single sendto(), so libsystemd (or a Python binding of it) is not worth a dependency.

Everything here is a no-op when `NOTIFY_SOCKET` is unset (a shell, a container, the
tests), and nothing here ever raises: a failed notification must not stop the daemon.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager

from iotflow.telemetry.logging import get_logger

log = get_logger("iotflow.telemetry")

READY_STATUS = "Consuming uplinks"


def _address(value: str) -> str | None:
    """The socket address of `NOTIFY_SOCKET`, or None when we cannot use it."""
    if value.startswith("@"):
        # Linux abstract namespace: a leading NUL instead of the '@' systemd writes.
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # empty, or a transport we do not speak (vsock: in newer systemd)


def _watchdog_seconds(environ: Mapping[str, str]) -> float | None:
    """Half of `WATCHDOG_USEC` in seconds when the watchdog is meant for this process.

    sd_watchdog_enabled(3): the manager may set `WATCHDOG_PID` so that a child that
    inherited the environment does not ping on its parent's behalf.
    """
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid is not None and pid.strip() != str(os.getpid()):
        return None
    # Pinging at half the timeout, as sd_watchdog_enabled(3) advises, leaves a whole
    # interval of slack for a busy loop before systemd gives up on us.
    return usec / 2 / 1_000_000


class Notifier:
    """Notifications to the service manager; a no-op without `NOTIFY_SOCKET`."""

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        env = os.environ if environ is None else environ
        self._sleep = sleep  # between watchdog pings; a test gives one it steps
        raw = env.get("NOTIFY_SOCKET", "")
        self._address = _address(raw)
        if raw and self._address is None:
            log.warning("NOTIFY_SOCKET is not a unix socket; not notifying", notify_socket=raw)
        self._watchdog = _watchdog_seconds(env) if self._address is not None else None
        self._socket: socket.socket | None = None
        self._failing = False  # warn once per run of failures, not on every watchdog ping
        self.announced = False  # READY=1 sent: systemd considers the start complete
        self._ready_status = READY_STATUS

    @property
    def enabled(self) -> bool:
        return self._address is not None

    # -- the messages ----------------------------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        """READY=1: started (or reloaded), with an optional STATUS= line for systemctl."""
        if status is not None:
            self._ready_status = status
        sent = self.notify("READY=1", f"STATUS={self._ready_status}")
        self.announced = self.announced or self.enabled
        return sent

    def reloading(self) -> bool:
        """RELOADING=1, with the CLOCK_MONOTONIC timestamp that systemd ≥ 253 requires to
        tell this reload from an earlier one (sd_notify(3))."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", "STATUS=Reloading the config", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=Stopping: draining in-flight deliveries")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    @contextmanager
    def reload_scope(self) -> Iterator[None]:
        """RELOADING=1 before the block and READY=1 after it, whether it succeeded or not:
        a reload that fails keeps the running config, so the service is as ready as before.

        Before the first READY=1, nothing is sent: systemd is still waiting for the start to
        complete, and a READY=1 here would announce a daemon that is not consuming yet.
        """
        announced = self.announced
        if announced:
            self.reloading()
        try:
            yield
        finally:
            if announced:
                self.ready()

    # -- the watchdog ----------------------------------------------------------------------

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings, or None when no watchdog is asked of us."""
        return self._watchdog

    async def run_watchdog(self) -> None:
        """Ping at `watchdog_interval()` until cancelled; return at once without a watchdog.

        The pings come from the event loop on purpose: a loop that is blocked (a
        synchronous call that hangs) stops them, and systemd then restarts the daemon.
        """
        interval = self.watchdog_interval()
        if interval is None:
            return
        while True:
            self.watchdog()
            await self._sleep(interval)

    # -- the socket ------------------------------------------------------------------------

    def notify(self, *fields: str) -> bool:
        """Send one datagram of `KEY=VALUE` lines; True when it left, never raises."""
        if self._address is None:
            return False
        message = "\n".join(fields).encode("utf-8", "replace")
        try:
            if self._socket is None:
                # Non-blocking: a manager that does not read its socket must not stall the
                # event loop; the datagram is then dropped (EAGAIN) and we say so once.
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._socket = sock
            self._socket.sendto(message, self._address)
        except OSError as exc:
            if not self._failing:
                self._failing = True
                log.warning(
                    "Cannot notify the service manager",
                    error=str(exc),
                    message=fields[0],
                    notify_socket=self._shown_address(),
                )
            return False
        if self._failing:
            self._failing = False
            log.info("Service manager notifications work again")
        return True

    def _shown_address(self) -> str:
        assert self._address is not None
        return "@" + self._address[1:] if self._address.startswith("\0") else self._address

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
