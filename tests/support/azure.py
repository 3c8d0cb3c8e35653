"""A local Azure IoT Hub: its identity registry (REST) and its device MQTT endpoint.

Behaves as Azure's public documentation says ("Control access to IoT Hub with shared access
signatures", "Communicate with an IoT hub using the MQTT protocol", the registry's REST
reference "Devices - Create Or Update Identity" / "Get Identity", "IoT Hub quotas and
throttling"):

- SAS tokens are `SharedAccessSignature sr=...&sig=...&se=...[&skn=...]`; `sig` must be
  the base64 HMAC-SHA256, keyed with the base64-decoded key, of `{sr}\\n{se}` (sr as
  sent, URL-encoded); `se` must be in the future; `sr` must name the resource. The
  registry takes tokens of its shared access policy (`skn`), a device's MQTT login tokens
  of that device's own key.
- Registry: `PUT /devices/{id}?api-version=...` creates an identity (keys generated
  unless given) and answers 200 with it; an existing one without `If-Match` is 409
  `DeviceAlreadyExists`; `GET` answers 200 or 404 `DeviceNotFound`; a bad token is 401
  `IotHubUnauthorizedAccess`; past `quota` requests, 429 `ThrottlingException`. Error
  bodies are `{"Message": "ErrorCode:<code>;<text>", "ExceptionMessage": "..."}`.
- MQTT (TLS): client id = device id, user name `{hub}/{id}/?api-version=...`, password
  the device token; anything else is refused with CONNACK 5 (not authorized), and a
  throttled hub answers CONNACK 3 (server unavailable). Behind the login check (the
  suite's fault proxy, `support.mqttproxy`) a real Mosquitto does the MQTT: devices
  publish to `devices/{id}/messages/events/...`, and cloud-to-device messages are
  published to `devices/{id}/messages/devicebound/...` for them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import ssl
import struct
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import aiomqtt
import orjson
from aiohttp import web

from .mosquitto import Mosquitto
from .mqttproxy import MqttFaultProxy
from .tls import Pki

HOST = "127.0.0.1"
HUB = "iotflow-test.azure-devices.net"
POLICY = "iothubowner"


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def check_token(token: str, resource: str, keys: dict[str | None, str], now: float) -> str | None:
    """Why `token` does not grant `resource` (None: it does). `keys`: policy name (None for
    a device's own key) → base64 key."""
    if not token.startswith("SharedAccessSignature "):
        return "not a SharedAccessSignature"
    raw = token.removeprefix("SharedAccessSignature ")
    fields = dict(part.split("=", 1) for part in raw.split("&") if "=" in part)
    if not {"sr", "sig", "se"} <= set(fields):
        return "sr, sig and se are required"
    if not fields["se"].isdigit() or int(fields["se"]) <= now:
        return "expired"
    if unquote(fields["sr"]).lower() != resource.lower():
        return f"the token is for {unquote(fields['sr'])!r}"
    policy = unquote(fields["skn"]) if "skn" in fields else None
    key = keys.get(policy)
    if key is None:
        return f"unknown policy {policy!r}"
    expected = hmac.new(
        base64.b64decode(key), f"{fields['sr']}\n{fields['se']}".encode(), hashlib.sha256
    ).digest()
    if not hmac.compare_digest(base64.b64decode(unquote(fields["sig"])), expected):
        return "bad signature"
    return None


def _error(status: int, code: str, text: str) -> web.Response:
    body = {
        "Message": f"ErrorCode:{code};{text}",
        "ExceptionMessage": f"Tracking ID:{os.urandom(8).hex()}",
    }
    return web.json_response(body, status=status)


def parse_connect(packet: bytes) -> tuple[str, str | None, str | None]:
    """Client id, user name and password of an MQTT 3.1.1 CONNECT packet."""
    i = 1
    while packet[i] & 0x80:  # the remaining length's bytes
        i += 1
    i += 1

    def string(at: int) -> tuple[str, int]:
        (length,) = struct.unpack(">H", packet[at : at + 2])
        return packet[at + 2 : at + 2 + length].decode(), at + 2 + length

    _, i = string(i)  # protocol name
    flags = packet[i + 1]
    i += 4  # level, flags, keep alive
    client_id, i = string(i)
    if flags & 0x04:  # will topic and message
        _, i = string(i)
        _, i = string(i)
    username = password = None
    if flags & 0x80:
        username, i = string(i)
    if flags & 0x40:
        password, i = string(i)
    return client_id, username, password


class FakeIotHub:
    def __init__(self, pki: Pki, *, quota: int | None = None) -> None:
        self.hub = HUB
        self.policy_key = new_key()
        self.pki = pki
        self.quota = quota  # registry requests answered before 429s start
        self.broker = Mosquitto()
        self.proxy: MqttFaultProxy | None = None
        self.devices: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, int]] = []  # method, device, status
        self.connects: list[tuple[str, int]] = []  # client id, CONNACK code
        self.received: list[tuple[str, bytes]] = []  # D2C: topic, body
        self.throttle_connects = 0  # next MQTT logins answered CONNACK 3
        self._fail: list[tuple[str, int, dict[str, str]]] = []
        self._held = asyncio.Event()
        self._held.set()
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._collector: asyncio.Task[None] | None = None
        self.registry_port = 0

    @property
    def registry_url(self) -> str:
        return f"http://{HOST}:{self.registry_port}"

    @property
    def mqtt_endpoint(self) -> str:
        assert self.proxy is not None
        return f"{HOST}:{self.proxy.port}"

    async def start(self) -> None:
        await asyncio.to_thread(self.broker.start)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with tempfile.TemporaryDirectory() as directory:
            _, cert, key = self.pki.write_broker_files(Path(directory))
            context.load_cert_chain(cert, key)
        self.proxy = MqttFaultProxy(self.broker.port, ssl_context=context, authorize=self._login)
        await self.proxy.start()
        app = web.Application()
        app.router.add_route("*", "/devices/{id}", self._device)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, 0)
        await site.start()
        self.registry_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        subscribed = asyncio.Event()
        self._collector = asyncio.create_task(self._collect(subscribed))
        async with asyncio.timeout(10):
            await subscribed.wait()

    async def stop(self) -> None:
        self._held.set()
        if self._collector is not None:
            self._collector.cancel()
            await asyncio.gather(self._collector, return_exceptions=True)
        if self.proxy is not None:
            await self.proxy.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        await asyncio.to_thread(self.broker.stop)

    # -- what a test does ------------------------------------------------------------------

    def fail_next(
        self, status: int, headers: dict[str, str] | None = None, method: str = ""
    ) -> None:
        """The next registry request (of `method`, any when empty) answers `status`."""
        self._fail.append((method, status, headers or {}))

    def hold(self) -> None:
        self._held.clear()

    def release(self) -> None:
        self._held.set()

    def add_device(self, device_id: str) -> dict[str, Any]:
        identity = self._identity(device_id, {})
        self.devices[device_id] = identity
        return identity

    async def send_c2d(self, device_id: str, body: Any) -> None:
        """A cloud-to-device message, as the hub delivers it to the device's subscription."""
        to = quote(f"/devices/{device_id}/messages/deviceBound", safe="")
        topic = (
            f"devices/{device_id}/messages/devicebound/%24.mid={os.urandom(4).hex()}&%24.to={to}"
        )
        async with aiomqtt.Client(HOST, self.broker.port) as client:
            await client.publish(topic, orjson.dumps(body), qos=1)

    async def wait_received(self, count: int, timeout: float = 20) -> list[tuple[str, bytes]]:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.received) >= count)
        return list(self.received)

    async def wait_requests(self, count: int, timeout: float = 20) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.requests) >= count)

    # -- the registry ----------------------------------------------------------------------

    def _identity(self, device_id: str, given: dict[str, Any]) -> dict[str, Any]:
        keys = (given.get("authentication") or {}).get("symmetricKey") or {}
        return {
            "deviceId": device_id,
            "generationId": os.urandom(8).hex(),
            "etag": base64.b64encode(os.urandom(6)).decode(),
            "status": "enabled",
            "connectionState": "Disconnected",
            "authentication": {
                "type": "sas",
                "symmetricKey": {
                    "primaryKey": keys.get("primaryKey") or new_key(),
                    "secondaryKey": keys.get("secondaryKey") or new_key(),
                },
                "x509Thumbprint": {"primaryThumbprint": None, "secondaryThumbprint": None},
            },
            "capabilities": {"iotEdge": False},
        }

    async def _device(self, request: web.Request) -> web.StreamResponse:
        device_id = request.match_info["id"]
        response = await self._answer(request, device_id)
        async with self._changed:
            self.requests.append((request.method, device_id, response.status))
            self._changed.notify_all()
        return response

    async def _answer(self, request: web.Request, device_id: str) -> web.Response:
        await self._held.wait()
        for i, (method, status, headers) in enumerate(self._fail):
            if method in ("", request.method):
                del self._fail[i]
                response = _error(status, "InjectedFault", f"status {status}")
                response.headers.update(headers)
                return response
        if "api-version" not in request.query:
            return _error(400, "InvalidProtocolVersion", "api-version is required")
        why = check_token(
            request.headers.get("Authorization", ""),
            self.hub,
            {POLICY: self.policy_key},
            time.time(),
        )
        if why is not None:
            return _error(401, "IotHubUnauthorizedAccess", f"Unauthorized: {why}")
        if self.quota is not None:
            if self.quota <= 0:
                return _error(429, "ThrottlingException", "Rate limit exceeded")
            self.quota -= 1
        if request.method == "GET":
            identity = self.devices.get(device_id)
            if identity is None:
                return _error(404, "DeviceNotFound", f"Device {device_id} not registered")
            return web.json_response(identity)
        if request.method == "PUT":
            try:
                given = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                return _error(400, "ArgumentInvalid", "the body is not JSON")
            if not isinstance(given, dict) or given.get("deviceId") != device_id:
                return _error(400, "ArgumentInvalid", "deviceId must be the one of the path")
            if device_id in self.devices and "If-Match" not in request.headers:
                return _error(
                    409,
                    "DeviceAlreadyExists",
                    f"A device with ID '{device_id}' is already registered",
                )
            self.devices[device_id] = self._identity(device_id, given)
            return web.json_response(self.devices[device_id])
        return _error(405, "MethodNotAllowed", request.method)

    # -- MQTT ------------------------------------------------------------------------------

    def _login(self, connect: bytes) -> int:
        code = self._login_code(connect)
        client_id = parse_connect(connect)[0]
        self.connects.append((client_id, code))
        return code

    def _login_code(self, connect: bytes) -> int:
        if self.throttle_connects > 0:
            self.throttle_connects -= 1
            return 3
        client_id, username, password = parse_connect(connect)
        identity = self.devices.get(client_id)
        if identity is None or password is None:
            return 5
        if not (username or "").startswith(f"{self.hub}/{client_id}/?api-version="):
            return 5
        keys = identity["authentication"]["symmetricKey"]
        for key in (keys["primaryKey"], keys["secondaryKey"]):
            if (
                check_token(password, f"{self.hub}/devices/{client_id}", {None: key}, time.time())
                is None
            ):
                return 0
        return 5

    async def _collect(self, subscribed: asyncio.Event) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async with aiomqtt.Client(HOST, self.broker.port) as client:
                await client.subscribe("devices/+/messages/events/#", qos=1)
                subscribed.set()
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    async with self._changed:
                        self.received.append((message.topic.value, message.payload))
                        self._changed.notify_all()
