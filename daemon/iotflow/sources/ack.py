"""Manual PUBACK: the one place that reaches under aiomqtt.

aiomqtt 2.x acknowledges a QoS 1 message as soon as it is queued for us; iotflow must
acknowledge only once the uplink's deliveries are committed to the spool. paho-mqtt 2.x,
which aiomqtt drives, has `manual_ack_set` and `ack`; aiomqtt keeps its paho client in
`_client`. Everything that depends on that private attribute is in this module, and
`tests/test_source.py` proves an unacknowledged uplink is redelivered after a crash.
"""

from __future__ import annotations

import aiomqtt
import paho.mqtt.client as paho


class ManualAck:
    """Turns paho's automatic acknowledgement off for one aiomqtt client (before connecting)."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self._paho: paho.Client = client._client
        self._paho.manual_ack_set(True)

    def ack(self, mid: int, qos: int) -> bool:
        """Send the PUBACK of message `mid`; False when the client could not (disconnected)."""
        if qos == 0:
            return True
        return self._paho.ack(mid, qos) == paho.MQTT_ERR_SUCCESS
