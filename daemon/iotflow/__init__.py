"""iotflow: route LoRaWAN device uplinks from an MQTT broker to cloud platforms."""

__version__ = "0.1.0"
