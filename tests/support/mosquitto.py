"""A real Mosquitto broker, started by the test suite on a free port.

Tests never use a broker that happens to run on the machine: its config, its persistence
and its clients are not ours. Each `Mosquitto` owns a temporary directory with its
config, persistence file and log, so a test can restart it and read its log.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .ports import free_port
from .server import ServerProcess

HOST = "127.0.0.1"

# Mosquitto writes this line once its listeners are bound; before it, a TCP connect could
# reach another process that took the port in the meantime.
_READY_MARKER = " running"
_PORT_TAKEN_MARKERS = ("Address already in use", "Only one usage of each socket address")
# A fresh port is tried this many times when another process takes ours between
# `free_port()` and mosquitto's bind. A restart keeps its port, so it does not retry.
_START_ATTEMPTS = 5
_POLL_INTERVAL = 0.02


class BrokerError(RuntimeError):
    """The broker did not start or stop as asked; the message carries its log."""


class _PortTakenError(BrokerError):
    pass


def _find_binary() -> str:
    # /usr/sbin is not on a non-root PATH on Debian.
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise BrokerError("mosquitto is not installed (looked on PATH and in /usr/sbin)")
    return found


def _broker_user() -> pwd.struct_passwd | None:
    """The account mosquitto drops to when started as root, or None when it stays root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("mosquitto")
    except KeyError:
        return None


class Mosquitto(ServerProcess):
    """A mosquitto process in its own temporary directory.

    Synchronous on purpose: starting and stopping a process does not need the event
    loop, and session fixtures can then use it without one. The port is chosen on the
    first `start()` and kept by `restart()`, so clients reconnect to the same URL.
    """

    def __init__(
        self,
        *,
        max_inflight_messages: int = 1000,
        autosave_interval: int = 1,
        extra_config: str = "",
        start_timeout: float = 30.0,
        stop_timeout: float = 30.0,
    ) -> None:
        self.max_inflight_messages = max_inflight_messages
        self.autosave_interval = autosave_interval
        self.extra_config = extra_config
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.binary = _find_binary()
        # Created now, not in start(), so a test can put files that `extra_config`
        # refers to (TLS certificates) here before the broker starts.
        self.directory = Path(tempfile.mkdtemp(prefix="iotflow-mosquitto-"))
        self.persistence_dir = self.directory / "data"
        self.persistence_dir.mkdir()
        self.config_path = self.directory / "mosquitto.conf"
        self.log_path = self.directory / "mosquitto.log"
        # Whatever mosquitto prints before its log file is open (config errors).
        self.output_path = self.directory / "mosquitto.out"
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        if self._port is None:
            raise BrokerError("the broker has no port before its first start()")
        return self._port

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running and self._process is not None else None

    def start(self) -> None:
        if self.running:
            raise BrokerError(f"the broker is already running on {self.url}")
        attempts = 1 if self._port is not None else _START_ATTEMPTS
        for attempt in range(1, attempts + 1):
            port = self._port if self._port is not None else free_port()
            try:
                self._start_on(port)
            except _PortTakenError:
                if attempt == attempts:
                    raise
                continue
            self._port = port
            return

    def stop(self) -> None:
        """SIGTERM and wait: mosquitto writes its persistence file on the way out."""
        process = self._process
        if process is None:
            return
        self._process = None
        if process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise BrokerError(
                f"mosquitto did not exit within {self.stop_timeout}s of SIGTERM and was"
                f" killed; its persistence may be incomplete\n{self._log_tail()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL: a crash. Only what the last autosave wrote survives."""
        process = self._process
        if process is None:
            return
        self._process = None
        if process.poll() is None:
            process.kill()
        process.wait()

    def restart(self) -> None:
        """Stop cleanly and start again on the same port with the same persistence."""
        self.stop()
        self.start()

    def log_text(self) -> str:
        parts = []
        for path in (self.output_path, self.log_path):
            if path.exists():
                parts.append(path.read_text(encoding="utf-8", errors="replace"))
        return "".join(parts)

    def __repr__(self) -> str:
        where = self.url if self._port is not None else "not started"
        return f"<Mosquitto {where} running={self.running} dir={self.directory}>"

    def _config(self, port: int) -> str:
        user = _broker_user()
        # As root mosquitto switches to `user`; without a `mosquitto` account it would
        # fall back to `nobody`, which cannot enter our private temp directory.
        user_line = "user root\n" if os.geteuid() == 0 and user is None else ""
        return (
            f"{user_line}"
            f"listener {port} {HOST}\n"
            "allow_anonymous true\n"
            "persistence true\n"
            # The trailing slash matters: mosquitto concatenates the file name to it.
            f"persistence_location {self.persistence_dir}/\n"
            "persistence_file mosquitto.db\n"
            f"autosave_interval {self.autosave_interval}\n"
            # 0 is unbounded: tests queue thousands of QoS 1 messages for an offline
            # persistent session, and the default (1000) would drop the rest silently.
            "max_queued_messages 0\n"
            f"max_inflight_messages {self.max_inflight_messages}\n"
            f"log_dest file {self.log_path}\n"
            "log_type error\n"
            "log_type warning\n"
            "log_type notice\n"
            "log_type information\n"
            "log_type subscribe\n"
            "log_type unsubscribe\n"
            "connection_messages true\n"
            "log_timestamp true\n"
            "log_timestamp_format %Y-%m-%dT%H:%M:%S\n"
            f"{self.extra_config}\n"
        )

    def _give_directory_to_broker(self) -> None:
        # As root, mosquitto opens its log and persistence file after dropping to its
        # own user, so that user must own them. Redone on every start: a test may have
        # added files (certificates) since.
        user = _broker_user()
        if user is None:
            return
        self.log_path.touch()
        for root, dirs, files in os.walk(self.directory):
            os.chown(root, user.pw_uid, user.pw_gid)
            for name in dirs + files:
                os.chown(os.path.join(root, name), user.pw_uid, user.pw_gid)

    def _start_on(self, port: int) -> None:
        self.config_path.write_text(self._config(port), encoding="utf-8")
        self._give_directory_to_broker()
        # The log file is appended to across restarts; only lines after this offset
        # belong to this start.
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        output_offset = self.output_path.stat().st_size if self.output_path.exists() else 0
        with self.output_path.open("ab") as output:
            process = subprocess.Popen(
                [self.binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )
        try:
            self._wait_ready(process, port, log_offset, output_offset)
        except BaseException:
            if process.poll() is None:
                process.kill()
            process.wait()
            raise
        self._process = process

    def _wait_ready(
        self, process: subprocess.Popen[bytes], port: int, log_offset: int, output_offset: int
    ) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            exited = process.poll() is not None
            text = self._read_from(self.log_path, log_offset) + self._read_from(
                self.output_path, output_offset
            )
            if exited:
                error = (
                    _PortTakenError if any(m in text for m in _PORT_TAKEN_MARKERS) else BrokerError
                )
                raise error(
                    f"mosquitto exited with status {process.returncode} before listening"
                    f" on {HOST}:{port}\n{text}"
                )
            if _READY_MARKER in text and _accepts_connections(port):
                return
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"mosquitto did not listen on {HOST}:{port} within"
                    f" {self.start_timeout}s\n{text}"
                )
            # A bounded poll for an event another process produces (its log line).
            time.sleep(_POLL_INTERVAL)

    @staticmethod
    def _read_from(path: Path, offset: int) -> str:
        try:
            with path.open("rb") as file:
                file.seek(offset)
                return file.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False
