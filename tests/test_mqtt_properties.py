"""paho's decoders with shared property tables decode exactly what paho's own class does."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import iotflow.sources.ack  # noqa: F401 (installs them, as the daemon does)
from iotflow import mqtt_properties
from iotflow.mqtt_properties import SharedTableProperties


def test_the_daemons_mqtt_modules_install_them() -> None:
    # Fails when a paho release moves the class its decoders use: the daemon then runs on
    # paho's own (slower), and this module needs a look.
    assert mqtt_properties.installed()


def _empty(p: Properties) -> None:
    pass


def _many(p: Properties) -> None:
    p.PayloadFormatIndicator = 1
    p.MessageExpiryInterval = 3600
    p.ContentType = "application/json"
    p.ResponseTopic = "replies/0018B20000000001"
    p.CorrelationData = b"\x00\x01corr"
    p.TopicAlias = 7
    p.UserProperty = ("tenant", "acme")
    p.UserProperty = ("region", "eu-west")
    p.SubscriptionIdentifier = 42


def _publish(fill: Callable[[Properties], None], payload: bytes) -> bytes:
    outgoing = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    fill(outgoing)
    topic = b"application/1/device/0018b20000000001/event/up"
    return b"".join(
        (
            struct.pack("!H", len(topic)),
            topic,
            struct.pack("!H", 513),  # packet id
            outgoing.pack(),  # type: ignore[no-untyped-call]
            payload,
        )
    )


def _decoded(packet: bytes, cls: type[Properties]) -> tuple[Any, ...]:
    saved = _packet.Properties  # type: ignore[attr-defined]
    _packet.Properties = cls  # type: ignore[attr-defined]
    try:
        got = _packet.decode_publish(0x32, packet, MQTTProtocolVersion.MQTTv5)
    finally:
        _packet.Properties = saved  # type: ignore[attr-defined]
    assert got.properties is not None
    return got.topic, got.mid, got.payload, got.properties.json()  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("fill", [_empty, _many], ids=["none", "every kind"])
@pytest.mark.parametrize("payload", [b"", b"\x00" * 3, b'{"DevEUI_uplink": {}}' * 40])
def test_a_publish_decodes_as_with_pahos_own_class(
    fill: Callable[[Properties], None], payload: bytes
) -> None:
    packet = _publish(fill, payload)
    assert _decoded(packet, SharedTableProperties) == _decoded(packet, Properties)
    assert _decoded(packet, SharedTableProperties)[2] == payload


def test_the_tables_are_shared_and_left_unchanged_by_decoding() -> None:
    before = dict(SharedTableProperties.names), dict(SharedTableProperties.properties)
    one = _decoded(_publish(_many, b"a"), SharedTableProperties)
    two = _decoded(_publish(_empty, b"b"), SharedTableProperties)
    assert one[3] != two[3]  # nothing from the first packet leaks into the second
    assert two[3] == {}
    assert (SharedTableProperties.names, SharedTableProperties.properties) == before
    assert "names" not in SharedTableProperties(PacketTypes.PUBLISH).__dict__


def test_a_malformed_property_is_still_refused() -> None:
    packet = _publish(_many, b"")
    topic_len = struct.unpack("!H", packet[:2])[0]
    cut = packet[: 2 + topic_len + 2 + 6]  # inside the properties
    for cls in (SharedTableProperties, Properties):
        with pytest.raises(MalformedPacket):
            _decoded(cut, cls)


def test_an_unknown_property_is_still_refused() -> None:
    topic = b"t"
    packet = struct.pack("!H", 1) + topic + struct.pack("!H", 1) + b"\x02\x7f\x00"
    for cls in (SharedTableProperties, Properties):
        with pytest.raises(MalformedPacket):
            _decoded(packet, cls)


def test_other_packets_keep_their_own_rules() -> None:
    # The class is paho's in every other respect: a PUBLISH-only property on a CONNECT is
    # refused as paho refuses it.
    connect = SharedTableProperties(PacketTypes.CONNECT)
    connect.SessionExpiryInterval = 60
    with pytest.raises(Exception, match="does not apply"):
        connect.TopicAlias = 1
