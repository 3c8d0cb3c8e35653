"""`actility-mqtt-iot`: one persistent MQTT session per connection, a publish per uplink.

The session lives in a background task that connects, keeps the connection, and reconnects
after a loss with a backoff capped by the connection's `reconnectStrategy`. `send()` waits
(within the delivery timeout) for the session, publishes with the configured QoS and
returns once the broker acknowledged the message (PUBACK for QoS 1): only then does the
worker count the delivery as delivered. Retries, expiry, order and the circuit stay in
delivery/; this module only says what went wrong, through the type of its exception:

- a CONNACK refusing our credentials, or a TLS handshake in which one side refuses the
  other's certificate: AuthenticationSinkError (state AUTHENTICATION_FAILED);
- anything else (broker down, connection lost before the PUBACK, timeout):
  RetryableSinkError;
- a topic that renders to something MQTT cannot publish to: PermanentSinkError.

The session opens at the connection's first delivery and is kept from then on, through
reconnects, until the sink closes. Not at start(): a connection that has nothing to send
holds no session at a broker and makes no connection attempts (a fleet of idle
connections, a connection created with a wrong host, a fuzzed API). Downlinks lose little
by it: a device must have spoken before it can be sent one (a class A device listens only
after an uplink anyway), and once a session has existed the broker keeps what the cloud
sends for us while none is open, until it opens again at the connection's next delivery.

Reconnect attempts while deliveries wait are driven by the deliveries themselves (each
send wakes the session at once): the worker's backoff and circuit already space them, and
a second backoff here would only delay recovery. The session's own backoff spaces the
attempts made when nothing is being sent, which keep downlinks flowing.

MQTT 3.1.1, supported by every broker and cloud we target. With downlinks enabled the
session is persistent (clean session off, a fixed client id): downlinks published while
we were away are kept by the broker and delivered when we are back. Without downlinks the
session is clean, so the broker keeps nothing for us.

The module also holds what the AWS IoT sink (sinks/aws.py) shares: endpoints, TLS from
PEM text, the publish pacer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import random
import re
import socket
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

from iotflow.config.types import secret_value
from iotflow.connectors.common import PROBE_BACKOFF_CAP_SECONDS, CommonConfig
from iotflow.connectors.mqtt import MqttConfig
from iotflow.downlinks import DownlinkRejected, parse_downlink
from iotflow.errors import (
    AuthenticationSinkError,
    PermanentSinkError,
    RetryableSinkError,
    SinkError,
)
from iotflow.formats import Template, render_body
from iotflow.sinks.base import SinkContext
from iotflow.sources.ack import ManualAck
from iotflow.spool import Delivery
from iotflow.telemetry.logging import get_logger

log = get_logger("iotflow.sink.mqtt")

# The first reconnect delay; it doubles after each failure up to the reconnectStrategy cap.
RECONNECT_INITIAL_SECONDS = 1.0
# A session that lasted this long was a real one: the next loss starts the backoff afresh.
# A shorter one (a broker that accepts and drops us at once) keeps backing off.
STABLE_SESSION_SECONDS = 10.0
KEEPALIVE_SECONDS = 60
WEBSOCKET_PATH = "/mqtt"

# CONNACK reason codes that mean "your credentials": MQTT 5 Bad user name or password,
# Not authorized, Bad authentication method (paho reports 3.1.1's return codes 4 and 5 as
# the first two); 4 and 5 themselves in case a raw 3.1.1 code comes through.
_AUTH_REASON_CODES = {0x86, 0x87, 0x8C}
_AUTH_RETURN_CODES = {4, 5}
# OpenSSL reasons (`ssl.SSLError.reason`, also inside its text) of a handshake in which one
# side refused the other's certificate: ours (the alerts the broker sends) or theirs
# (our verification). A bare handshake_failure is left out: it also means "no common
# cipher", which no credential fixes.
_TLS_AUTH_REASONS = (
    "CERTIFICATE_VERIFY_FAILED",
    "ALERT_BAD_CERTIFICATE",
    "ALERT_UNKNOWN_CA",
    "ALERT_CERTIFICATE_REQUIRED",
    "ALERT_CERTIFICATE_UNKNOWN",
    "ALERT_CERTIFICATE_REVOKED",
    "ALERT_CERTIFICATE_EXPIRED",
    "ALERT_UNSUPPORTED_CERTIFICATE",
    "ALERT_ACCESS_DENIED",
)


# -- endpoints -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a session connects. Its text form (for logs) never carries credentials."""

    host: str
    port: int
    tls: bool
    websockets: bool = False
    path: str = WEBSOCKET_PATH

    def __str__(self) -> str:
        scheme = (
            ("wss" if self.tls else "ws") if self.websockets else "mqtts" if self.tls else "mqtt"
        )
        host = f"[{self.host}]" if ":" in self.host else self.host
        suffix = self.path if self.websockets else ""
        return f"{scheme}://{host}:{self.port}{suffix}"


