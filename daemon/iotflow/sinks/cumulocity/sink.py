"""`actility-cumulocity-iot`: uplinks become Cumulocity events and measurements of a device
found (or created) by its DevEUI; Cumulocity operations become downlinks.

The REST resources used, as Cumulocity's reference documents them (guides/reference:
identity, inventory, events, measurements, device-control, rest-implementation):

- `GET  /identity/externalIds/c8y_Serial/{DevEUI}` — the device's managed object (404: none)
- `POST /inventory/managedObjects` and `POST /identity/globalIds/{id}/externalIds` — create
  and bind it (when `createDevices`) — registration.py
- `POST /event/events`, `POST /measurement/measurements` — one of each per uplink; the
  documents are made in documents.py
- `GET  /devicecontrol/operations?deviceId=…&status=PENDING`, `PUT /devicecontrol/operations/{id}`
  — downlinks, polled for the devices this connection has seen — operations.py

The HTTP itself (one keep-alive session, HTTP Basic, what a status means) is client.py.
The mapping and the decisions behind it are in docs/cumulocity.md.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from iotflow.connectors.cumulocity import CumulocityConfig
from iotflow.errors import PermanentSinkError, Rejection
from iotflow.formats import decode
from iotflow.sinks.base import SinkContext
from iotflow.sinks.cumulocity.client import CumulocityClient
from iotflow.sinks.cumulocity.documents import event_document, measurement_document
from iotflow.sinks.cumulocity.operations import Operations
from iotflow.sinks.cumulocity.registration import Devices
from iotflow.spool import Delivery
from iotflow.telemetry.logging import get_logger

log = get_logger("iotflow.sinks")

_PROGRESS_KEPT = 4096  # deliveries whose event is in Cumulocity while the measurement is not


class CumulocitySink:
    """One connection's link to a Cumulocity tenant: deliveries out, operations in."""

    def __init__(
        self,
        connection_id: str,
        config: CumulocityConfig,
        context: SinkContext,
        *,
        poll_interval: float | None = None,
    ) -> None:
        self._id = connection_id
        self._config = config
        self._client = CumulocityClient(
            config, timeout=context.timeout, limit=context.max_in_flight
        )
        self._devices = Devices(connection_id, self._client, create_devices=config.createDevices)
        self._operations: Operations | None = None
        if config.downlinkEnabled and context.downlink is not None:
            self._operations = Operations(
                connection_id,
                self._client,
                self._devices,
                context.downlink,
                # The connection's operationsPollInterval; tests pass a shorter one.
                interval=(
                    poll_interval
                    if poll_interval is not None
                    else config.operationsPollInterval.total_seconds()
                ),
                default_port=config.downlinkPort,
            )
        self._poller: asyncio.Task[None] | None = None
        # Delivery id → its event is accepted: a retry after a failed measurement does not
        # post the event twice. Bounded: an expired delivery never comes back to clear it.
        self._event_posted: OrderedDict[int, None] = OrderedDict()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._client.start()
        if not self._config.downlinkEnabled:
            log.debug("Cumulocity operations not polled: downlinks disabled", connection=self._id)
        elif self._operations is None:
            # The operations stay PENDING in Cumulocity, which is the queue they wait in.
            log.info(
                "Cumulocity operations not polled: this daemon has no downlink path",
                connection=self._id,
            )
        else:
            self._poller = asyncio.create_task(self._operations.run(), name=f"c8y-poll:{self._id}")

    async def healthcheck(self) -> bool:
        return self._client.open

    async def close(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
        await self._client.close()

    async def poll_operations(self) -> None:
        """One round of operation polling (the poller's; tests call it directly)."""
        if self._operations is not None:
            await self._operations.poll_operations()

    # -- uplinks ---------------------------------------------------------------------------

    async def send(self, delivery: Delivery) -> None:
        try:
            uplink = decode("actility", delivery.document)
        except Rejection as exc:
            raise PermanentSinkError(f"uplink document unreadable: {exc}") from None
        source = await self._devices.of(uplink)
        try:
            if delivery.id not in self._event_posted:
                await self._client.call(
                    "POST", "/event/events", "event", body=event_document(uplink, source)
                )
                self._event_posted[delivery.id] = None
                while len(self._event_posted) > _PROGRESS_KEPT:
                    self._event_posted.popitem(last=False)
            measurement = measurement_document(uplink, source)
            if measurement is not None:
                await self._client.call(
                    "POST", "/measurement/measurements", "measurement", measurement
                )
        except PermanentSinkError:
            # Most often the device was deleted in Cumulocity (the source is unknown):
            # the next uplink looks it up again instead of failing the same way forever.
            self._devices.forget(uplink.dev_eui)
            self._event_posted.pop(delivery.id, None)
            raise
        self._event_posted.pop(delivery.id, None)
