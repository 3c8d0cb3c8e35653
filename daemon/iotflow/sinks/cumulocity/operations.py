"""Cumulocity operations as downlinks: polled for the devices a connection has seen, every
`operationsPollInterval` (docs/cumulocity.md "Downlinks")."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from typing import Any

from iotflow.downlinks import DownlinkHandler, DownlinkRejected, DownlinkRequest
from iotflow.errors import PermanentSinkError, RegistryError, SinkError
from iotflow.sinks.base import MAX_ERROR_BODY
from iotflow.sinks.cumulocity.client import CumulocityClient
from iotflow.sinks.cumulocity.documents import COMMAND_FRAGMENT, DOWNLINK_FRAGMENT
from iotflow.sinks.cumulocity.registration import Devices
from iotflow.telemetry.logging import get_logger

log = get_logger("iotflow.sinks")

OPERATIONS_PAGE = 100  # pending operations read per device and round
_COMMAND = re.compile(r"^\s*(?:(?P<port>[0-9]{1,3})\s*:)?\s*(?P<hex>[0-9A-Fa-f\s]*?)\s*$")
# DownlinkRejected reasons that say "not now" rather than "never" (the source broker is
# away): the operation goes back to PENDING instead of FAILED.
_TRANSIENT_REJECTIONS = frozenset({"not_connected"})


class Operations:
    """Polls one connection's pending operations and hands the downlinks over."""

    def __init__(
        self,
        connection_id: str,
        client: CumulocityClient,
        devices: Devices,
        downlink: DownlinkHandler,
        *,
        interval: float,
        default_port: int | None,
    ) -> None:
        self._id = connection_id
        self._client = client
        self._devices = devices
        self._downlink = downlink
        self._interval = interval
        self._default_port = default_port
        self._poll_error: str | None = None

    async def run(self) -> None:
        while True:
            try:
                await self.poll_operations()
            except SinkError as exc:
                if self._poll_error != str(exc):
                    log.warning(
                        "Cumulocity operations poll failed", connection=self._id, error=str(exc)
                    )
                self._poll_error = str(exc)
            except Exception as exc:
                # A bug must not end downlinks for the life of the connection.
                log.exception(
                    "Cumulocity operations poll crashed", connection=self._id, error=str(exc)
                )
                self._poll_error = str(exc)
            else:
                if self._poll_error is not None:
                    log.info("Cumulocity operations poll recovered", connection=self._id)
                self._poll_error = None
            await asyncio.sleep(self._interval)

    async def poll_operations(self) -> None:
        """One round: the pending operations of every device seen, oldest first.

        Only devices seen since start are polled: a LoRaWAN class A device can only receive
        after it transmits, so an operation for a device not seen yet waits (PENDING) in
        Cumulocity for its next uplink, which adds it here.
        """
        for dev_eui, device in self._devices.seen():
            response = await self._client.call(
                "GET",
                "/devicecontrol/operations",
                "operationcollection",
                params={"deviceId": device, "status": "PENDING", "pageSize": str(OPERATIONS_PAGE)},
            )
            operations = response.body.get("operations") if isinstance(response.body, dict) else []
            for operation in operations if isinstance(operations, list) else []:
                # A postponed operation holds back the device's later ones: their order
                # is the order the user gave the commands in.
                if isinstance(operation, dict) and not await self._execute(dev_eui, operation):
                    break

    async def _execute(self, dev_eui: str, operation: dict[str, Any]) -> bool:
        """Carry out one operation if it is a downlink; False when it was postponed."""
        operation_id = operation.get("id")
        parsed = downlink_request(operation, dev_eui, self._default_port)
        if parsed is None or not isinstance(operation_id, str):
            return True  # not a downlink: for whichever agent handles that kind of operation
        # EXECUTING first: a crash after the downlink left must not send it again at the
        # next start (a command repeated to a device can do harm); such an operation stays
        # EXECUTING for an operator to look at.
        if not await self._set_status(operation_id, "EXECUTING"):
            return True
        if isinstance(parsed, str):
            await self._set_status(operation_id, "FAILED", parsed)
            return True
        try:
            await self._downlink(self._id, parsed)
        except DownlinkRejected as exc:
            if exc.reason in _TRANSIENT_REJECTIONS:
                return await self._postpone(operation_id, dev_eui, exc.message)
            await self._set_status(operation_id, "FAILED", exc.message)
            return True
        except RegistryError as exc:
            # Nothing was sent (the downlink path says so of its registry's failures).
            return await self._postpone(operation_id, dev_eui, str(exc))
        except Exception as exc:
            log.exception(
                "Downlink path failed", connection=self._id, devEUI=dev_eui, error=str(exc)
            )
            await self._set_status(operation_id, "FAILED", f"downlink path error: {exc}")
            return True
        log.debug(
            "Cumulocity operation sent as a downlink",
            connection=self._id,
            devEUI=dev_eui,
            operation=operation_id,
        )
        await self._set_status(operation_id, "SUCCESSFUL")
        return True

    async def _postpone(self, operation_id: str, dev_eui: str, reason: str) -> bool:
        """Not now, not never: back to PENDING, for the next round. Returns False."""
        log.info(
            "Downlink postponed",
            connection=self._id,
            devEUI=dev_eui,
            operation=operation_id,
            error=reason,
        )
        await self._set_status(operation_id, "PENDING")
        return False

    async def _set_status(self, operation_id: str, status: str, reason: str | None = None) -> bool:
        body: dict[str, Any] = {"status": status}
        if reason is not None:
            body["failureReason"] = reason[:MAX_ERROR_BODY]
        try:
            await self._client.call(
                "PUT", f"/devicecontrol/operations/{operation_id}", "operation", body
            )
        except PermanentSinkError as exc:
            # Gone, or moved on by someone else: not ours to carry out.
            log.warning(
                "Cumulocity operation not updated",
                connection=self._id,
                operation=operation_id,
                status=status,
                error=str(exc),
            )
            return False
        return True