def split_host_port(text: str, default_port: int) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]` or `[v6]:port` → (host, port). ValueError when malformed."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"malformed host {text!r}")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""  # a name, an IPv4 address, or a bare IPv6 address
    if not host:
        raise ValueError(f"no host in {text!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"malformed port in {text!r}")
    return host, int(port_text)


def mqtt_endpoint(config: MqttConfig) -> Endpoint:
    """The broker of an `actility-mqtt-iot` connection: `hostName` and `protocol`."""
    tls = config.protocol in ("SSL", "WSS")
    websockets = config.protocol == "WSS"
    default = 443 if websockets else 8883 if tls else 1883
    host, port = split_host_port(config.hostName, default)
    return Endpoint(host, port, tls=tls, websockets=websockets)


def default_client_id(connection_id: str) -> str:
    """A client id that is the same at every start (so a persistent session is found again)
    and differs between the instances of a scale-out (a broker drops the older of two
    connections that share an id, so two instances with one id would take turns)."""
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
    return f"iotflow-{connection_id}-{host}"


# -- TLS from PEM text -----------------------------------------------------------------

_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)


def normalize_pem(text: str) -> str:
    """PEM blocks as OpenSSL reads them, whatever a JSON or TOML round trip did to them.

    Certificates pasted into a JSON field often lose their line breaks (one long line, or
    spaces instead of newlines); OpenSSL needs base64 lines. Text that has no PEM block is
    returned as it is, for OpenSSL to refuse with its own message.
    """
    blocks = []
    for label, body in _PEM_BLOCK.findall(text.replace("\\n", "\n")):
        if ":" in body:  # encrypted-key headers (Proc-Type, DEK-Info): keep the layout
            blocks.append(f"-----BEGIN {label}-----{body}-----END {label}-----\n")
            continue
        data = "".join(body.split())
        lines = "\n".join(data[i : i + 64] for i in range(0, len(data), 64))
        blocks.append(f"-----BEGIN {label}-----\n{lines}\n-----END {label}-----\n")
    return "".join(blocks) if blocks else text


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """What a TLS session is made from. Secret: never logged (`repr=False` throughout)."""

    trusted_ca: str | None = field(default=None, repr=False)  # PEM; None: `default_roots`
    certificate: str | None = field(default=None, repr=False)  # PEM, with its chain
    private_key: str | None = field(default=None, repr=False)  # PEM
    default_roots: str | None = field(default=None, repr=False)  # None: the system store
    alpn: tuple[str, ...] = ()


def tls_context(material: TlsMaterial) -> ssl.SSLContext:
    """An SSLContext that verifies the broker and presents our certificate, if any.

    `load_cert_chain` reads files only, so the certificate and key are written to a private
    directory (0700, files 0600), loaded, and removed at once. Raises ssl.SSLError or
    ValueError on material OpenSSL cannot use.
    """
    roots = material.trusted_ca or material.default_roots
    context = ssl.create_default_context(cadata=normalize_pem(roots) if roots else None)
    context.sslsocket_class = _HandshakeClosingSocket
    if material.alpn:
        context.set_alpn_protocols(list(material.alpn))
    if (material.certificate is None) != (material.private_key is None):
        missing = "privateKey" if material.private_key is None else "certificate"
        raise ValueError(
            f"a client certificate needs both certificate and privateKey: no {missing}"
        )
    if material.certificate is not None and material.private_key is not None:
        with tempfile.TemporaryDirectory(prefix="iotflow-tls-") as directory:
            certfile = _write_private(Path(directory) / "certificate.pem", material.certificate)
            keyfile = _write_private(Path(directory) / "key.pem", material.private_key)
            context.load_cert_chain(certfile, keyfile)
    return context


class _HandshakeClosingSocket(ssl.SSLSocket):
    """An SSLSocket that closes itself when its handshake fails.

    paho wraps the TCP socket and runs the handshake, and when the handshake raises (a
    broker whose certificate we refuse) it lets go of the socket without closing it:
    one leaked descriptor per attempt, for as long as the connection keeps retrying.
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise  # not a failure: a non-blocking handshake in progress
        except OSError:
            self.close()
            raise


def _write_private(path: Path, pem: str) -> Path:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii", errors="replace") as file:
        file.write(normalize_pem(pem))
    return path


# -- errors ----------------------------------------------------------------------------


def _tls_auth_reason(error: BaseException) -> str | None:
    """The OpenSSL reason when `error` is one side refusing the other's certificate."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return "CERTIFICATE_VERIFY_FAILED"
    reason = getattr(error, "reason", None) if isinstance(error, ssl.SSLError) else None
    text = reason if isinstance(reason, str) else str(error).upper()
    for known in _TLS_AUTH_REASONS:
        if known in text:
            return known
    return None


def _causes(error: BaseException) -> list[BaseException]:
    """`error` and what it was raised from. aiomqtt re-raises connect errors `from None`,
    which hides the original but keeps it as `__context__`."""
    chain = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        chain.append(current)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return chain


def classify_connect_error(
    error: BaseException, endpoint: Endpoint, socket_error: OSError | None = None
) -> SinkError:
    """What a failed connection attempt means for deliveries: see the module docstring.

    `socket_error` is what the socket reported before the broker answered (a TLS 1.3
    client certificate is refused after the handshake, on the first read).
    """
    candidates = ([socket_error] if socket_error is not None else []) + _causes(error)
    for candidate in candidates:
        if isinstance(candidate, MqttConnectError):
            rc = candidate.rc
            refused = (
                rc.value in _AUTH_REASON_CODES
                if isinstance(rc, ReasonCode)
                else rc in _AUTH_RETURN_CODES
            )
            if refused:
                return AuthenticationSinkError(f"{endpoint} refused the connection: {candidate}")
            return RetryableSinkError(f"{endpoint} refused the connection: {candidate}")
        reason = _tls_auth_reason(candidate)
        if reason is not None:
            side = "its" if "VERIFY_FAILED" in reason else "our"
            return AuthenticationSinkError(
                f"TLS with {endpoint} failed on {side} certificate ({reason}): {candidate}"
            )
    detail = socket_error if socket_error is not None else error
    return RetryableSinkError(f"cannot connect to {endpoint}: {detail}")


# -- downlink topics -------------------------------------------------------------------


def _expressions(level: str) -> list[tuple[int, int]]:
    """(start, end) of each `{...}` in one topic level; quotes may hold braces."""
    spans = []
    i = 0
    while i < len(level):
        if level[i] != "{":
            i += 1
            continue
        j = i + 1
        while j < len(level) and level[j] != "}":
            if level[j] in "'\"":
                close = level.find(level[j], j + 1)
                j = close if close >= 0 else len(level)
            j += 1
        spans.append((i, j + 1))
        i = j + 1
    return spans


class DownlinkTopic:
    """A `downlinkTopicPattern` as an MQTT subscription, and the DevEUI of a matched topic.

    Each level holding a `{...}` becomes `+` (a wildcard takes a whole level); the level
    whose expression names `DevEUI` (first choice or fallback) gives the device back,
    with the level's literal text around it removed (`dev-{DevEUI}` → `dev-(.+)`).
    """

    def __init__(self, pattern: str) -> None:
        Template(pattern)  # validated by the connector model; fail the same way here
        self.pattern = pattern
        levels = pattern.split("/")
        self.filter = "/".join("+" if "{" in level else level for level in levels)
        self._dev_level: int | None = None
        self._dev_regex: re.Pattern[str] | None = None
        for index, level in enumerate(levels):
            regex, names_dev_eui = self._level_regex(level)
            if names_dev_eui:
                self._dev_level, self._dev_regex = index, regex
                break

    @staticmethod
    def _level_regex(level: str) -> tuple[re.Pattern[str], bool]:
        parts: list[str] = []
        found = False
        last = 0
        for start, end in _expressions(level):
            parts.append(re.escape(level[last:start]))
            choices = [c.strip() for c in level[start + 1 : end - 1].split("|")]
            names = any(c in ("DevEUI", "DevEUI_uplink.DevEUI") for c in choices)
            parts.append("(?P<dev>.+?)" if names and not found else "(?:.+?)")
            found = found or names
            last = end
        parts.append(re.escape(level[last:]))
        return re.compile("".join(parts)), found

    def dev_eui(self, topic: str) -> str | None:
        """The DevEUI text of the topic's DevEUI level (not validated), or None."""
        if self._dev_level is None or self._dev_regex is None:
            return None
        levels = topic.split("/")
        if self._dev_level >= len(levels):
            return None
        match = self._dev_regex.fullmatch(levels[self._dev_level])
        return match.group("dev") if match else None


# -- pacing ----------------------------------------------------------------------------


class Pacer:
    """At most `rate` publishes a second, spaced evenly: a token bucket one token deep.

    Each publish waits until `1/rate` seconds after the previous one went, in call order
    (asyncio.Lock is first come, first served). Spacing is measured from when the previous
    publish actually went, not from a schedule, so a stalled event loop is not followed by
    a burst of overdue publishes: no second ever sees more than `rate` of them.
    """

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self._lock = asyncio.Lock()
        self._last = -math.inf  # loop time of the previous publish

    async def wait(self) -> None:
        async with self._lock:
            loop = asyncio.get_running_loop()
            delay = self._last + self.interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self._last = loop.time()


# -- the sink --------------------------------------------------------------------------


class _SessionLost(RetryableSinkError):
    """A session that was up is gone (as opposed to an attempt that failed)."""


@dataclass(slots=True)
class _Session:
    client: aiomqtt.Client
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    socket_error: OSError | None = None


class _PahoLog(logging.Handler):
    """Takes what paho reports through its logger, the only place it says it.

    A socket error before the CONNACK (a TLS 1.3 alert refusing our certificate) is
    logged by paho and otherwise lost: aiomqtt then waits for a CONNACK that never comes.
    The error goes to `on_error`; other warnings are passed on to our log.
    """

    def __init__(self, connection_id: str, on_error: Any) -> None:
        super().__init__(logging.WARNING)
        self._connection_id = connection_id
        self._on_error = on_error

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        errors = [a for a in args if isinstance(a, OSError)]
        if errors:
            self._on_error(errors[0])
        else:
            log.warning("MQTT client", connection=self._connection_id, message=record.getMessage())


class MqttClientSink:
    """One persistent MQTT session to a cloud broker, for one connection.

    Made by MqttSink (`actility-mqtt-iot`) and AwsSink (`actility-aws-iot`) from their
    configurations; `_before_publish` is the hook for what a cloud does per uplink.
    """

    # Whether a fleet's instances may share the downlink subscription (`$share/...`).
    shares_subscriptions = True

    def __init__(
        self,
        connection_id: str,
        config: CommonConfig,
        context: SinkContext,
        *,
        endpoint: Endpoint,
        client_id: str,
        uplink_topic: str,
        downlink_topic: str | None,
        qos: int = 1,
        username: str | None = None,
        password: str | None = None,
        tls: TlsMaterial | None = None,
        pacer: Pacer | None = None,
    ) -> None:
        self.connection_id = connection_id
        self.endpoint = endpoint
        self.client_id = client_id
        self._config = config
        self._context = context
        self._timeout = context.timeout
        self._uplink = Template(uplink_topic)
        self._templated = "{" in uplink_topic
        self._downlinks = (
            DownlinkTopic(downlink_topic) if downlink_topic and config.downlinkEnabled else None
        )
        self._qos = qos
        self._username = username
        self._password = password
        self._tls = tls
        self._pacer = pacer
        self._reshape = config.sendMetadata or config.sendRawDecodedFormat
        self._cap = PROBE_BACKOFF_CAP_SECONDS[config.reconnectStrategy]
        self._ssl: ssl.SSLContext | None = None
        self._broken: SinkError | None = None  # the configuration cannot work at all
        self._session: _Session | None = None  # set while connected
        self._error: SinkError | None = None  # why the last attempt failed
        self._failures = 0  # failed attempts so far; senders wait for it to move
        self._connecting = False
        self._changed = asyncio.Condition()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._broken is not None:
            return
        if self._tls is not None:
            try:
                self._ssl = tls_context(self._tls)
            except (ssl.SSLError, ValueError, OSError) as exc:
                # The operator's material, not the cloud, is wrong: the state says so and
                # deliveries wait (slowly) until the connection is corrected.
                self._broken = AuthenticationSinkError(
                    f"the TLS material cannot be used: {_describe_tls_error(exc)}"
                )
                log.warning(
                    "Cloud broker TLS material refused", connection=self.connection_id,
                    error=str(self._broken),
                )  # fmt: skip
                return

    def _open(self) -> None:
        """Start the session task, once: at the first delivery (see the module docstring)."""
        if self._task is None and not self._stopping.is_set():
            self._task = asyncio.create_task(self._run(), name=f"mqtt-sink:{self.connection_id}")

    async def healthcheck(self) -> bool:
        return self._session is not None

    async def close(self) -> None:
        self._stopping.set()
        async with self._changed:
            self._changed.notify_all()
        task, self._task = self._task, None
        if task is not None:
            # Room for a clean DISCONNECT; a broker that does not answer is left behind.
            done, _ = await asyncio.wait({task}, timeout=self._timeout + 1)
            if not done:
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # -- sending ---------------------------------------------------------------------------

    async def send(self, delivery: Delivery) -> None:
        if self._broken is not None:
            raise type(self._broken)(str(self._broken))
        document: dict[str, Any] | None = None
        if self._templated or self._reshape:
            document = orjson.loads(delivery.document)
        topic = self._uplink.render(document) if document is not None else self._uplink.text
        if not _valid_topic(topic):
            raise PermanentSinkError(
                f"uplinkTopicPattern {self._uplink.text!r} renders to {topic!r},"
                " which is not an MQTT topic name"
            )
        body = (
            render_body(
                document,
                send_metadata=self._config.sendMetadata,
                send_raw_decoded=self._config.sendRawDecodedFormat,
            )
            if document is not None and self._reshape
            else delivery.document
        )
        self._before_publish(delivery)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        session = await self._connected(deadline)
        if self._pacer is not None:
            await self._pacer.wait()
        await self._publish(session, topic, body, deadline)

    def _before_publish(self, delivery: Delivery) -> None:
        """Called for every delivery before it is published (AWS registers things here)."""

    async def _connected(self, deadline: float) -> _Session:
        """The current session, or the outcome of the next attempt, within `deadline`."""
        session = self._session
        if session is not None and not session.lost.is_set():
            return session
        self._open()
        failures = self._failures
        if not self._connecting:
            self._wake.set()  # a delivery waits: try now rather than after the backoff

        def settled() -> bool:
            return self._session is not None or self._failures != failures or self._stop_seen()

        try:
            async with asyncio.timeout_at(deadline), self._changed:
                await self._changed.wait_for(settled)
        except TimeoutError:
            last = f" (last error: {self._error})" if self._error is not None else ""
            raise RetryableSinkError(
                f"not connected to {self.endpoint} within {self._timeout:g}s{last}"
            ) from None
        session = self._session
        if session is not None:
            return session
        if self._stop_seen():
            raise RetryableSinkError("the sink is closing")
        error = self._error or RetryableSinkError(f"cannot connect to {self.endpoint}")
        # A fresh exception for each sender: one object raised in several tasks would
        # collect all their tracebacks.
        raise type(error)(str(error))

    def _stop_seen(self) -> bool:
        return self._stopping.is_set()

    async def _publish(self, session: _Session, topic: str, body: bytes, deadline: float) -> None:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise RetryableSinkError(f"no PUBACK within {self._timeout:g}s")
        publish = asyncio.ensure_future(
            session.client.publish(topic, body, qos=self._qos, timeout=remaining)
        )
        lost = asyncio.ensure_future(session.lost.wait())
        try:
            done, _ = await asyncio.wait(
                {publish, lost}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            lost.cancel()
            if not publish.done():
                publish.cancel()
            await asyncio.gather(publish, lost, return_exceptions=True)
        if publish in done and not publish.cancelled():
            error = publish.exception()
            if error is None:
                return
            if isinstance(error, ValueError):  # paho refuses the topic
                raise PermanentSinkError(f"cannot publish to {topic!r}: {error}")
            if isinstance(error, aiomqtt.MqttError):
                raise RetryableSinkError(f"publish to {self.endpoint} failed: {error}")
            raise error
        if lost in done:
            raise RetryableSinkError(f"connection to {self.endpoint} lost before the PUBACK")
        raise RetryableSinkError(f"no PUBACK from {self.endpoint} within {self._timeout:g}s")

    # -- the session -----------------------------------------------------------------------

    async def _run(self) -> None:
        """Connect, keep the session, reconnect after a loss; until close()."""
        loop = asyncio.get_running_loop()
        backoff = RECONNECT_INITIAL_SECONDS
        reported: str | None = None  # the last error logged as a warning
        while not self._stopping.is_set():
            self._wake.clear()
            started = loop.time()
            try:
                await self._session_once()
                return  # stopped
            except _SessionLost as exc:
                log.warning(
                    "Cloud broker connection lost", connection=self.connection_id, error=str(exc)
                )
                reported = None
            except SinkError as exc:
                text = str(exc)
                # The first failure of a streak is a warning; repeats of it are not news.
                level = log.debug if text == reported else log.warning
                level("Cloud broker unavailable", connection=self.connection_id, error=text)
                reported = text
            except Exception as exc:
                # A bug must not end the session task: the connection would stay silent.
                log.exception("Cloud broker session failed", connection=self.connection_id)
                self._error = RetryableSinkError(f"internal error: {exc}")
            if loop.time() - started >= STABLE_SESSION_SECONDS:
                backoff = RECONNECT_INITIAL_SECONDS
            delay = random.uniform(backoff / 2, backoff)
            backoff = min(backoff * 2, self._cap)
            stop = asyncio.ensure_future(self._stopping.wait())
            wake = asyncio.ensure_future(self._wake.wait())
            await asyncio.wait({stop, wake}, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            wake.cancel()
            await asyncio.gather(stop, wake, return_exceptions=True)

    def _make_client(self, on_socket_error: Any) -> aiomqtt.Client:
        paho_log = logging.Logger(f"iotflow.sink.mqtt.{self.connection_id}")
        paho_log.propagate = False
        paho_log.addHandler(_PahoLog(self.connection_id, on_socket_error))
        client = aiomqtt.Client(
            self.endpoint.host,
            self.endpoint.port,
            identifier=self.client_id,
            username=self._username,
            password=self._password,
            protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=self._downlinks is None,
            transport="websockets" if self.endpoint.websockets else "tcp",
            websocket_path=self._websocket_path() if self.endpoint.websockets else None,
            timeout=self._timeout,
            keepalive=KEEPALIVE_SECONDS,
            tls_context=self._ssl if self.endpoint.tls else None,
            max_inflight_messages=max(20, self._context.max_in_flight),
            logger=paho_log,
        )
        # Every in-flight delivery is a pending call; aiomqtt warns past this threshold.
        client.pending_calls_threshold = self._context.max_in_flight + 16
        return client

    def _websocket_path(self) -> str:
        """The path of a websocket session (AWS signs it for each connection)."""
        return self.endpoint.path

    async def _session_once(self) -> None:
        """One connection: returns when stopped, raises SinkError when it fails or is lost."""
        loop = asyncio.get_running_loop()
        before_connack: asyncio.Future[OSError] = loop.create_future()
        session_ref: list[_Session] = []

        def on_socket_error(error: OSError) -> None:
            def record() -> None:
                if session_ref:
                    session_ref[0].socket_error = error
                elif not before_connack.done():
                    before_connack.set_result(error)

            loop.call_soon_threadsafe(record)

        client = self._make_client(on_socket_error)
        acker = ManualAck(client) if self._downlinks is not None else None
        self._connecting = True
        try:
            await self._connect(client, before_connack)
        except BaseException as exc:
            _discard(client)
            if isinstance(exc, SinkError):
                await self._settle(error=exc)
            raise
        finally:
            self._connecting = False
        session = _Session(client)
        session_ref.append(session)
        try:
            log.info(
                "Cloud broker connected",
                connection=self.connection_id,
                url=str(self.endpoint),
                client_id=self.client_id,
            )
            if self._downlinks is not None:
                await self._subscribe(client, self._downlinks)
            await self._settle(session=session)
            await self._consume(session, acker)
        except aiomqtt.MqttError:
            # paho says why only when the socket itself failed; a closed socket is all
            # it knows otherwise (its reason code then reads "Unspecified error").
            detail = session.socket_error or "closed by the broker or the network"
            raise _SessionLost(f"connection to {self.endpoint} lost: {detail}") from None
        finally:
            session.lost.set()
            if self._session is session:
                self._session = None
            with contextlib.suppress(aiomqtt.MqttError, OSError, TimeoutError):
                # A clean DISCONNECT when we leave on purpose; a no-op after a loss.
                await client.__aexit__(None, None, None)

    async def _connect(
        self, client: aiomqtt.Client, before_connack: asyncio.Future[OSError]
    ) -> None:
        """Connect, or raise the classified reason; a socket error ends the wait at once."""
        enter = asyncio.ensure_future(client.__aenter__())
        try:
            waiting: set[asyncio.Future[Any]] = {enter, before_connack}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            enter.cancel()
            raise
        socket_error = before_connack.result() if before_connack.done() else None
        if not enter.done():
            # The socket is gone (paho closed it); aiomqtt would wait for its timeout.
            enter.cancel()
            await asyncio.gather(enter, return_exceptions=True)
            assert socket_error is not None
            raise classify_connect_error(socket_error, self.endpoint)
        error = enter.exception() if not enter.cancelled() else None
        if error is not None:
            raise classify_connect_error(error, self.endpoint, socket_error)

    def _subscription(self, downlinks: DownlinkTopic) -> str:
        """The downlink filter, shared by the fleet's instances when there is a fleet."""
        group = self._context.shared_group
        if not group or not self.shares_subscriptions:
            return downlinks.filter
        return f"$share/{group}/{downlinks.filter}"

    async def _subscribe(self, client: aiomqtt.Client, downlinks: DownlinkTopic) -> None:
        topic = self._subscription(downlinks)
        try:
            granted = await client.subscribe(topic, qos=self._qos)
        except aiomqtt.MqttCodeError as exc:
            granted = [exc.rc] if isinstance(exc.rc, ReasonCode) else []
        codes = [g.value if isinstance(g, ReasonCode) else int(g) for g in granted]
        if any(code >= 0x80 for code in codes):
            # Uplinks still flow; the operator must fix the broker's ACL (or AWS policy).
            log.warning("Downlink subscription refused", connection=self.connection_id, topic=topic)
        else:
            log.info("Downlinks subscribed", connection=self.connection_id, topic=topic)

    async def _settle(
        self, *, session: _Session | None = None, error: SinkError | None = None
    ) -> None:
        """Publish the outcome of an attempt to the senders waiting for it."""
        async with self._changed:
            if session is not None:
                self._session = session
                self._error = None
            if error is not None:
                self._error = error
                self._failures += 1
            self._changed.notify_all()

    async def _consume(self, session: _Session, acker: ManualAck | None) -> None:
        """Hand downlinks over until the session is lost (MqttError) or the sink closes.

        Iterating the messages is also how a lost connection shows up, so this runs even
        without a downlink subscription.
        """
        messages = aiter(session.client.messages)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                following = asyncio.ensure_future(anext(messages))
                done, _ = await asyncio.wait({following, stop}, return_when=asyncio.FIRST_COMPLETED)
                if following not in done:
                    following.cancel()
                    await asyncio.gather(following, return_exceptions=True)
                    return
                message = following.result()
                await self._downlink(message)
                if acker is not None:
                    # Acknowledged once handed over: a downlink in hand when we stop or
                    # crash is redelivered on the next session (it is persistent).
                    acker.ack(message.mid, message.qos)
        finally:
            stop.cancel()
            await asyncio.gather(stop, return_exceptions=True)

    async def _downlink(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        if self._downlinks is None or not message.topic.matches(self._downlinks.filter):
            return
        payload = message.payload if isinstance(message.payload, bytes) else b""
        topic_eui = self._downlinks.dev_eui(topic)
        handler = self._context.downlink
        if handler is None:
            log.warning(
                "Downlink rejected",
                connection=self.connection_id,
                topic=topic,
                reason="disabled",
                error="this daemon has no downlink path",
            )
            return
        try:
            request = parse_downlink(
                payload, dev_eui=topic_eui, default_port=self._config.downlinkPort
            )
            async with asyncio.timeout(self._timeout):
                await handler(self.connection_id, request)
        except DownlinkRejected as exc:
            log.warning(
                "Downlink rejected",
                connection=self.connection_id,
                topic=topic,
                reason=exc.reason,
                error=exc.message,
            )
        except TimeoutError:
            log.warning(
                "Downlink not handed over in time",
                connection=self.connection_id,
                topic=topic,
                error=f"no answer within {self._timeout:g}s",
            )
        except Exception as exc:
            # A bug or an outage downstream must not end the session (and uplinks with it).
            log.warning(
                "Downlink failed", connection=self.connection_id, topic=topic, error=str(exc)
            )
        else:
            log.info(
                "Downlink received",
                connection=self.connection_id,
                devEUI=request.dev_eui,
                fPort=request.f_port,
                correlationId=request.correlation_id,
            )


def _discard(client: aiomqtt.Client) -> None:
    """Close the socket of a connection attempt that failed.

    aiomqtt leaves paho's socket open when no CONNACK came in time (a server that accepts
    TCP and says nothing): one descriptor leaked per attempt. paho's `_sock_close` is the
    one call that also unregisters the socket from the event loop (through aiomqtt's
    on_socket_close) before closing it; like `sources/ack.py`, this reaches under aiomqtt.
    """
    paho_client = client._client
    if paho_client.socket() is not None:
        paho_client._sock_close()


def _valid_topic(topic: str) -> bool:
    """A topic name one may publish to (MQTT 3.1.1 section 4.7)."""
    return (
        0 < len(topic.encode()) <= 65535
        and "+" not in topic
        and "#" not in topic
        and "\x00" not in topic
    )


def _describe_tls_error(error: BaseException) -> str:
    # ssl's messages name the OpenSSL reason (`[SSL: KEY_VALUES_MISMATCH]`), never the
    # content of what it could not read.
    return f"{type(error).__name__}: {error}"


class MqttSink(MqttClientSink):
    """`actility-mqtt-iot`: a broker given by `hostName` and `protocol` (TCP, SSL, WSS)."""

    def __init__(self, connection_id: str, config: MqttConfig, context: SinkContext) -> None:
        problem: str | None = None
        try:
            endpoint = mqtt_endpoint(config)
        except ValueError as exc:
            # The model's pattern lets a few malformed values through (a port past 65535).
            problem = f"hostName: {exc}"
            endpoint = Endpoint(config.hostName, 0, tls=False)
        tls = (
            TlsMaterial(
                trusted_ca=config.trustedCaCertficate,
                certificate=config.certificate,
                private_key=secret_value(config.privateKey),
            )
            if endpoint.tls
            else None
        )
        super().__init__(
            connection_id,
            config,
            context,
            endpoint=endpoint,
            client_id=config.clientId or default_client_id(connection_id),
            uplink_topic=config.uplinkTopicPattern,
            downlink_topic=config.downlinkTopicPattern,
            qos=config.qos,
            username=config.username,
            password=secret_value(config.password),
            tls=tls,
        )
        if problem is not None:
            self._broken = PermanentSinkError(problem)
