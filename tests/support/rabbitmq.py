"""A real RabbitMQ node, started by the test suite: an MQTT 3.1.1-only broker, and AMQP.

RabbitMQ 3.x's MQTT plugin speaks MQTT 3.1 and 3.1.1 only (QoS 0 and 1, persistent
sessions with clean_session=false): the suite's broker for what Mosquitto cannot show,
since Mosquitto accepts every protocol version. Its AMQP listener (`amqp_port`,
`amqp_url`) is the broker of the AMQP connector's tests.

The node is private: its own name, Erlang cookie (HOME), epmd (ERL_EPMD_PORT), ports,
database and log directories under a temporary directory. A RabbitMQ that runs on the
machine (5672, 4369, its cookie in /var/lib/rabbitmq) is never used nor disturbed. It
takes about fifteen seconds to start, so the suite starts it once.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from .ports import free_port
from .server import ServerProcess
from .tls import Pki

HOST = "127.0.0.1"
# The Debian wrapper in /usr/sbin switches to the `rabbitmq` account and its HOME (the
# system node's cookie); the script under it runs the node as whoever calls it.
_SERVER_SCRIPT = "/usr/lib/rabbitmq/bin/rabbitmq-server"
_READY_MARKER = "Server startup complete"
_PORT_TAKEN_MARKERS = ("eaddrinuse", "Address already in use")
_START_ATTEMPTS = 3
_POLL_INTERVAL = 0.1


class RabbitError(RuntimeError):
    """The node did not start or stop as asked; the message carries its log."""


class _PortTakenError(RabbitError):
    pass


def _find_epmd() -> str | None:
    found = shutil.which("epmd")
    if found is not None:
        return found
    candidates = sorted(glob.glob("/usr/lib/erlang/erts-*/bin/epmd"))
    return candidates[-1] if candidates else None


class RabbitMQ(ServerProcess):
    """One RabbitMQ node with the MQTT plugin, listening on 127.0.0.1 only.

    Synchronous, as the other servers of the suite. Ports are chosen at the first start.
    Anonymous MQTT clients are the node's user `iotflow`; AMQP clients log in as it.
    """

    def __init__(
        self,
        *,
        prefetch: int = 10,
        start_timeout: float = 180.0,
        stop_timeout: float = 60.0,
        tls: Pki | None = None,
    ) -> None:
        epmd = _find_epmd()
        if not os.path.exists(_SERVER_SCRIPT) or epmd is None:
            pytest.skip("rabbitmq-server is not installed (the MQTT 3.1.1-only broker)")
        self.epmd = epmd
        # RabbitMQ's own default: how many unacknowledged QoS 1 messages it sends a client.
        self.prefetch = prefetch
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.username = "iotflow"
        self.password = "iotflow-test"
        self.directory = Path(tempfile.mkdtemp(prefix="iotflow-rabbitmq-"))
        self.home = self.directory / "home"
        self.home.mkdir()
        self.log_dir = self.directory / "log"
        self.output_path = self.directory / "rabbitmq.out"
        self.nodename = f"iotflow-test-{os.getpid()}-{secrets.token_hex(3)}@localhost"
        self.mqtt_port = 0
        self.amqp_port = 0
        # AMQP over TLS with `tls`'s server certificate; client certificates are checked
        # when presented (signed by its CA), not required.
        self.tls = tls
        self.amqps_port = 0
        self._dist_port = 0
        self._epmd_port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._epmd_process: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        """The MQTT port."""
        if not self.mqtt_port:
            raise RabbitError("the node has no port before its first start()")
        return self.mqtt_port

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.port}"

    @property
    def amqp_url(self) -> str:
        return f"amqp://{self.username}:{self.password}@{HOST}:{self.amqp_port}/"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self.running:
            raise RabbitError(f"the node is already running on {self.url}")
        attempts = 1 if self.mqtt_port else _START_ATTEMPTS
        for attempt in range(1, attempts + 1):
            if not self.mqtt_port or attempt > 1:
                self._pick_ports()
            try:
                self._start_once()
            except _PortTakenError:
                self.stop()
                if attempt == attempts:
                    raise
                continue
            return

    def stop(self) -> None:
        """SIGTERM: the script under the wrapper stops the node cleanly, then epmd."""
        process, self._process = self._process, None
        try:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                    raise RabbitError(
                        f"RabbitMQ did not stop within {self.stop_timeout}s and was killed"
                    ) from None
        finally:
            epmd, self._epmd_process = self._epmd_process, None
            if epmd is not None and epmd.poll() is None:
                epmd.kill()
                epmd.wait()

    def log_text(self) -> str:
        parts = []
        for path in [self.output_path, *sorted(self.log_dir.glob("*.log"))]:
            if path.exists():
                parts.append(path.read_text(encoding="utf-8", errors="replace"))
        return "".join(parts)

    def __repr__(self) -> str:
        where = self.url if self.mqtt_port else "not started"
        return f"<RabbitMQ {self.nodename} {where} running={self.running}>"

    # -- internals ---------------------------------------------------------------------

    def _pick_ports(self) -> None:
        ports: set[int] = set()
        while len(ports) < 5:
            ports.add(free_port())
        self.mqtt_port, self.amqp_port, self._dist_port, self._epmd_port, self.amqps_port = sorted(
            ports
        )

    def _config(self) -> str:
        return self._tls_config() + (
            f"listeners.tcp.default = {HOST}:{self.amqp_port}\n"
            f"mqtt.listeners.tcp.default = {HOST}:{self.mqtt_port}\n"
            "mqtt.allow_anonymous = true\n"
            f"mqtt.default_user = {self.username}\n"
            f"mqtt.default_pass = {self.password}\n"
            f"mqtt.prefetch = {self.prefetch}\n"
            f"default_user = {self.username}\n"
            f"default_pass = {self.password}\n"
            "default_permissions.configure = .*\n"
            "default_permissions.read = .*\n"
            "default_permissions.write = .*\n"
            # A shared machine may have little free disk; the default alarm (50 MB) would
            # block publishers in the middle of a test.
            "disk_free_limit.absolute = 1MB\n"
            "log.console = false\n"
            "log.file.level = info\n"
        )

    def _tls_config(self) -> str:
        if self.tls is None:
            return ""
        directory = self.directory / "tls"
        directory.mkdir(exist_ok=True)
        ca, cert, key = self.tls.write_broker_files(directory)
        return (
            f"listeners.ssl.default = {HOST}:{self.amqps_port}\n"
            f"ssl_options.cacertfile = {ca}\n"
            f"ssl_options.certfile = {cert}\n"
            f"ssl_options.keyfile = {key}\n"
            "ssl_options.verify = verify_peer\n"
            "ssl_options.fail_if_no_peer_cert = false\n"
        )

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            {
                "HOME": str(self.home),  # the Erlang cookie: ours, not the system node's
                "ERL_EPMD_PORT": str(self._epmd_port),
                "RABBITMQ_NODENAME": self.nodename,
                "RABBITMQ_NODE_IP_ADDRESS": HOST,
                "RABBITMQ_NODE_PORT": str(self.amqp_port),
                "RABBITMQ_DIST_PORT": str(self._dist_port),
                "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.log_dir),
                "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbitmq.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
                "RABBITMQ_PID_FILE": str(self.directory / "rabbitmq.pid"),
                # No rabbitmq-env.conf of the system's node.
                "RABBITMQ_CONF_ENV_FILE": str(self.directory / "rabbitmq-env.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.directory / "advanced.config"),
            }
        )
        return env

    def _start_once(self) -> None:
        (self.directory / "rabbitmq.conf").write_text(self._config(), encoding="utf-8")
        (self.directory / "enabled_plugins").write_text("[rabbitmq_mqtt].\n", encoding="utf-8")
        (self.directory / "rabbitmq-env.conf").write_text("", encoding="utf-8")
        self.log_dir.mkdir(exist_ok=True)
        env = self._environment()
        began = time.monotonic()
        output = self.output_path.open("ab")
        with output:
            # Our own epmd, in the foreground, so that we own its pid and stop it.
            self._epmd_process = subprocess.Popen(
                [self.epmd, "-port", str(self._epmd_port), "-address", HOST],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            process = subprocess.Popen(
                [_SERVER_SCRIPT],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                env=env,
                start_new_session=True,
            )
        self._process = process
        self._wait_ready(process)
        self.start_seconds = time.monotonic() - began

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            text = self.log_text()
            if process.poll() is not None:
                error = (
                    _PortTakenError if any(m in text for m in _PORT_TAKEN_MARKERS) else RabbitError
                )
                raise error(f"RabbitMQ exited with status {process.returncode}\n{text[-4000:]}")
            if (
                _READY_MARKER in text
                and _accepts_connections(self.mqtt_port)
                and _accepts_connections(self.amqp_port)
                and (self.tls is None or _accepts_connections(self.amqps_port))
            ):
                return
            if time.monotonic() > deadline:
                raise RabbitError(
                    f"RabbitMQ did not start within {self.start_timeout}s\n{text[-4000:]}"
                )
            # A bounded poll for an event of another process (its log line).
            time.sleep(_POLL_INTERVAL)


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False
