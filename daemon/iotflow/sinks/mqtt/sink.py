"""`actility-mqtt-iot`: one persistent MQTT session per connection, a publish per uplink.

The sink renders what to publish (the topic from `uplinkTopicPattern`, the body as the
connection wants it) and hands it to its `MqttSession` (session.py), which connects,
reconnects, and returns once the broker acknowledged. Retries, expiry, order and the
circuit stay in delivery/; a topic that renders to something MQTT cannot publish to is a
PermanentSinkError, raised here before anything is sent.
"""

from __future__ import annotations

from typing import Any

import orjson

from iotflow.config.types import secret_value
from iotflow.connectors.common import PROBE_BACKOFF_CAP_SECONDS, CommonConfig
from iotflow.connectors.mqtt import MqttConfig
from iotflow.errors import PermanentSinkError
from iotflow.formats import Template, render_body
from iotflow.sinks.base import SinkContext
from iotflow.sinks.mqtt.endpoint import Endpoint, default_client_id, mqtt_endpoint
from iotflow.sinks.mqtt.session import MqttSession
from iotflow.sinks.mqtt.tls import TlsMaterial
from iotflow.sinks.mqtt.topics import DownlinkTopic, valid_topic
from iotflow.spool import Delivery


class UplinkMessage:
    """The topic and body of an uplink, as a connection's common settings make them."""

    def __init__(self, config: CommonConfig, uplink_topic: str) -> None:
        self._config = config
        self._topic = Template(uplink_topic)
        self._templated = "{" in uplink_topic
        self._reshape = config.sendMetadata or config.sendRawDecodedFormat

    def render(self, delivery: Delivery) -> tuple[str, bytes]:
        document: dict[str, Any] | None = None
        if self._templated or self._reshape:
            document = orjson.loads(delivery.document)
        topic = self._topic.render(document) if document is not None else self._topic.text
        if not valid_topic(topic):
            raise PermanentSinkError(
                f"uplinkTopicPattern {self._topic.text!r} renders to {topic!r},"
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
        return topic, body


def downlink_topic(config: CommonConfig, pattern: str | None) -> DownlinkTopic | None:
    """The downlink subscription of a connection, when it has one and downlinks are on."""
    return DownlinkTopic(pattern) if pattern and config.downlinkEnabled else None


def reconnect_cap(config: CommonConfig) -> float:
    return PROBE_BACKOFF_CAP_SECONDS[config.reconnectStrategy]


class MqttSink:
    """`actility-mqtt-iot`: a broker given by `hostName` and `protocol` (TCP, SSL, WSS)."""

    def __init__(self, connection_id: str, config: MqttConfig, context: SinkContext) -> None:
        self.connection_id = connection_id
        self._problem: PermanentSinkError | None = None  # the configuration cannot work
        try:
            endpoint = mqtt_endpoint(config)
        except ValueError as exc:
            # The model's pattern lets a few malformed values through (a port past 65535).
            self._problem = PermanentSinkError(f"hostName: {exc}")
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
        self._message = UplinkMessage(config, config.uplinkTopicPattern)
        self.session = MqttSession(
            connection_id,
            context,
            endpoint=endpoint,
            client_id=config.clientId or default_client_id(connection_id),
            reconnect_cap=reconnect_cap(config),
            qos=config.qos,
            username=config.username,
            password=secret_value(config.password),
            tls=tls,
            downlinks=downlink_topic(config, config.downlinkTopicPattern),
            downlink_port=config.downlinkPort,
        )

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
        await self.session.publish(topic, body)

    async def healthcheck(self) -> bool:
        return self.session.connected

    async def close(self) -> None:
        await self.session.close()
