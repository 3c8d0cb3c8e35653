"""Configuration keys every connector shares (the product's "common parameters")."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr

from iotflow.config.types import Duration, Secret
from iotflow.formats import Template

ReconnectStrategy = Literal["CALM", "NORMAL", "AGGRESSIVE"]

# Upper bound of the probe backoff of a CLOSED connection, by reconnectStrategy.
PROBE_BACKOFF_CAP_SECONDS: dict[str, float] = {"AGGRESSIVE": 180.0, "NORMAL": 300.0, "CALM": 600.0}


MIN_VALIDITY = timedelta(seconds=1)
MAX_VALIDITY = timedelta(days=36500)  # a century: beyond any real need, far inside dates


def _validity(value: timedelta) -> timedelta:
    """A usable uplinkTimeValidity: within bounds, and whole milliseconds, the resolution it is
    written back with (finer would change the value across a store and a restart)."""
    if not MIN_VALIDITY <= value <= MAX_VALIDITY:
        raise ValueError("must be between 1s and 36500d")
    if value % timedelta(milliseconds=1):
        raise ValueError("must be a whole number of milliseconds")
    return value


Validity = Annotated[Duration, AfterValidator(_validity)]


def template_option(value: str | None) -> str | None:
    """A field validator for an option that is a `{Path}` template (topics, tokens)."""
    if value is not None:
        Template(value)  # raises ValueError with the position of the mistake
    return value


class CommonConfig(BaseModel):
    # Field names are the product's camelCase spelling: they are the wire format.
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str | None = None
    createDevices: bool = True
    sendMetadata: bool = False
    sendRawDecodedFormat: bool = False
    uplinkTimeValidity: Validity | None = None
    downlinkEnabled: bool = True
    downlinkPort: Annotated[int, Field(ge=1, le=223)] | None = None
    downlinkAsId: str | None = None
    downlinkAsKey: Secret | None = None
    reconnectStrategy: ReconnectStrategy = "NORMAL"

    def secret_values(self) -> set[str]:
        """Every secret value of this configuration, to be cleaned from text that might
        repeat it (a cloud's error body, an exception). Subclasses add what hides in
        plain-typed fields (credential headers, URL parameters)."""
        found: set[str] = set()
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr) and value.get_secret_value():
                found.add(value.get_secret_value())
        return found
