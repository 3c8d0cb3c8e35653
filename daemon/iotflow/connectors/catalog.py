"""The catalog of connectors: one entry per kind of connection, configuration as a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from iotflow.connectors.common import CommonConfig
from iotflow.connectors.cumulocity import CumulocityConfig
from iotflow.connectors.http import HttpConfig, brand_documents
from iotflow.connectors.mqtt import AwsConfig, MqttConfig


@dataclass(frozen=True, slots=True)
class Connector:
    id: str
    producer_id: str
    module_id: str
    version: str
    description: str
    config_model: type[CommonConfig]
    brands: list[dict[str, Any]] = field(default_factory=list)


CATALOG: dict[str, Connector] = {
    c.id: c
    for c in (
        Connector(
            "actility-http-iot",
            "actility",
            "http-iot",
            "1.0.0",
            "HTTP webhook connector (Datacake, Cayenne, Qubitro, TagoIO, ...)",
            HttpConfig,
            brand_documents(),
        ),
        Connector(
            "actility-mqtt-iot",
            "actility",
            "mqtt-iot",
            "1.0.0",
            "Generic MQTT broker connector",
            MqttConfig,
        ),
        Connector(
            "actility-aws-iot",
            "actility",
            "aws-iot",
            "2.0.0",
            "Actility AWS Connector",
            AwsConfig,
        ),
        Connector(
            "actility-cumulocity-iot",
            "actility",
            "cumulocity-iot",
            "1.0.0",
            "Cumulocity IoT connector",
            CumulocityConfig,
        ),
    )
}


def connector_document(connector: Connector) -> dict[str, Any]:
    """The catalog entry as the product's `GET /connectors` shows it."""
    schema = connector.config_model.model_json_schema(mode="validation")
    for prop in schema.get("properties", {}).values():
        # An optional secret is `anyOf: [{string, writeOnly}, {null}]`: say it on the field too.
        if any(branch.get("writeOnly") for branch in prop.get("anyOf", [])):
            prop["writeOnly"] = True
    schema["id"] = f"urn:iotflow:connector:{connector.id}:configuration"
    return {
        "id": connector.id,
        "producerId": connector.producer_id,
        "moduleId": connector.module_id,
        "version": connector.version,
        "description": connector.description,
        "brands": connector.brands,
        "connection": {"configurationSchema": schema},
        "flow": {},
    }
