"""The downlink path: from a connection's cloud to its device's network server.

Whoever received the command (an MQTT sink on its downlink topic, the HTTP API) parses it
into a DownlinkRequest and hands it here with its connection. `Downlinks` checks that the
connection takes downlinks and that the device is its own, finds the device's network
server in the directory, publishes the downlink there on the source broker (QoS 1), and
says what happened: an event of the connection, a log line, `iotflow_downlinks_total`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiomqtt

from iotflow.config.model import DownlinkSettings
from iotflow.connectors.connection import Connection
from iotflow.downlinks.directory import DeviceDirectory
from iotflow.downlinks.model import DownlinkRejected, DownlinkRequest
from iotflow.downlinks.network import render_downlink
from iotflow.downlinks.parse import MAX_PAYLOAD_BYTES, MAX_PORT, MIN_PORT
from iotflow.errors import NotFoundError
from iotflow.registry import Store
from iotflow.telemetry.logging import get_logger
from iotflow.telemetry.metrics import Metrics

__all__ = ["Downlinks", "Sent"]

log = get_logger("iotflow.downlinks")

Publish = Callable[[str, bytes], Awaitable[None]]  # on the source broker, QoS 1
Record = Callable[[str, str, dict[str, Any]], None]  # a connection's event log
# A driver's encodeDownlink: (driver id, decoded payload, fPort) → (bytes, fPort or None).
Encoder = Callable[[str, Any, int], Awaitable[tuple[bytes, int | None]]]


@dataclass(frozen=True, slots=True)
class Sent:
    """A downlink the source broker accepted."""

    dev_eui: str
    f_port: int
    topic: str
    size: int  # bytes of application payload


class _NoConnection(DownlinkRejected):
    """Refused because the connection does not exist: nothing to record it on."""


class Downlinks:
    """The daemon's DownlinkHandler (see iotflow.downlinks.model)."""

    def __init__(
        self,
        *,
        store: Store,
        directory: DeviceDirectory,
        publish: Publish,
        record: Record,
        metrics: Metrics,
        settings: Callable[[], DownlinkSettings],
        routes: Callable[[str], Mapping[str, str | None]] = lambda dev_eui: {},
        encode: Encoder | None = None,
    ) -> None:
        self._routes = routes  # the connections (and their flows' drivers) a device reaches
        self._encode = encode
        self._store = store
        self._directory = directory
        self._publish = publish
        self._record = record
        self._metrics = metrics
        self._settings = settings  # read at each downlink: [downlinks] is reloadable

    async def __call__(self, connection_id: str, request: DownlinkRequest) -> None:
        await self.send(connection_id, request)

    async def send(
        self,
        connection_id: str,
        request: DownlinkRequest,
        *,
        connection: Connection | None = None,
    ) -> Sent:
        """Send one downlink of a connection; DownlinkRejected says why not.

        `connection` saves a registry read when the caller has it already. Failures of the
        registry itself propagate (RegistryError): nothing was sent, the caller may retry.
        """
        try:
            sent = await self._send(connection_id, request, connection)
        except DownlinkRejected as rejection:
            self.rejected(connection_id, rejection, request=request)
            raise
        self._metrics.downlinks.labels(connection_id, "sent").inc()
        details: dict[str, Any] = {
            "devEUI": sent.dev_eui,
            "fPort": sent.f_port,
            "size": sent.size,
            "confirmed": request.confirmed,
            "topic": sent.topic,
        }
        if request.correlation_id:
            details["correlationId"] = request.correlation_id
        self._record(connection_id, "downlink_sent", details)
        log.info("Downlink sent", connection=connection_id, **details)
        return sent

    def rejected(
        self,
        connection_id: str,
        rejection: DownlinkRejected,
        *,
        request: DownlinkRequest | None = None,
    ) -> None:
        """Say that a downlink of a connection was refused (also one that did not parse)."""
        details: dict[str, Any] = {"reason": rejection.reason, "message": rejection.message}
        if request is not None:
            details["devEUI"] = request.dev_eui
            if request.correlation_id:
                details["correlationId"] = request.correlation_id
        where = {"devEUI": request.dev_eui} if request is not None else {}
        log.warning(
            "Downlink rejected",
            connection=connection_id,
            reason=rejection.reason,
            error=rejection.message,
            **where,
        )
        if isinstance(rejection, _NoConnection):
            return  # no event log to write to, and no metric series for a made-up id
        self._metrics.downlinks.labels(connection_id, rejection.reason).inc()
        self._record(connection_id, "downlink_rejected", details)

    async def _encoded(
        self, connection_id: str, request: DownlinkRequest, driver_id: str | None
    ) -> DownlinkRequest:
        """A downlink with a decoded `payload`, encoded by the driver of the flow that routes
        the device to this connection (TS013 encodeDownlink), as ThingPark does."""
        if driver_id is None or self._encode is None:
            raise DownlinkRejected(
                "bad_payload",
                f"payload needs a driver to encode it: no flow with a driver routes device"
                f" {request.dev_eui} to connection {connection_id!r}; send payload_hex instead",
                path="payload",
            )
        try:
            payload, port = await self._encode(driver_id, request.data, request.f_port)
        except Exception as exc:  # a codec's fault, whatever it is: this downlink only
            raise DownlinkRejected(
                "bad_payload", f"driver {driver_id} could not encode payload: {exc}", path="payload"
            ) from None
        if not payload or len(payload) > MAX_PAYLOAD_BYTES:
            raise DownlinkRejected(
                "bad_payload",
                f"driver {driver_id} encoded {len(payload)} bytes (1..{MAX_PAYLOAD_BYTES})",
                path="payload",
            )
        f_port = port if port is not None and MIN_PORT <= port <= MAX_PORT else request.f_port
        return replace(request, payload=payload, f_port=f_port, data=None)

    async def _send(
        self, connection_id: str, request: DownlinkRequest, connection: Connection | None
    ) -> Sent:
        if connection is None:
            try:
                connection = await self._store.get_connection(connection_id)
            except NotFoundError:
                raise _NoConnection(
                    "disabled", f"connection {connection_id!r} does not exist"
                ) from None
        if connection.fault is not None:
            raise DownlinkRejected("disabled", f"connection {connection_id!r} is out of service")
        if not connection.configuration.downlinkEnabled:
            raise DownlinkRejected(
                "disabled", f"connection {connection_id!r} has downlinkEnabled set to false"
            )
        if not connection.active:
            raise DownlinkRejected("disabled", f"connection {connection_id!r} is deactivated")
        dev_eui = request.dev_eui
        try:
            bound = await self._store.get_device(dev_eui)
        except NotFoundError:
            bound = []
        routes = self._routes(dev_eui)
        if connection_id not in bound and connection_id not in routes:
            # A cloud commands its own devices only (bound to it, or routed to it by a flow).
            # Said as "unknown" to it: whether the device exists for other connections is
            # none of its business.
            raise DownlinkRejected(
                "unknown_device", f"device {dev_eui} is not bound to connection {connection_id!r}"
            )
        found = await self._directory.lookup(dev_eui)
        if found is None:
            raise DownlinkRejected(
                "unknown_device",
                f"no uplink of device {dev_eui} seen yet; its network server is learned"
                " from its uplinks",
            )
        fmt, source = found
        if request.data is not None:
            request = await self._encoded(connection_id, request, routes.get(connection_id))
        settings = self._settings()
        downlink = render_downlink(fmt, source, request, actility_topic=settings.actility_topic)
        try:
            async with asyncio.timeout(settings.publish_timeout.total_seconds()):
                await self._publish(downlink.topic, downlink.payload())
        except (ConnectionError, TimeoutError, aiomqtt.MqttError) as exc:
            # After a timeout the broker may still get it (the session resends QoS 1
            # messages in flight): the cloud hears "not sent" and may try again.
            why = str(exc) or "no acknowledgement in time"
            raise DownlinkRejected(
                "not_connected", f"the source broker did not take the downlink: {why}"
            ) from None
        return Sent(dev_eui, request.f_port, downlink.topic, len(request.payload))
