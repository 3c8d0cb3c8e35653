"""Configuration keys every connector shares (the product's "common parameters")."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from iotflow.config.types import Duration, Secret

ReconnectStrategy = Literal["CALM", "NORMAL", "AGGRESSIVE"]

# Upper bound of the probe backoff of a CLOSED connection, by reconnectStrategy.
PROBE_BACKOFF_CAP_SECONDS: dict[str, float] = {"AGGRESSIVE": 180.0, "NORMAL": 300.0, "CALM": 600.0}


class CommonConfig(BaseModel):
    # Field names are the product's camelCase spelling: they are the wire format.
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str | None = None
    createDevices: bool = True
    sendMetadata: bool = False
    sendRawDecodedFormat: bool = False
    uplinkTimeValidity: Duration | None = None
    downlinkEnabled: bool = True
    downlinkPort: Annotated[int, Field(ge=1, le=223)] | None = None
    downlinkAsId: str | None = None
    downlinkAsKey: Secret | None = None
    reconnectStrategy: ReconnectStrategy = "NORMAL"
