"""`actility-cumulocity-iot`: uplinks become Cumulocity events and measurements of a device
found (or created) by its DevEUI; Cumulocity operations become downlinks.

One keep-alive aiohttp session per connection, HTTP Basic `{tenantId}/{username}`. The REST
resources used, as Cumulocity's reference documents them (guides/reference: identity,
inventory, events, measurements, device-control, rest-implementation):

- `GET  /identity/externalIds/c8y_Serial/{DevEUI}` — the device's managed object (404: none)
- `POST /inventory/managedObjects` and `POST /identity/globalIds/{id}/externalIds` — create
  and bind it (when `createDevices`)
- `POST /event/events`, `POST /measurement/measurements` — one of each per uplink
- `GET  /devicecontrol/operations?deviceId=…&status=PENDING`, `PUT /devicecontrol/operations/{id}`
  — downlinks, polled for the devices this connection has seen

The mapping and the decisions behind it are in docs/cumulocity.md.
"""

from __future__ import annotations

import asyncio
import base64
import math
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from iotflow import __version__
from iotflow.connectors.cumulocity import CumulocityConfig
from iotflow.downlinks import DownlinkHandler, DownlinkRejected, DownlinkRequest
from iotflow.errors import (
    PermanentSinkError,
    RegistryError,
    Rejection,
    RetryableSinkError,
    SinkError,
)
from iotflow.formats import Uplink, decode
from iotflow.sinks.base import MAX_ERROR_BODY, SinkContext, classify_http, parse_retry_after
from iotflow.spool import Delivery
from iotflow.telemetry.logging import get_logger

log = get_logger("iotflow.sinks.cumulocity")

SERIAL_TYPE = "c8y_Serial"  # the external id type that holds the DevEUI
DEVICE_TYPE = "c8y_LoRaDevice"
UPLINK_TYPE = "c8y_LoRaUplink"  # type of the event and of the measurement of an uplink
SIGNAL_FRAGMENT = "c8y_SignalStrength"  # Cumulocity's own fragment for radio quality
COMMAND_FRAGMENT = "c8y_Command"  # the device shell: text `<fport>:<hex>`
DOWNLINK_FRAGMENT = "c8y_LoRaDownlink"  # structured: {"fPort", "payloadHex", "confirmed"}
SUPPORTED_OPERATIONS = [COMMAND_FRAGMENT, DOWNLINK_FRAGMENT]

POLL_INTERVAL = 10.0  # seconds between two rounds of operation polling
OPERATIONS_PAGE = 100  # pending operations read per device and round

_MEDIA = "application/vnd.com.nsn.cumulocity.{}+json"
_ERROR_MEDIA = _MEDIA.format("error")
# Keys of a measurement that are not fragments: a decoded field of that name is left out.
_RESERVED = frozenset({"id", "self", "source", "type", "time", "creationTime", "lastUpdated"})
_FRAGMENT_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
_COMMAND = re.compile(r"^\s*(?:(?P<port>[0-9]{1,3})\s*:)?\s*(?P<hex>[0-9A-Fa-f\s]*?)\s*$")
_PROGRESS_KEPT = 4096  # deliveries whose event is in Cumulocity while the measurement is not
# DownlinkRejected reasons that say "not now" rather than "never" (the source broker is
# away): the operation goes back to PENDING instead of FAILED.
_TRANSIENT_REJECTIONS = frozenset({"not_connected"})


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: Any  # parsed JSON of a 2xx, else None


