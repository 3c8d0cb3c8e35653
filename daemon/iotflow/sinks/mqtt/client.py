"""The aiomqtt client of one connection attempt, and everything that reaches under aiomqtt.

aiomqtt does not say everything a sink needs (a socket error before the CONNACK, the
socket of an attempt that timed out): what is read from paho's logger or done to paho's
client (`aiomqtt.Client._client`, private) is in this module and nowhere else in the sink.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt

from iotflow import mqtt_properties
from iotflow.sinks.mqtt.endpoint import Endpoint
from iotflow.telemetry.logging import get_logger

# Each PUBACK of an MQTT 5 cloud is decoded by paho: without its tables rebuilt each time.
mqtt_properties.install()

log = get_logger("iotflow.sinks")

KEEPALIVE_SECONDS = 60


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """What every attempt of a session connects with."""

    endpoint: Endpoint
    client_id: str
    username: str | None
    password: str | None
    clean_session: bool
    timeout: float
    max_in_flight: int


class _PahoLog(logging.Handler):
    """Takes what paho reports through its logger, the only place it says it.

    A socket error before the CONNACK (a TLS 1.3 alert refusing our certificate) is
    logged by paho and otherwise lost: aiomqtt then waits for a CONNACK that never comes.
    The error goes to `on_error`; other warnings are passed on to our log.
    """

    def __init__(self, connection_id: str, on_error: Callable[[OSError], None]) -> None:
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


def make_client(
    connection_id: str,
    options: ClientOptions,
    *,
    ssl_context: ssl.SSLContext | None,
    websocket_path: str | None,
    on_socket_error: Callable[[OSError], None],
) -> aiomqtt.Client:
    """An MQTT 3.1.1 client for one attempt; `on_socket_error` hears what paho only logs."""
    endpoint = options.endpoint
    paho_log = logging.Logger(f"iotflow.sinks.mqtt.{connection_id}")
    paho_log.propagate = False
    paho_log.addHandler(_PahoLog(connection_id, on_socket_error))
    client = aiomqtt.Client(
        endpoint.host,
        endpoint.port,
        identifier=options.client_id,
        username=options.username,
        password=options.password,
        protocol=aiomqtt.ProtocolVersion.V311,
        clean_session=options.clean_session,
        transport="websockets" if endpoint.websockets else "tcp",
        websocket_path=websocket_path if endpoint.websockets else None,
        timeout=options.timeout,
        keepalive=KEEPALIVE_SECONDS,
        tls_context=ssl_context if endpoint.tls else None,
        max_inflight_messages=max(20, options.max_in_flight),
        logger=paho_log,
    )
    # Every in-flight delivery is a pending call; aiomqtt warns past this threshold.
    client.pending_calls_threshold = options.max_in_flight + 16
    _report_close_before_connack(client, on_socket_error)
    return client


def _report_close_before_connack(
    client: aiomqtt.Client, on_socket_error: Callable[[OSError], None]
) -> None:
    """A broker (or a proxy before it) that closes the connection before its CONNACK is a
    failed attempt at once. aiomqtt ignores a disconnection before the CONNACK and waits out
    its timeout, which made every such attempt last the whole delivery timeout."""
    paho_client = client._client
    on_connect, on_disconnect = paho_client.on_connect, paho_client.on_disconnect
    answered = False

    def connected(*args: Any) -> None:
        nonlocal answered
        answered = True
        if on_connect is not None:
            on_connect(*args)

    def disconnected(*args: Any) -> None:
        # paho may call this from the executor thread that runs connect(): on_socket_error
        # hands over to the loop itself.
        if not answered:
            on_socket_error(ConnectionResetError("the broker closed the connection"))
        if on_disconnect is not None:
            on_disconnect(*args)

    paho_client.on_connect = connected
    paho_client.on_disconnect = disconnected


def discard(client: aiomqtt.Client) -> None:
    """Close the socket of a connection attempt that failed.

    aiomqtt leaves paho's socket open when no CONNACK came in time (a server that accepts
    TCP and says nothing): one descriptor leaked per attempt. paho's `_sock_close` is the
    one call that also unregisters the socket from the event loop (through aiomqtt's
    on_socket_close) before closing it; like `sources/ack.py`, this reaches under aiomqtt.
    """
    paho_client = client._client
    if paho_client.socket() is not None:
        paho_client._sock_close()
