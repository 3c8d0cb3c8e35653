"""`actility-azure-iot`: Azure IoT Hub over MQTT, one device identity (and session) per DevEUI.

As Azure documents its MQTT support ("Communicate with an IoT hub using the MQTT protocol"):

- A device connects on its own: MQTT 3.1.1 over TLS on port 8883, client id = device id,
  user name `{hostName}/{deviceId}/?api-version=2021-04-12`, password a SAS token for the
  resource `{hostName}/devices/{deviceId}` signed with the device's key.
- Device-to-cloud: QoS 1 PUBLISH to `devices/{deviceId}/messages/events/` (with the
  content type and encoding as system properties, so that hub routing can read the JSON).
- Cloud-to-device: SUBSCRIBE to `devices/{deviceId}/messages/devicebound/#`; each message
  is a downlink of that device.

Device identities live in the hub's identity registry (REST, `PUT/GET
/devices/{id}?api-version=2021-04-12`, authorized with a SAS token of the connection's
shared access policy, `skn={sharedAccessKeyName}`). At a device's first uplink its identity
is created (`createDevices`) or read; the device's primary key signs its MQTT tokens.

Sessions: Azure wants one connection per device, and a hub limits connections, so the
sessions of a connection are an LRU of at most `maxDeviceSessions`: the least recently used
one is closed when another device needs one. A device whose session was closed gets a new
one at its next uplink; cloud-to-device messages wait in the hub's per-device queue
meanwhile (Azure keeps them up to its TTL), and a class A device listens only after an
uplink anyway. Tokens last TOKEN_LIFETIME; a session whose token is near its end is
replaced at its next uplink (Azure disconnects a session when its token expires).

Throttling: a registry 429 (ThrottlingException) is a RetryableSinkError with the
`Retry-After` it gave, a refused or dropped MQTT connection (CONNACK 3, a disconnect) a
RetryableSinkError: the worker's backoff spaces the attempts.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from iotflow.connectors.azure import AzureConfig
from iotflow.errors import PermanentSinkError, RetryableSinkError
from iotflow.sinks.base import MAX_ERROR_BODY, SinkContext, classify_http, parse_retry_after
from iotflow.sinks.mqtt import Endpoint, MqttSession, TlsMaterial, split_host_port
from iotflow.sinks.mqtt.sink import UplinkMessage, reconnect_cap
from iotflow.sinks.mqtt.topics import DownlinkTopic
from iotflow.sinks.webapi import transport_error
from iotflow.spool import Delivery
from iotflow.telemetry.logging import get_logger

log = get_logger("iotflow.sinks")

API_VERSION = "2021-04-12"
MQTT_TLS_PORT = 8883
TOKEN_LIFETIME = 3600.0  # seconds a SAS token is valid
TOKEN_MARGIN = 300.0  # a token with less left is renewed before use
# System properties of a D2C message, URL-encoded in its topic: JSON, UTF-8.
D2C_PROPERTIES = "$.ct=application%2Fjson&$.ce=utf-8"


def sas_token(resource: str, key: str, expiry: int, policy: str | None = None) -> str:
    """A shared access signature for `resource` (Azure IoT Hub, "Security tokens").

    `sig` is the HMAC-SHA256, keyed with the base64-decoded key, of the URL-encoded resource
    URI, a line feed and the expiry (seconds since the epoch), base64- then URL-encoded.
    """
    encoded = quote(resource, safe="")
    digest = hmac.new(
        base64.b64decode(key), f"{encoded}\n{expiry}".encode(), hashlib.sha256
    ).digest()
    token = (
        f"SharedAccessSignature sr={encoded}"
        f"&sig={quote(base64.b64encode(digest).decode(), safe='')}&se={expiry}"
    )
    return f"{token}&skn={quote(policy, safe='')}" if policy else token


class Registry:
    """The hub's identity registry: device keys, creating the identity when asked."""

    def __init__(self, config: AzureConfig, timeout: float) -> None:
        self._config = config
        self._base = (config.registryURL or f"https://{config.hostName}").rstrip("/")
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._token: tuple[str, float] | None = None  # (token, expiry)
        self._keys: dict[str, str] = {}
        self._lock = asyncio.Lock()

    def _authorization(self) -> str:
        now = time.time()
        if self._token is None or self._token[1] - now < TOKEN_MARGIN:
            expiry = int(now + TOKEN_LIFETIME)
            key = self._config.sharedAccessKey.get_secret_value()
            token = sas_token(self._config.hostName, key, expiry, self._config.sharedAccessKeyName)
            self._token = (token, expiry)
        return self._token[0]

    async def device_key(self, device_id: str) -> str:
        """The device's primary key, its identity created first when `createDevices`."""
        known = self._keys.get(device_id)
        if known is not None:
            return known
        async with self._lock:
            if device_id not in self._keys:
                self._keys[device_id] = await self._fetch(device_id)
        return self._keys[device_id]

    async def _fetch(self, device_id: str) -> str:
        if self._config.createDevices:
            status, body = await self._call("PUT", device_id, {"deviceId": device_id})
            if status == 200:
                log.info("Device identity created", device=device_id, hub=self._config.hostName)
                return _primary_key(body, device_id)
            if status != 409:  # 409 DeviceAlreadyExists: read it below
                self._raise(status, body)
        status, body = await self._call("GET", device_id)
        if status == 404:
            raise PermanentSinkError(
                f"device {device_id} is not in the hub's identity registry"
                " (createDevices is false)",
                status=404,
                body=_text(body),
            )
        if status != 200:
            self._raise(status, body)
        return _primary_key(body, device_id)

    async def _call(
        self, method: str, device_id: str, document: Any = None
    ) -> tuple[int, tuple[Any, float | None]]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        url = f"{self._base}/devices/{quote(device_id, safe='')}?api-version={API_VERSION}"
        headers = {"Authorization": self._authorization(), "Accept": "application/json"}
        try:
            async with self._session.request(
                method, url, json=document, headers=headers, allow_redirects=False
            ) as response:
                text = await response.text()
                retry_after = parse_retry_after(response.headers.get("Retry-After"), time.time())
                return response.status, (text, retry_after)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise transport_error(exc, self._timeout, f"{method} /devices") from None

    @staticmethod
    def _raise(status: int, body: tuple[Any, float | None]) -> None:
        text, retry_after = body
        classify_http(status, str(text)[:MAX_ERROR_BODY], retry_after)
        raise RetryableSinkError(f"HTTP {status}", status=status)  # a 2xx we cannot read

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _primary_key(body: tuple[Any, float | None], device_id: str) -> str:
    try:
        document = orjson.loads(body[0])
        key = document["authentication"]["symmetricKey"]["primaryKey"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        key = None
    if not isinstance(key, str) or not key:
        # An identity authenticated by X.509 (or a malformed answer): no key to sign with.
        raise PermanentSinkError(f"device {device_id} has no symmetric key in the registry")
    return key


def _text(body: tuple[Any, float | None]) -> str:
    return str(body[0])[:MAX_ERROR_BODY]


@dataclass(slots=True)
class _Device:
    session: MqttSession
    expires: float  # when its token ends


class AzureSink:
    """`actility-azure-iot`: see the module docstring."""

    def __init__(self, connection_id: str, config: AzureConfig, context: SinkContext) -> None:
        self.connection_id = connection_id
        self._config = config
        self._context = context
        self._problem: PermanentSinkError | None = None
        try:
            host, port = split_host_port(config.mqttEndpoint or config.hostName, MQTT_TLS_PORT)
        except ValueError as exc:
            self._problem = PermanentSinkError(f"mqttEndpoint: {exc}")
            host, port = config.hostName, 0
        self.endpoint = Endpoint(host, port, tls=True)
        self.registry = Registry(config, context.timeout)
        self._message = UplinkMessage(config, "devices")  # the body; the topic is Azure's
        self.devices: OrderedDict[str, _Device] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()
        self._started = False
        self._closed = False

    async def start(self) -> None:
        self._started = True

    async def healthcheck(self) -> bool:
        return (
            self._started
            and not self._closed
            and any(d.session.connected for d in self.devices.values())
        )

    async def close(self) -> None:
        self._closed = True
        devices, self.devices = list(self.devices.values()), OrderedDict()
        await asyncio.gather(*(d.session.close() for d in devices), return_exceptions=True)
        await asyncio.gather(*self._closing, return_exceptions=True)
        await self.registry.close()

    async def send(self, delivery: Delivery) -> None:
        if not self._started or self._closed:
            raise RetryableSinkError("the sink is closed" if self._started else "not started")
        if self._problem is not None:
            raise PermanentSinkError(str(self._problem))
        _, body = self._message.render(delivery)
        device_id = delivery.dev_eui.upper()  # Azure's ids are case-sensitive: DevEUIs upper
        key = await self.registry.device_key(device_id)
        if self._closed:
            raise RetryableSinkError("the sink is closed")
        session = self._session(device_id, key)
        session.raise_if_broken()
        await session.publish(f"devices/{device_id}/messages/events/{D2C_PROPERTIES}", body)

    def _session(self, device_id: str, key: str) -> MqttSession:
        """The device's session, most recently used; a new one when it has none or its
        token is ending; the least recently used closed past `maxDeviceSessions`."""
        now = time.time()
        device = self.devices.get(device_id)
        if device is not None and device.expires - now < TOKEN_MARGIN:
            self._retire(self.devices.pop(device_id))
            device = None
        if device is None:
            expiry = int(now + TOKEN_LIFETIME)
            device = _Device(self._new_session(device_id, key, expiry), expiry)
            self.devices[device_id] = device
            while len(self.devices) > self._config.maxDeviceSessions:
                _, oldest = self.devices.popitem(last=False)
                self._retire(oldest)
        self.devices.move_to_end(device_id)
        return device.session

    def _new_session(self, device_id: str, key: str, expiry: int) -> MqttSession:
        resource = f"{self._config.hostName}/devices/{device_id}"
        config = self._config
        downlinks = None
        if config.downlinkEnabled:
            downlinks = DownlinkTopic("devices/{DevEUI}/messages/devicebound/#")
            downlinks.filter = f"devices/{device_id}/messages/devicebound/#"  # its own only
        session = MqttSession(
            self.connection_id,
            self._context,
            endpoint=self.endpoint,
            client_id=device_id,
            reconnect_cap=reconnect_cap(config),
            qos=1,
            username=f"{config.hostName}/{device_id}/?api-version={API_VERSION}",
            password=sas_token(resource, key, expiry),
            tls=TlsMaterial(trusted_ca=config.trustedCaCertficate),
            downlinks=downlinks,
            downlink_port=config.downlinkPort,
            shares_subscriptions=False,  # IoT Hub has no shared subscriptions
        )
        session.start()
        return session

    def _retire(self, device: _Device) -> None:
        task = asyncio.get_running_loop().create_task(device.session.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