class CumulocitySink:
    """One connection's link to a Cumulocity tenant: deliveries out, operations in."""

    def __init__(
        self,
        connection_id: str,
        config: CumulocityConfig,
        context: SinkContext,
        *,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self._id = connection_id
        self._config = config
        self._base = config.base_url
        self._timeout = context.timeout
        self._limit = context.max_in_flight
        self._downlink: DownlinkHandler | None = context.downlink
        self._poll_interval = poll_interval
        self._session: aiohttp.ClientSession | None = None
        self._poller: asyncio.Task[None] | None = None
        # DevEUI → managed object id. Lost at restart on purpose: a lookup is one GET, and
        # the tenant is the authority (a device deleted there is found missing again).
        self._devices: dict[str, str] = {}
        # DevEUI → a managed object we created whose external id is not registered yet: a
        # retry binds that one instead of creating a second device.
        self._unbound: dict[str, str] = {}
        # Delivery id → its event is accepted: a retry after a failed measurement does not
        # post the event twice. Bounded: an expired delivery never comes back to clear it.
        self._event_posted: OrderedDict[int, None] = OrderedDict()
        self._poll_error: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        context: ssl.SSLContext | bool = True
        if self._config.trustedCaCertficate is not None:
            # Only this CA: the connection is pinned to the tenant's private PKI.
            context = ssl.create_default_context(cadata=self._config.trustedCaCertficate)
        connector = aiohttp.TCPConnector(
            # One more than the workers, so that polling never waits behind deliveries.
            limit=self._limit + 1,
            keepalive_timeout=60,
            ssl=context,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            # No X-Cumulocity-Application-Key: requests without it count as the device's
            # own traffic, which keeps the device "available" in Cumulocity.
            headers={
                "Authorization": basic_authorization(
                    f"{self._config.tenantId}/{self._config.username}",
                    self._config.password.get_secret_value(),
                ),
                "User-Agent": f"iotflow/{__version__}",
            },
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        if not self._config.downlinkEnabled:
            log.debug("Cumulocity operations not polled: downlinks disabled", connection=self._id)
        elif self._downlink is None:
            # The operations stay PENDING in Cumulocity, which is the queue they wait in.
            log.info(
                "Cumulocity operations not polled: this daemon has no downlink path",
                connection=self._id,
            )
        else:
            self._poller = asyncio.create_task(self._poll_loop(), name=f"c8y-poll:{self._id}")

    async def healthcheck(self) -> bool:
        return self._session is not None and not self._session.closed

    async def close(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- uplinks ---------------------------------------------------------------------------

    async def send(self, delivery: Delivery) -> None:
        try:
            uplink = decode("actility", delivery.document)
        except Rejection as exc:
            raise PermanentSinkError(f"uplink document unreadable: {exc}") from None
        source = await self._device(uplink)
        try:
            if delivery.id not in self._event_posted:
                await self._call(
                    "POST", "/event/events", "event", body=event_document(uplink, source)
                )
                self._event_posted[delivery.id] = None
                while len(self._event_posted) > _PROGRESS_KEPT:
                    self._event_posted.popitem(last=False)
            measurement = measurement_document(uplink, source)
            if measurement is not None:
                await self._call("POST", "/measurement/measurements", "measurement", measurement)
        except PermanentSinkError:
            # Most often the device was deleted in Cumulocity (the source is unknown):
            # the next uplink looks it up again instead of failing the same way forever.
            self._devices.pop(uplink.dev_eui, None)
            self._event_posted.pop(delivery.id, None)
            raise
        self._event_posted.pop(delivery.id, None)

    async def _device(self, uplink: Uplink) -> str:
        """The managed object id of the uplink's device: cached, found, or created."""
        dev_eui = uplink.dev_eui
        cached = self._devices.get(dev_eui)
        if cached is not None:
            return cached
        found = await self._lookup(dev_eui)
        if found is None:
            if not self._config.createDevices:
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
        response = await self._call(
            "GET", f"/identity/externalIds/{SERIAL_TYPE}/{dev_eui}", "externalid", missing_ok=True
        )
        if response.status == 404:
            return None
        return _managed_object_id(response.body, "external id")

    async def _register(self, uplink: Uplink) -> str:
        dev_eui = uplink.dev_eui
        device = self._unbound.get(dev_eui)
        if device is None:
            created = await self._call(
                "POST", "/inventory/managedObjects", "managedobject", device_document(uplink)
            )
            device = _id_of(created.body, "managed object")
            self._unbound[dev_eui] = device
        try:
            await self._call(
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
            await self._call(
                "DELETE", f"/inventory/managedObjects/{device}", "managedobject", missing_ok=True
            )
        except SinkError as exc:
            log.warning(
                "Duplicate Cumulocity device left behind",
                connection=self._id,
                device=device,
                error=str(exc),
            )

    # -- downlinks -------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
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
            await asyncio.sleep(self._poll_interval)

    async def poll_operations(self) -> None:
        """One round: the pending operations of every device seen, oldest first.

        Only devices seen since start are polled: a LoRaWAN class A device can only receive
        after it transmits, so an operation for a device not seen yet waits (PENDING) in
        Cumulocity for its next uplink, which adds it here.
        """
        for dev_eui, device in list(self._devices.items()):
            response = await self._call(
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
        assert self._downlink is not None
        operation_id = operation.get("id")
        parsed = downlink_request(operation, dev_eui, self._config.downlinkPort)
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
            await self._call("PUT", f"/devicecontrol/operations/{operation_id}", "operation", body)
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

    # -- HTTP ------------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        media: str,
        body: Any = None,
        *,
        params: Mapping[str, str] | None = None,
        missing_ok: bool = False,
    ) -> _Response:
        """One request; a 2xx returns its JSON, anything else raises what it means.

        `media` names the resource's Cumulocity media type, sent as Content-Type and Accept:
        without Accept a POST answers an empty body (and so no id), and some resources
        refuse `application/json` with 406.
        """
        assert self._session is not None, "start() first"
        media_type = _MEDIA.format(media)
        headers = {"Accept": f"{media_type}, {_ERROR_MEDIA}"}
        data = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = media_type
        try:
            async with self._session.request(
                method,
                self._base + path,
                params=params,
                data=data,
                headers=headers,
                allow_redirects=False,
            ) as response:
                status = response.status
                if 200 <= status < 300:
                    return _Response(status, _json(await response.read()))
                text = await _read_text(response)
                retry_after = parse_retry_after(response.headers.get("Retry-After"), time.time())
        except TimeoutError:
            raise RetryableSinkError(
                f"{method} {path}: no answer within {self._timeout:g}s"
            ) from None
        except aiohttp.ClientError as exc:
            # The exception names host and port, never the Authorization header.
            raise RetryableSinkError(f"{method} {path}: {type(exc).__name__}: {exc}") from None
        if status == 404 and missing_ok:
            return _Response(status, None)
        _raise_for(status, text, retry_after, f"{method} {path}")
        raise AssertionError("unreachable: a non-2xx status always raises")


def basic_authorization(login: str, password: str) -> str:
    """HTTP Basic (RFC 7617) in UTF-8; aiohttp's BasicAuth is deprecated and latin-1 only."""
    return "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode("ascii")


def _json(raw: bytes) -> Any:
    # A 2xx whose body is not JSON still happened: retrying a POST would duplicate it.
    # Callers that need the body (an id) fail on None with a message of their own.
    try:
        return orjson.loads(raw) if raw.strip() else None
    except orjson.JSONDecodeError:
        return None


def _raise_for(status: int, text: str, retry_after: float | None, what: str) -> None:
    """classify_http's verdict, with Cumulocity's own words in the message."""
    try:
        classify_http(status, text, retry_after)
    except PermanentSinkError as exc:
        raise PermanentSinkError(
            _message(exc, what, text), status=exc.status, body=exc.body
        ) from None
    except RetryableSinkError as exc:  # and AuthenticationSinkError, its subclass
        raise type(exc)(
            _message(exc, what, text), status=exc.status, body=exc.body, retry_after=retry_after
        ) from None


def _message(exc: SinkError, what: str, text: str) -> str:
    """`HTTP 422 on POST /event/events: undefined/validationError: <Cumulocity's message>`."""
    detail = cumulocity_error(text)
    return f"{exc} on {what}: {detail}" if detail else f"{exc} on {what}"


def cumulocity_error(text: str) -> str | None:
    """`<error>: <message>` of Cumulocity's error body (`{"error", "message", "info"}`)."""
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict):
        return None
    parts = [str(document[k]) for k in ("error", "message") if document.get(k)]
    return ": ".join(parts)[:MAX_ERROR_BODY] or None


async def _read_text(response: aiohttp.ClientResponse) -> str:
    try:
        raw = await response.content.read(MAX_ERROR_BODY * 4)
    except (TimeoutError, aiohttp.ClientError):
        return ""
    return raw.decode("utf-8", "replace")


def _id_of(document: Any, what: str) -> str:
    value = document.get("id") if isinstance(document, dict) else None
    if isinstance(value, str | int) and not isinstance(value, bool):
        return str(value)
    raise PermanentSinkError(f"Cumulocity answered a {what} without an id")


def _managed_object_id(document: Any, what: str) -> str:
    managed = document.get("managedObject") if isinstance(document, dict) else None
    return _id_of(managed, f"{what}'s managed object")


# -- documents (pure) -------------------------------------------------------------------------


def _time(uplink: Uplink) -> str:
    return uplink.time.isoformat(timespec="milliseconds")


def _without_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def device_document(uplink: Uplink) -> dict[str, Any]:
    """The managed object of a new device."""
    return {
        "name": uplink.device_name or uplink.dev_eui,
        "type": DEVICE_TYPE,
        "c8y_IsDevice": {},
        # Cumulocity only accepts operations for a device in an agent's hierarchy; iotflow
        # is the agent of the devices it creates, so each is its own agent.
        "com_cumulocity_model_Agent": {},
        "c8y_SupportedOperations": SUPPORTED_OPERATIONS,
        "c8y_Hardware": {"serialNumber": uplink.dev_eui},
        DEVICE_TYPE: {"devEUI": uplink.dev_eui},
    }


def event_document(uplink: Uplink, source: str) -> dict[str, Any]:
    """The event of an uplink: its frame and radio metadata in the `c8y_LoRaUplink` fragment."""
    radio = uplink.radio
    best = radio.gateways[0] if radio.gateways else None
    payload_hex = uplink.payload.hex()
    # Cumulocity requires a text; what an operator scans in the event list.
    text = " ".join(
        ["LoRa uplink"]
        + ([f"FPort {uplink.f_port}"] if uplink.f_port is not None else [])
        + ([f"FCnt {uplink.f_cnt}"] if uplink.f_cnt is not None else [])
    )
    if payload_hex:
        text += f": {payload_hex}"
    return {
        "source": {"id": source},
        "type": UPLINK_TYPE,
        "time": _time(uplink),
        "text": text,
        UPLINK_TYPE: _without_none(
            {
                "devEUI": uplink.dev_eui,
                "fPort": uplink.f_port,
                "fCnt": uplink.f_cnt,
                "payloadHex": payload_hex,
                "rssi": radio.rssi,
                "snr": radio.snr,
                "sf": radio.spreading_factor,
                "frequency": radio.frequency_mhz,
                "gateway": best.id if best is not None else None,
                "gatewayCount": len(radio.gateways) or None,
                "devAddr": radio.dev_addr,
            }
        ),
    }


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fragment_name(key: str) -> str:
    # Cumulocity refuses dots, `$` and spaces in fragment and series names.
    return _FRAGMENT_UNSAFE.sub("_", key)


def measurement_document(uplink: Uplink, source: str) -> dict[str, Any] | None:
    """The measurement of an uplink, or None when it has no number to carry.

    - RSSI and SNR: Cumulocity's `c8y_SignalStrength` fragment, series `rssi` (dBm) and
      `snr` (dB).
    - Decoded payload: a number `x` becomes fragment `x`, series `x`; an object of numbers
      `x: {a, b}` becomes fragment `x`, series `a` and `b` (the mapping thin-edge.io uses).
      Decoders give no units, so none is sent. Strings, booleans, lists and deeper objects
      are left out (the event keeps the raw payload).
    """
    fragments: dict[str, dict[str, dict[str, Any]]] = {}
    signal: dict[str, dict[str, Any]] = {}
    if uplink.radio.rssi is not None:
        signal["rssi"] = {"value": uplink.radio.rssi, "unit": "dBm"}
    if uplink.radio.snr is not None:
        signal["snr"] = {"value": uplink.radio.snr, "unit": "dB"}
    if signal:
        fragments[SIGNAL_FRAGMENT] = signal
    for key, value in (uplink.decoded or {}).items():
        name = _fragment_name(key)
        if not name or name in _RESERVED:
            continue
        if _number(value):
            fragments.setdefault(name, {})[name] = {"value": value}
        elif isinstance(value, dict):
            for series, inner in value.items():
                series_name = _fragment_name(series)
                if series_name and _number(inner):
                    fragments.setdefault(name, {})[series_name] = {"value": inner}
    if not fragments:
        return None
    return {"source": {"id": source}, "type": UPLINK_TYPE, "time": _time(uplink), **fragments}


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
