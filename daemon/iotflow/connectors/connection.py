"""A connection: a connector, its configuration and its alarms, validated once at the edge."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError

from iotflow.alarms.model import Alarm
from iotflow.connectors.catalog import CATALOG
from iotflow.connectors.common import CommonConfig
from iotflow.connectors.http import HttpConfig, apply_brand
from iotflow.connectors.secrets import Redactor
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

    def secret_values(self) -> set[str]:
        """Every secret value of the connection, wherever it sits in its configuration."""
        return self.configuration.secret_values()

    def redactor(self) -> Redactor:
        """Cleans text (a cloud's answer, an exception's message) of the connection's secrets."""
        return Redactor(self.secret_values())

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
    try:
        envelope = _Envelope.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(problems_of(exc)) from None
    connector = CATALOG.get(envelope.connectorId)
    if connector is None:
        known = ", ".join(sorted(CATALOG))
        raise ConfigError([Problem("connectorId", f"unknown connector; known: {known}")])
    try:
        config = connector.config_model.model_validate(envelope.configuration)
    except ValidationError as exc:
        raise ConfigError(problems_of(exc, "configuration")) from None
    problems: list[Problem] = []
    if isinstance(config, HttpConfig):
        config, problems = apply_brand(envelope.brand, config)
    elif envelope.brand is not None:
        problems.append(Problem("brand", f"connector {connector.id} has no brands"))
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
