"""The MQTT sink (`actility-mqtt-iot`) and what the AWS IoT sink shares with it.

- endpoint.py: where a session connects, and its client id;
- tls.py: TLS from PEM text;
- errors.py: what a failed connection attempt means (credentials or not);
- topics.py: downlink subscriptions and valid topic names;
- pacing.py: publishes spaced at a rate;
- client.py: the aiomqtt client, and the only code that reaches under it;
- session.py: `MqttSession`, one persistent session per connection;
- sink.py: `MqttSink`, rendering an uplink into a publish on its session.
"""

from iotflow.sinks.mqtt.endpoint import (
    WEBSOCKET_PATH,
    Endpoint,
    default_client_id,
    mqtt_endpoint,
    split_host_port,
)
from iotflow.sinks.mqtt.errors import classify_connect_error
from iotflow.sinks.mqtt.pacing import Pacer
from iotflow.sinks.mqtt.session import MqttSession
from iotflow.sinks.mqtt.sink import MqttSink, UplinkMessage
from iotflow.sinks.mqtt.tls import TlsMaterial, normalize_pem, tls_context
from iotflow.sinks.mqtt.topics import DownlinkTopic

__all__ = [
    "WEBSOCKET_PATH",
    "DownlinkTopic",
    "Endpoint",
    "MqttSession",
    "MqttSink",
    "Pacer",
    "TlsMaterial",
    "UplinkMessage",
    "classify_connect_error",
    "default_client_id",
    "mqtt_endpoint",
    "normalize_pem",
    "split_host_port",
    "tls_context",
]
