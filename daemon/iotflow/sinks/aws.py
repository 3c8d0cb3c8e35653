"""`actility-aws-iot`: the MQTT sink over mutual TLS to AWS IoT Core, paced, things registered.

- Endpoint: `{accountPrefix}.iot.{region}.amazonaws.com`, port 8883 (MQTT over TLS) or 443
  for WSS; `hostName` overrides it (a VPC endpoint, or a local double with a scheme and a
  port: `mqtts://127.0.0.1:18883`, `mqtt://127.0.0.1:1883`). Port 443 without websockets
  offers the ALPN protocol `x-amzn-mqtt-ca`, as AWS requires for client certificates there.
- Trust: `trustedCaCertficate` when given, else Amazon's roots (embedded below: the ATS
  endpoints chain to Amazon Root CA 1 for RSA and Amazon Root CA 3 for ECC).
- WSS: AWS takes websockets with a SigV4-signed URL only (not a client certificate); it is
  signed with `accessKeyId`/`secretAccessKey` at each connection.
- Pacing: AWS IoT allows about 100 publishes a second per connection and throttles (and
  may disconnect) a client that goes faster, so publishes are spaced at that rate.
- `createDevices`: at a device's first uplink the thing is created (CreateThing, named by
  its DevEUI, typed by `deviceType`) and the connection's certificate attached to it
  (AttachThingPrincipal), through the AWS API with boto3, an optional extra
  (`pip install iotflow[aws]`). Registration runs in the background and never holds up or
  fails an uplink; AWS IoT does not need the thing to accept the publish.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import importlib
import math
import threading
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from iotflow.config.types import secret_value
from iotflow.connectors.mqtt import AwsConfig
from iotflow.errors import PermanentSinkError
from iotflow.sinks.base import SinkContext
from iotflow.sinks.mqtt import (
    WEBSOCKET_PATH,
    Endpoint,
    MqttSession,
    Pacer,
    TlsMaterial,
    UplinkMessage,
    default_client_id,
    split_host_port,
)
from iotflow.sinks.mqtt.sink import downlink_topic, reconnect_cap
from iotflow.spool import Delivery
from iotflow.telemetry.logging import get_logger

log = get_logger("iotflow.sinks")

# AWS IoT Core's per-connection limit, "Publish requests per second per connection"
# (AWS IoT Core endpoints and quotas). Evenly spaced: never more than that in any second.
PUBLISH_RATE_PER_SECOND = 100.0
MQTT_TLS_PORT = 8883
HTTPS_PORT = 443
ALPN_MQTT_CLIENT_CERTIFICATE = "x-amzn-mqtt-ca"
SIGNING_SERVICE = "iotdevicegateway"
SIGNATURE_LIFETIME_SECONDS = 86400
# A registration that failed is tried again at the device's next uplink after this long.
REGISTRATION_RETRY_SECONDS = 3600.0

# Public certificates of Amazon Trust Services (also in every trust store, e.g. certifi's).
AMAZON_ROOT_CA_1 = """\
-----BEGIN CERTIFICATE-----
MIIDQTCCAimgAwIBAgITBmyfz5m/jAo54vB4ikPmljZbyjANBgkqhkiG9w0BAQsF
ADA5MQswCQYDVQQGEwJVUzEPMA0GA1UEChMGQW1hem9uMRkwFwYDVQQDExBBbWF6
b24gUm9vdCBDQSAxMB4XDTE1MDUyNjAwMDAwMFoXDTM4MDExNzAwMDAwMFowOTEL
MAkGA1UEBhMCVVMxDzANBgNVBAoTBkFtYXpvbjEZMBcGA1UEAxMQQW1hem9uIFJv
b3QgQ0EgMTCCASIwDQYJKoZIhvcNAQEBBQADggEPADCCAQoCggEBALJ4gHHKeNXj
ca9HgFB0fW7Y14h29Jlo91ghYPl0hAEvrAIthtOgQ3pOsqTQNroBvo3bSMgHFzZM
9O6II8c+6zf1tRn4SWiw3te5djgdYZ6k/oI2peVKVuRF4fn9tBb6dNqcmzU5L/qw
IFAGbHrQgLKm+a/sRxmPUDgH3KKHOVj4utWp+UhnMJbulHheb4mjUcAwhmahRWa6
VOujw5H5SNz/0egwLX0tdHA114gk957EWW67c4cX8jJGKLhD+rcdqsq08p8kDi1L
93FcXmn/6pUCyziKrlA4b9v7LWIbxcceVOF34GfID5yHI9Y/QCB/IIDEgEw+OyQm
jgSubJrIqg0CAwEAAaNCMEAwDwYDVR0TAQH/BAUwAwEB/zAOBgNVHQ8BAf8EBAMC
AYYwHQYDVR0OBBYEFIQYzIU07LwMlJQuCFmcx7IQTgoIMA0GCSqGSIb3DQEBCwUA
A4IBAQCY8jdaQZChGsV2USggNiMOruYou6r4lK5IpDB/G/wkjUu0yKGX9rbxenDI
U5PMCCjjmCXPI6T53iHTfIUJrU6adTrCC2qJeHZERxhlbI1Bjjt/msv0tadQ1wUs
N+gDS63pYaACbvXy8MWy7Vu33PqUXHeeE6V/Uq2V8viTO96LXFvKWlJbYK8U90vv
o/ufQJVtMVT8QtPHRh8jrdkPSHCa2XV4cdFyQzR1bldZwgJcJmApzyMZFo6IQ6XU
5MsI+yMRQ+hDKXJioaldXgjUkK642M4UwtBV8ob2xJNDd2ZhwLnoQdeXeGADbkpy
rqXRfboQnoZsG4q5WTP468SQvvG5
-----END CERTIFICATE-----
"""
AMAZON_ROOT_CA_3 = """\
-----BEGIN CERTIFICATE-----
MIIBtjCCAVugAwIBAgITBmyf1XSXNmY/Owua2eiedgPySjAKBggqhkjOPQQDAjA5
MQswCQYDVQQGEwJVUzEPMA0GA1UEChMGQW1hem9uMRkwFwYDVQQDExBBbWF6b24g
Um9vdCBDQSAzMB4XDTE1MDUyNjAwMDAwMFoXDTQwMDUyNjAwMDAwMFowOTELMAkG
A1UEBhMCVVMxDzANBgNVBAoTBkFtYXpvbjEZMBcGA1UEAxMQQW1hem9uIFJvb3Qg
Q0EgMzBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABCmXp8ZBf8ANm+gBG1bG8lKl
ui2yEujSLtf6ycXYqm0fc4E7O5hrOXwzpcVOho6AF2hiRVd9RFgdszflZwjrZt6j
QjBAMA8GA1UdEwEB/wQFMAMBAf8wDgYDVR0PAQH/BAQDAgGGMB0GA1UdDgQWBBSr
ttvXBp43rDCGB5Fwx5zEGbF4wDAKBggqhkjOPQQDAgNJADBGAiEA4IWSoxe3jfkr
BqWTrBqYaGFy+uGh0PsceGCmQ5nFuMQCIQCcAu/xlJyzlvnrxir4tiz+OpAUFteM
YyRIHN8wfdVoOw==
-----END CERTIFICATE-----
"""
AMAZON_ROOTS = AMAZON_ROOT_CA_1 + AMAZON_ROOT_CA_3

# hostName schemes: (TLS, websockets); None keeps what `protocol` says.
_SCHEMES: dict[str, tuple[bool, bool | None]] = {
    "mqtts": (True, False),
    "ssl": (True, False),
    "tls": (True, False),
    "wss": (True, True),
    "https": (True, None),
    "mqtt": (False, False),
    "tcp": (False, False),
    "ws": (False, True),
    "http": (False, None),
}


# (TLS, websockets) → the port when hostName names none.
_DEFAULT_PORTS = {
    (True, False): MQTT_TLS_PORT,
    (True, True): HTTPS_PORT,
    (False, False): 1883,
    (False, True): 80,
}


def aws_host(config: AwsConfig) -> str:
    """The account's AWS IoT Core data endpoint (the `-ats` prefix is part of accountPrefix)."""
    if not config.accountPrefix:
        raise ValueError("accountPrefix (or hostName) is required")
    return f"{config.accountPrefix}.iot.{config.region}.amazonaws.com"


