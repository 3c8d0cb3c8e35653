"""A connection: a connector, its configuration and its alarms, validated once at the edge."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError

from iotflow.alarms.model import Alarm
from iotflow.connectors.catalog import CATALOG
from iotflow.connectors.common import CommonConfig
from iotflow.connectors.secrets import Redactor
from iotflow.errors import ConfigError, Problem
from iotflow.processors.operations import parse_operations

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
    # Validated on its own (processors.parse_operations) for per-operation key paths.
    upOperations: Any = None
    configuration: dict[str, Any] = Field(default_factory=dict)


class Connection(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    connectorId: str
    brand: str | None = None
    active: bool = True
    alarms: list[Alarm] = Field(default_factory=list)
    # The processors' validated documents, in order; None (left out) when there are none.
    upOperations: list[dict[str, Any]] | None = None
    configuration: SerializeAsAny[CommonConfig]
    provisioned: bool = Field(default=False, exclude=True)
    # Set on a stored connection that no longer validates (see `quarantined`): why it cannot
    # run, and the stored document as it is (secrets in clear, so never shown or logged).
    fault: str | None = Field(default=None, exclude=True)
    stored: dict[str, Any] | None = Field(default=None, exclude=True, repr=False)

    def document(self, *, reveal: bool = False) -> dict[str, Any]:
        """The wire form; secrets masked unless `reveal` (only the registry asks)."""
        if self.fault is not None:
            if reveal:
                # What a PUT unmasks "*****" against and compares with: what is stored.
                return dict(self.stored or {})
            # Without its validated configuration nothing says which values are secrets:
            # only the envelope is shown.
            return {
                "id": self.id,
                "name": self.name,
                "connectorId": self.connectorId,
                "active": self.active,
                "alarms": [],
                "configuration": {},
            }
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


def _nul_paths(value: Any, path: str = "") -> list[str]:
    """Key paths of the strings (keys or values) holding U+0000, which PostgreSQL's JSON
    cannot store: refused here rather than accepted on SQLite and failing on PostgreSQL."""
    found: list[str] = []
    if isinstance(value, str):
        if "\x00" in value:
            found.append(path)
    elif isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and "\x00" in key:
                found.append(where)
            else:
                found += _nul_paths(item, where)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found += _nul_paths(item, f"{path}.{index}" if path else str(index))
    return found


def parse_connection(data: Any, *, default_id: str | None = None) -> Connection:
    """Validate a connection object as the API and the config file receive it.

    Raises ConfigError listing every problem with its key path.
    """
    # Every stage that can run does, so that one call lists every problem: an error in the
    # envelope does not hide those of the configuration, nor the reverse.
    problems: list[Problem] = [
        Problem(path, "must not contain NUL characters") for path in _nul_paths(data)
    ]
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
        problems.append(
            Problem(
                "connectorId", f"unknown connector (no installed one has this id); known: {known}"
            )
        )
    raw_configuration = (
        envelope.configuration if envelope is not None else raw.get("configuration", {})
    )
    config: CommonConfig | None = None
    if connector is not None and isinstance(raw_configuration, dict):
        try:
            config = connector.configuration.model_validate(raw_configuration)
        except ValidationError as exc:
            problems.extend(problems_of(exc, "configuration"))
    operations, operation_problems = parse_operations(
        envelope.upOperations if envelope is not None else raw.get("upOperations")
    )
    problems.extend(operation_problems)
    if envelope is None or config is None:
        raise ConfigError(problems)
    if connector is not None and connector.apply_brand is not None:
        config, brand_problems = connector.apply_brand(envelope.brand, config)
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
        upOperations=operations or None,
        configuration=config,
    )


def quarantined(
    connection_id: str, document: Any, reason: str, *, provisioned: bool = False
) -> Connection:
    """A stored connection that does not validate (stored by an older version, say), as a
    Connection that nothing can run: it keeps its id, name and bindings, and the daemon takes
    it out of service with `reason` instead of refusing to start or to list the others."""
    raw = document if isinstance(document, dict) else {}
    name, connector, active = raw.get("name"), raw.get("connectorId"), raw.get("active", True)
    return Connection(
        id=connection_id,
        name=name if isinstance(name, str) and name else connection_id,
        connectorId=connector if isinstance(connector, str) else "",
        active=active if isinstance(active, bool) else True,
        configuration=CommonConfig(),
        provisioned=provisioned,
        fault=reason,
        stored=dict(raw),
    )
