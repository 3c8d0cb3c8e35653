"""The connection body that POST and PUT take, as one model per installed connector (for
the OpenAPI document): derived from the catalog, so a plugin's connections are described
like the built-ins'."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, create_model

from iotflow.alarms.model import Alarm
from iotflow.connectors.catalog import CATALOG, Connector
from iotflow.connectors.connection import ID_PATTERN
from iotflow.processors.operations import MAX_OPERATIONS, UpOperation

_DESCRIPTION = (
    "A connection as POST and PUT take it, its configuration the connector's (GET /connectors)."
    "\n\nOnly HTTP connections have brands. Read-only fields are ignored when sent back."
)


class _ConnectionInput(BaseModel):
    """What every connection takes, whatever its connector."""

    model_config = ConfigDict(extra="forbid")

    id: Annotated[str, Field(pattern=ID_PATTERN)] | None = None
    name: Annotated[str, Field(min_length=1, max_length=200)]
    active: bool = True
    alarms: list[Alarm] = Field(default_factory=list)
    upOperations: list[UpOperation] | None = Field(
        default=None,
        max_length=MAX_OPERATIONS,
        description="Processors applied in order to each uplink before it is sent "
        "(docs/processors.md); each may have a JMESPath `condition`.",
    )


def _model_name(connector: Connector) -> str:
    """`HttpConfig` → `HttpConnectionInput`, `EchoConfiguration` → `EchoConnectionInput`."""
    name = connector.configuration.__name__
    for suffix in ("Configuration", "Config"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name.removesuffix(suffix)
            break
    return f"{name}ConnectionInput"


def _input_model(connector: Connector) -> type[BaseModel]:
    brand: Any
    if connector.brands:
        ids = sorted(str(b["id"]) for b in connector.brands)
        brand = (str | None, Field(default=None, json_schema_extra={"enum": [*ids, None]}))
    else:
        brand = (None, None)
    model: type[BaseModel] = create_model(
        _model_name(connector),
        __base__=_ConnectionInput,
        connectorId=(Literal[connector.id], ...),  # type: ignore[arg-type]
        brand=brand,
        configuration=(connector.configuration, ...),
    )
    return model


def connection_input_model() -> type[BaseModel]:
    """`ConnectionInput`: one of the installed connectors' bodies, by `connectorId`."""
    models = [_input_model(c) for c in CATALOG.values()]
    body: Any
    if not models:
        body = _ConnectionInput
    elif len(models) == 1:
        body = models[0]
    else:
        # A Union built at run time from the registered connectors.
        union: Any = models[0]
        for model in models[1:]:
            union = union | model
        body = Annotated[union, Field(discriminator="connectorId")]

    class ConnectionInput(RootModel[body]):
        __doc__ = _DESCRIPTION

        model_config = ConfigDict(title="ConnectionInput")

    return ConnectionInput
