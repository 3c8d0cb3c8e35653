"""The managed object of each device: cached, found by its `c8y_Serial` external id, or
created and bound (when `createDevices`)."""

from __future__ import annotations

from iotflow.errors import PermanentSinkError, SinkError
from iotflow.formats import Uplink
from iotflow.sinks.cumulocity.client import CumulocityClient, id_of, managed_object_id
from iotflow.sinks.cumulocity.documents import SERIAL_TYPE, device_document
from iotflow.telemetry.logging import get_logger

log = get_logger("iotflow.sinks")


class Devices:
    """DevEUI → managed object id, for one connection."""

    def __init__(
        self, connection_id: str, client: CumulocityClient, *, create_devices: bool
    ) -> None:
        self._id = connection_id
        self._client = client
        self._create = create_devices
        # DevEUI → managed object id. Lost at restart on purpose: a lookup is one GET, and
        # the tenant is the authority (a device deleted there is found missing again).
        self._devices: dict[str, str] = {}
        # DevEUI → a managed object we created whose external id is not registered yet: a
        # retry binds that one instead of creating a second device.
        self._unbound: dict[str, str] = {}

    def seen(self) -> list[tuple[str, str]]:
        """(DevEUI, managed object id) of every device found since start."""
        return list(self._devices.items())

    def forget(self, dev_eui: str) -> None:
        self._devices.pop(dev_eui, None)

    async def of(self, uplink: Uplink) -> str:
        """The managed object id of the uplink's device: cached, found, or created."""
        dev_eui = uplink.dev_eui
        cached = self._devices.get(dev_eui)
        if cached is not None:
            return cached
        found = await self._lookup(dev_eui)
        if found is None:
            if not self._create:
                # Not retried: it will not change by itself. The worker records it in the
                # connection's event log and the log, which is how the product reports it.
                raise PermanentSinkError(
                    f"device {dev_eui} is not registered in Cumulocity (no {SERIAL_TYPE}"
                    " external id) and createDevices is false: uplink skipped"
                )
            found = await self._register(uplink)
            log.info("Cumulocity device created", connection=self._id, devEUI=dev_eui, device=found)
        self._devices[dev_eui] = found
        return found

    async def _lookup(self, dev_eui: str) -> str | None:
        response = await self._client.call(
            "GET", f"/identity/externalIds/{SERIAL_TYPE}/{dev_eui}", "externalid", missing_ok=True
        )
        if response.status == 404:
            return None
        return managed_object_id(response.body, "external id")

    async def _register(self, uplink: Uplink) -> str:
        dev_eui = uplink.dev_eui
        device = self._unbound.get(dev_eui)
        if device is None:
            created = await self._client.call(
                "POST", "/inventory/managedObjects", "managedobject", device_document(uplink)
            )
            device = id_of(created.body, "managed object")
            self._unbound[dev_eui] = device
        try:
            await self._client.call(
                "POST",
                f"/identity/globalIds/{device}/externalIds",
                "externalid",
                {"externalId": dev_eui, "type": SERIAL_TYPE},
            )
        except PermanentSinkError as exc:
            # Ours cannot be bound: left there, it would be a device without an identity,
            # and the next uplink would make another one.
            self._unbound.pop(dev_eui, None)
            await self._discard(device)
            if exc.status != 409:
                raise
            # 409: someone bound this DevEUI meanwhile (another connection to the same
            # tenant). Theirs wins.
            existing = await self._lookup(dev_eui)
            if existing is None:
                raise
            return existing
        self._unbound.pop(dev_eui, None)
        return device

    async def _discard(self, device: str) -> None:
        try:
            await self._client.call(
                "DELETE", f"/inventory/managedObjects/{device}", "managedobject", missing_ok=True
            )
        except SinkError as exc:
            log.warning(
                "Duplicate Cumulocity device left behind",
                connection=self._id,
                device=device,
                error=str(exc),
            )
