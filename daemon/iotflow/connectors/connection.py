"""A connection: a connector, its configuration and its alarms, validated once at the edge."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError

from iotflow.alarms.model import Alarm
from iotflow.connectors.catalog import CATALOG
from iotflow.connectors.common import CommonConfig
from iotflow.connectors.http import HttpConfig, apply_brand
from iotflow.errors import ConfigError, Problem

CONNECTION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ID_PATTERN = CONNECTION_ID.pattern


class _Envelope(BaseModel):
    """The connection object without its connector-specific configuration."""

    model_config = ConfigDict(extra="forbid")

    id: Annotated[str, Field(pattern=ID_PATTERN)] | None = None
    name: Annotated[str, Field(min_length=1, max_length=200)]
    connectorId: str
    brand: str | None = None
    active: bool = True
    alarms: list[Alarm] = Field(default_factory=list)
    configuration: dict[str, Any] = Field(default_factory=dict)


class Connection(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    connectorId: str
    brand: str | None = None
    active: bool = True
    alarms: list[Alarm] = Field(default_factory=list)
    configuration: SerializeAsAny[CommonConfig]
    provisioned: bool = Field(default=False, exclude=True)

    def document(self, *, reveal: bool = False) -> dict[str, Any]:
        """The wire form; secrets masked unless `reveal` (only the registry asks)."""
        return self.model_dump(mode="json", context={"reveal": reveal}, exclude_none=True)

    @property
    def validity_seconds(self) -> float | None:
        v = self.configuration.uplinkTimeValidity
        return None if v is None else v.total_seconds()


def problems_of(error: ValidationError, prefix: str = "") -> list[Problem]:
    """Pydantic errors as key-path problems, without the offending values (they may be secrets)."""
    problems = []
    for item in error.errors(include_input=False, include_url=False):
        path = ".".join(str(p) for p in item["loc"])
        full = ".".join(p for p in (prefix, path) if p)
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        problems.append(Problem(full, message))
    return problems


def parse_connection(data: Any, *, default_id: str | None = None) -> Connection:
    """Validate a connection object as the API and the config file receive it.

    Raises ConfigError listing every problem with its key path.
    """
    # Every stage that can run does, so that one call lists every problem: an error in the
    # envelope does not hide those of the configuration, nor the reverse.
    problems: list[Problem] = []
    envelope: _Envelope | None = None
    try:
        envelope = _Envelope.model_validate(data)
    except ValidationError as exc:
        problems.extend(problems_of(exc))
    raw = data if isinstance(data, dict) else {}
    connector_id = envelope.connectorId if envelope is not None else raw.get("connectorId")
    connector = CATALOG.get(connector_id) if isinstance(connector_id, str) else None
    if connector is None and isinstance(connector_id, str):
        known = ", ".join(sorted(CATALOG))
        problems.append(Problem("connectorId", f"unknown connector; known: {known}"))
    raw_configuration = (
        envelope.configuration if envelope is not None else raw.get("configuration", {})
    )
    config: CommonConfig | None = None
    if connector is not None and isinstance(raw_configuration, dict):
        try:
            config = connector.config_model.model_validate(raw_configuration)
        except ValidationError as exc:
            problems.extend(problems_of(exc, "configuration"))
    if envelope is None or config is None:
        raise ConfigError(problems)
    if isinstance(config, HttpConfig):
        config, brand_problems = apply_brand(envelope.brand, config)
        problems.extend(brand_problems)
    elif envelope.brand is not None:
        problems.append(Problem("brand", f"connector {connector_id} has no brands"))
    connection_id = envelope.id or default_id
    if connection_id is None:
        problems.append(Problem("id", "is required"))
    if problems:
        raise ConfigError(problems)
    assert connection_id is not None
    return Connection(
        id=connection_id,
        name=envelope.name,
        connectorId=envelope.connectorId,
        brand=envelope.brand,
        active=envelope.active,
        alarms=envelope.alarms,
        configuration=config,
    )
