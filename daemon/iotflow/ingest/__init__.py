"""HTTP ingest: network servers that push uplinks (ThingPark, The Things Stack, ChirpStack).

`POST /iot-flow/v1/ingest/{ingestId}`, one `[[ingest]]` entry each; see docs/ingest.md.
"""

from iotflow.ingest.thingpark import ReplayGuard, Unauthorized, uplink_token, verify_uplink

__all__ = ["ReplayGuard", "Unauthorized", "uplink_token", "verify_uplink"]
