"""Ingest: uplinks from the network server's MQTT broker."""