def aws_endpoint(config: AwsConfig) -> Endpoint:
    """Where the connection's session goes: see the module docstring. ValueError if malformed."""
    tls, websockets = True, config.protocol == "WSS"
    if not config.hostName:
        host, port = aws_host(config), HTTPS_PORT if websockets else MQTT_TLS_PORT
        return Endpoint(host, port, tls=True, websockets=websockets)
    text = config.hostName.strip()
    if "://" in text:
        scheme, _, text = text.partition("://")
        known = _SCHEMES.get(scheme.lower())
        if known is None:
            raise ValueError(f"hostName: unknown scheme {scheme!r} (mqtts, wss, https, mqtt, ws)")
        tls = known[0]
        websockets = known[1] if known[1] is not None else websockets
        text = text.rstrip("/")
    if "/" in text:
        raise ValueError("hostName: a path is not supported")
    host, port = split_host_port(text, _DEFAULT_PORTS[tls, websockets])
    return Endpoint(host, port, tls=tls, websockets=websockets)


def presign_websocket_path(
    host: str,
    region: str,
    access_key: str,
    secret_key: str,
    *,
    now: datetime | None = None,
    path: str = WEBSOCKET_PATH,
    expires: int = SIGNATURE_LIFETIME_SECONDS,
) -> str:
    """`/mqtt?X-Amz-...&X-Amz-Signature=...`: a SigV4 query-signed websocket URL path.

    As AWS IoT documents for MQTT over WebSocket (service `iotdevicegateway`, only the
    host header signed, the payload the hash of nothing).
    """
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    amz_date = moment.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    scope = f"{day}/{region}/{SIGNING_SERVICE}/aws4_request"
    params = {
        "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
        "X-Amz-Credential": f"{access_key}/{scope}",
        "X-Amz-Date": amz_date,
        "X-Amz-Expires": str(expires),
        "X-Amz-SignedHeaders": "host",
    }
    query = "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(params.items())
    )
    canonical = "\n".join(
        ("GET", path, query, f"host:{host}\n", "host", hashlib.sha256(b"").hexdigest())
    )
    to_sign = "\n".join(
        ("AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest())
    )
    key = f"AWS4{secret_key}".encode()
    for part in (day, region, SIGNING_SERVICE, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return f"{path}?{query}&X-Amz-Signature={signature}"


def _boto3() -> Any:
    """boto3 when the `aws` extra is installed, else None (the base install stays small)."""
    try:
        return importlib.import_module("boto3")
    except ImportError:
        return None


class ThingRegistrar:
    """Registers each device as an AWS IoT thing once per process, in the background."""

    _missing_boto3_reported = False  # one warning per process, not per connection

    def __init__(self, connection_id: str, config: AwsConfig) -> None:
        self.connection_id = connection_id
        self._config = config
        self._boto3 = _boto3()
        self._next_try: dict[str, float] = {}  # DevEUI → monotonic time; inf: registered
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: Any = None
        self._principal: str | None = None
        self._lock = threading.Lock()  # registrations run in threads; one client for all
        self.registered = 0  # things this registrar created or found (for tests, metrics)
        self.api_calls = 0

    def offer(self, dev_eui: str) -> None:
        """A device's uplink is about to go out: register it if this is its first."""
        if self._boto3 is None:
            if not ThingRegistrar._missing_boto3_reported:
                ThingRegistrar._missing_boto3_reported = True
                log.warning(
                    "createDevices needs boto3; devices are not registered",
                    connection=self.connection_id,
                    error="install the aws extra: pip install 'iotflow[aws]'",
                )
            return
        now = time.monotonic()
        if self._next_try.get(dev_eui, 0.0) > now:
            return
        self._next_try[dev_eui] = math.inf  # in progress; stays so once registered
        task = asyncio.create_task(self._register(dev_eui), name=f"aws-thing:{dev_eui}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def idle(self) -> None:
        """Wait for the registrations under way (tests; close)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        # A boto3 call in its thread cannot be interrupted; the task stops waiting for it.
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _register(self, dev_eui: str) -> None:
        try:
            await asyncio.to_thread(self._register_blocking, dev_eui)
        except Exception as exc:
            self._next_try[dev_eui] = time.monotonic() + REGISTRATION_RETRY_SECONDS
            # botocore's messages name the operation and AWS's error code, not credentials.
            log.warning(
                "Thing registration failed",
                connection=self.connection_id,
                devEUI=dev_eui,
                error=f"{type(exc).__name__}: {exc}",
            )
        else:
            self.registered += 1
            log.info("Thing registered", connection=self.connection_id, devEUI=dev_eui)

    def _iot(self) -> Any:
        with self._lock:
            if self._client is None:
                config = self._config
                session = self._boto3.session.Session(
                    aws_access_key_id=secret_value(config.accessKeyId),
                    aws_secret_access_key=secret_value(config.secretAccessKey),
                    region_name=config.region,
                )
                # The endpoint is AWS's, or AWS_ENDPOINT_URL_IOT / AWS_ENDPOINT_URL when set
                # (botocore reads them), which is how a local emulator is reached.
                botocore_config = importlib.import_module("botocore.config")
                self._client = session.client(
                    "iot",
                    config=botocore_config.Config(
                        connect_timeout=5, read_timeout=10, retries={"max_attempts": 3}
                    ),
                )
            return self._client

    def _register_blocking(self, dev_eui: str) -> None:
        iot = self._iot()
        arguments = {"thingName": dev_eui}
        if self._config.deviceType:
            arguments["thingTypeName"] = self._config.deviceType
        try:
            self.api_calls += 1
            iot.create_thing(**arguments)
        except iot.exceptions.ResourceAlreadyExistsException:
            pass  # created earlier with other attributes: still the device's thing
        principal = self._principal_arn(iot)
        if principal is not None:
            self.api_calls += 1
            iot.attach_thing_principal(thingName=dev_eui, principal=principal)

    def _principal_arn(self, iot: Any) -> str | None:
        """The certificate's ARN: `certificateId` as it is when it is one, else looked up."""
        certificate_id = self._config.certificateId
        if not certificate_id:
            return None
        if certificate_id.startswith("arn:"):
            return certificate_id
        with self._lock:
            if self._principal is None:
                self.api_calls += 1
                answer = iot.describe_certificate(certificateId=certificate_id)
                self._principal = str(answer["certificateDescription"]["certificateArn"])
            return self._principal


class AwsSink:
    """`actility-aws-iot`: see the module docstring. An `MqttSession` does the MQTT."""

    def __init__(self, connection_id: str, config: AwsConfig, context: SinkContext) -> None:
        self.connection_id = connection_id
        self._aws = config
        self._problem: PermanentSinkError | None = None  # the configuration cannot work
        try:
            endpoint = aws_endpoint(config)
        except ValueError as exc:
            self._problem = PermanentSinkError(str(exc))
            endpoint = Endpoint(config.hostName or config.region, MQTT_TLS_PORT, tls=True)
        alpn = (
            (ALPN_MQTT_CLIENT_CERTIFICATE,)
            if endpoint.port == HTTPS_PORT and not endpoint.websockets
            else ()
        )
        tls = (
            TlsMaterial(
                trusted_ca=config.trustedCaCertficate,
                certificate=secret_value(config.certificate),
                private_key=secret_value(config.privateKey),
                default_roots=AMAZON_ROOTS,
                alpn=alpn,
            )
            if endpoint.tls
            else None
        )
        self._message = UplinkMessage(config, config.uplinkTopicPattern)
        self.session = MqttSession(
            connection_id,
            context,
            endpoint=endpoint,
            client_id=default_client_id(connection_id),
            reconnect_cap=reconnect_cap(config),
            qos=1,  # AWS IoT Core has no QoS 2
            tls=tls,
            downlinks=downlink_topic(config, config.downlinkTopicPattern),
            downlink_port=config.downlinkPort,
            pacer=Pacer(PUBLISH_RATE_PER_SECOND),
            # AWS IoT Core accepts shared subscriptions from MQTT 5 clients only; the session
            # speaks 3.1.1, so in a fleet each instance receives each downlink (decisions.md).
            shares_subscriptions=False,
            websocket_path=self._websocket_path,
        )
        self.registrar = ThingRegistrar(connection_id, config) if config.createDevices else None

    @property
    def endpoint(self) -> Endpoint:
        return self.session.endpoint

    @property
    def client_id(self) -> str:
        return self.session.client_id

    async def start(self) -> None:
        if self._problem is None:
            self.session.start()

    async def send(self, delivery: Delivery) -> None:
        if self._problem is not None:
            raise PermanentSinkError(str(self._problem))
        self.session.raise_if_broken()
        topic, body = self._message.render(delivery)
        if self.registrar is not None:
            self.registrar.offer(delivery.dev_eui)
        await self.session.publish(topic, body)

    async def healthcheck(self) -> bool:
        return self.session.connected

    def _websocket_path(self) -> str:
        """A SigV4-signed path, made afresh for each connection attempt."""
        access_key = secret_value(self._aws.accessKeyId)
        secret_key = secret_value(self._aws.secretAccessKey)
        if not access_key or not secret_key:
            return WEBSOCKET_PATH  # a double that takes the client certificate instead
        return presign_websocket_path(self.endpoint.host, self._aws.region, access_key, secret_key)

    async def close(self) -> None:
        await self.session.close()
        if self.registrar is not None:
            await self.registrar.close()