def downlink_request(
    operation: Mapping[str, Any], dev_eui: str, default_port: int | None
) -> DownlinkRequest | str | None:
    """The downlink an operation asks for; a string says why it is malformed; None: the
    operation is not a downlink.

    `c8y_LoRaDownlink: {"fPort": 2, "payloadHex": "01ff", "confirmed": false}` wins over
    `c8y_Command: {"text": "2:01ff"}`; without a port, `downlinkPort` is used.
    """
    correlation = operation.get("id")
    correlation_id = str(correlation) if correlation is not None else None
    fragment = operation.get(DOWNLINK_FRAGMENT)
    if isinstance(fragment, dict):
        port: Any = fragment.get("fPort", default_port)
        payload_hex = fragment.get("payloadHex")
        confirmed = fragment.get("confirmed", False)
        if not isinstance(payload_hex, str):
            return f"{DOWNLINK_FRAGMENT}.payloadHex must be a string of hex digits"
        if not isinstance(confirmed, bool):
            return f"{DOWNLINK_FRAGMENT}.confirmed must be true or false"
        if isinstance(port, str) and port.isdigit():
            port = int(port)
    else:
        command = operation.get(COMMAND_FRAGMENT)
        if not isinstance(command, dict):
            return None
        text = command.get("text")
        match = _COMMAND.match(text) if isinstance(text, str) else None
        if match is None:
            return f"{COMMAND_FRAGMENT} text must be '<fport>:<hex payload>', e.g. '2:01ff'"
        port = int(match["port"]) if match["port"] else default_port
        payload_hex = match["hex"]
        confirmed = False
    if port is None:
        return "no FPort: give one ('<fport>:<hex>') or set downlinkPort on the connection"
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 223:
        return f"FPort must be an integer from 1 to 223, not {port!r}"
    try:
        payload = bytes.fromhex(payload_hex)
    except ValueError:
        return f"payload is not hex digits: {payload_hex[:40]!r}"
    if not payload:
        return "the payload is empty"
    return DownlinkRequest(
        dev_eui=dev_eui,
        f_port=port,
        payload=payload,
        confirmed=confirmed,
        correlation_id=correlation_id,
    )
