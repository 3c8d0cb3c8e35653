"""`actility-thingsboard-iot`: telemetry to ThingsBoard's HTTP device API, with each device's
own access token (docs/thingsboard.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field, field_validator

from iotflow.config.types import MASK, Secret
from iotflow.connectors.catalog import Connector
from iotflow.connectors.common import CommonConfig, template_option
from iotflow.connectors.web import CaCertificate, HostName, base_url
from iotflow.formats import normalize_dev_eui

if TYPE_CHECKING:
    from iotflow.connectors.connection import Connection
    from iotflow.sinks.base import Sink, SinkContext


class ThingsBoardConfig(CommonConfig):
    hostName: HostName = Field(
        description="The ThingsBoard server: `thingsboard.cloud`, `https://tb.example.com`,"
        " `http://10.0.0.5:8080`. The default scheme is https.",
    )
    accessTokens: dict[str, Annotated[Secret, Field(min_length=1, max_length=256)]] = Field(
        default_factory=dict,
        description="The access token of each device, by DevEUI (write-only).",
    )
    accessTokenPattern: Annotated[str, Field(min_length=1, max_length=256)] | None = Field(
        default=None,
        description="For a device not in accessTokens: its token made from the uplink, as"
        " a {Path} template (`{DevEUI}`, `lora-{DevEUI}`). Anyone who knows the DevEUI"
        " knows such a token.",
    )
    trustedCaCertficate: CaCertificate = None

    @field_validator("accessTokens")
    @classmethod
    def _by_dev_eui(cls, value: dict[str, Secret]) -> dict[str, Secret]:
        found: dict[str, Secret] = {}
        for key, token in value.items():
            try:
                dev_eui = normalize_dev_eui(key)
            except ValueError:
                raise ValueError(f"{key!r} is not a DevEUI (16 hex digits)") from None
            if dev_eui in found:
                raise ValueError(f"DevEUI {dev_eui} is given twice")
            if token.get_secret_value() == MASK:
                # A masked token sent back keeps the stored one only under the key it is
                # stored with (upper case, no separators); anywhere else it would become
                # the token "*****".
                raise ValueError(f"{key}: no stored token to keep; spell it {dev_eui}")
            found[dev_eui] = token
        return found

    _template = field_validator("accessTokenPattern")(template_option)

    @property
    def base_url(self) -> str:
        return base_url(self.hostName)

    def secret_values(self) -> set[str]:
        return super().secret_values() | {
            token.get_secret_value() for token in self.accessTokens.values()
        }


def _create_sink(connection: Connection, context: SinkContext) -> Sink:
    # Imported here: the sink module imports this one for its configuration.
    from iotflow.sinks.thingsboard import ThingsBoardSink

    config = connection.configuration
    assert isinstance(config, ThingsBoardConfig)  # validated with this connector's model
    return ThingsBoardSink(config, context)


CONNECTOR = Connector(
    id="actility-thingsboard-iot",
    description="ThingsBoard connector (HTTP device API, a token per device)",
    version="1.0.0",
    configuration=ThingsBoardConfig,
    create_sink=_create_sink,
)
