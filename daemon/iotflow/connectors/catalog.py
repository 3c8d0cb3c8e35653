"""The catalog of connectors: every `Connector` registered in the `iotflow.connectors`
entry-point group, built-in or third-party, found the same way (docs/connectors.md)."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter

from iotflow.connectors.common import CommonConfig
from iotflow.errors import Problem
from iotflow.telemetry.logging import get_logger

if TYPE_CHECKING:
    from iotflow.connectors.connection import Connection
    from iotflow.sinks.base import Sink, SinkContext

log = get_logger("iotflow.connectors")

GROUP = "iotflow.connectors"
# iotflow's own distribution: its built-ins are loaded first, so that a plugin cannot take
# over the id of one of them.
OWN_DISTRIBUTION = "iotflow"
# A connector id as it appears in a connection's `connectorId` and in URLs of the API.
CONNECTOR_ID = re.compile(r"^[a-z0-9][a-z0-9.-]{0,63}$")

SinkFactory = Callable[["Connection", "SinkContext"], "Sink"]
# Fills what a brand implies into a configuration and lists what the brand's cloud refuses.
BrandRule = Callable[[str | None, Any], tuple[Any, list[Problem]]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Connector:
    """A kind of connection: its configuration model and how its sink is made.

    `producer_id` and `module_id` are the catalog's `producerId`/`moduleId` (the product's
    spelling); by default the id split at its first `-` (`acme-echo` → `acme`, `echo`).
    `brands` (the catalog's documents) and `apply_brand` are for a connector whose
    connections name a brand (only the HTTP connector today).
    """

    id: str
    description: str
    version: str
    configuration: type[CommonConfig]
    create_sink: SinkFactory
    producer_id: str | None = None
    module_id: str | None = None
    brands: Sequence[Mapping[str, Any]] = field(default_factory=tuple)
    apply_brand: BrandRule | None = None

    @property
    def producer(self) -> str:
        if self.producer_id is not None:
            return self.producer_id
        return self.id.partition("-")[0]

    @property
    def module(self) -> str:
        if self.module_id is not None:
            return self.module_id
        producer, dash, rest = self.id.partition("-")
        return rest if dash else producer


def connector_document(connector: Connector) -> dict[str, Any]:
    """The catalog entry as the product's `GET /connectors` shows it."""
    schema = connector.configuration.model_json_schema(mode="validation")
    for prop in schema.get("properties", {}).values():
        # An optional secret is `anyOf: [{string, writeOnly}, {null}]`: say it on the field too.
        if any(branch.get("writeOnly") for branch in prop.get("anyOf", [])):
            prop["writeOnly"] = True
    schema["id"] = f"urn:iotflow:connector:{connector.id}:configuration"
    return {
        "id": connector.id,
        "producerId": connector.producer,
        "moduleId": connector.module,
        "version": connector.version,
        "description": connector.description,
        "brands": [dict(b) for b in connector.brands],
        "connection": {"configurationSchema": schema, "upOperationsSchema": _up_operations()},
        "flow": {},
    }


class PluginError(Exception):
    """An entry point that does not name a usable Connector."""


def _distribution(point: EntryPoint) -> str:
    dist = point.dist
    return dist.name if dist is not None else "?"


def _checked(point: EntryPoint, loaded: object) -> Connector:
    if not isinstance(loaded, Connector):
        raise PluginError(f"names a {type(loaded).__name__}, not an iotflow.plugin.Connector")
    if loaded.id != point.name:
        raise PluginError(f"names connector {loaded.id!r}, not {point.name!r}")
    if not CONNECTOR_ID.match(loaded.id):
        raise PluginError(
            f"connector id {loaded.id!r} is not lower-case letters, digits, '.' and '-'"
        )
    if not (
        isinstance(loaded.configuration, type) and issubclass(loaded.configuration, CommonConfig)
    ):
        raise PluginError("its configuration is not a ConnectorConfiguration subclass")
    if not callable(loaded.create_sink):
        raise PluginError("its create_sink is not callable")
    if loaded.apply_brand is not None and not callable(loaded.apply_brand):
        raise PluginError("its apply_brand is not callable")
    for name in ("description", "version"):
        if not isinstance(getattr(loaded, name), str):
            raise PluginError(f"its {name} is not a string")
    # The schema is made now, so that a model pydantic cannot describe is refused here
    # rather than failing every GET /connectors.
    connector_document(loaded)
    return loaded


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # a plugin's exception whose text itself fails
        text = "(message unavailable)"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _not_loaded(point: EntryPoint, error: str) -> None:
    log.error(
        "Connector plugin not loaded",
        entry_point=point.name,
        value=point.value,
        distribution=_distribution(point),
        error=error,
    )


def load_connectors(points: Iterable[EntryPoint] | None = None) -> dict[str, Connector]:
    """The connectors of the entry points (by default, the installed ones of `GROUP`).

    An entry point that fails to import, names something else than a Connector, or an id
    already taken is logged once with its name and left out: one broken plugin does not
    stop the daemon, nor hide the other connectors.
    """
    found = list(entry_points(group=GROUP) if points is None else points)
    # Built-ins first, then the others, each by id: which of two conflicting plugins wins
    # is reproducible, and a plugin cannot take over the id of a built-in.
    found.sort(key=lambda p: (_distribution(p) != OWN_DISTRIBUTION, p.name, _distribution(p)))
    if points is None and not any(_distribution(p) == OWN_DISTRIBUTION for p in found):
        # Run from a tree whose installed metadata predates the entry points (an editable
        # install made before they were added): say what to do rather than list nothing.
        log.error("Built-in connectors not registered; reinstall iotflow", group=GROUP)
    catalog: dict[str, Connector] = {}
    for point in found:
        try:
            connector = _checked(point, point.load())
        except Exception as exc:  # a plugin's import may raise anything
            _not_loaded(point, _describe(exc))
            continue
        if connector.id in catalog:
            _not_loaded(point, f"connector id {connector.id!r} is already registered")
            continue
        catalog[connector.id] = connector
    if catalog:
        # Said at debug here (loaded at the first use, by `iotflow check` too); the daemon's
        # "iotflow running" line names them.
        log.debug("Connectors loaded", connectors=sorted(catalog))
    else:
        log.error("No connector installed", group=GROUP)
    return catalog


class Catalog(Mapping[str, Connector]):
    """The installed connectors, looked up once, on first use (not at import: importing
    iotflow must not import every plugin, and their errors are logged once)."""

    def __init__(self) -> None:
        self._connectors: dict[str, Connector] | None = None

    def _loaded(self) -> dict[str, Connector]:
        if self._connectors is None:
            self._connectors = load_connectors()
        return self._connectors

    def __getitem__(self, key: str) -> Connector:
        return self._loaded()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaded())

    def __len__(self) -> int:
        return len(self._loaded())


CATALOG = Catalog()


@functools.cache
def _up_operations() -> dict[str, Any]:
    """The JSON Schema of a connection's `upOperations`, the same for every connector (the
    worker applies them before any sink): generated from the validating models."""
    from iotflow.processors.operations import UpOperation  # processors import connectors

    schema: dict[str, Any] = TypeAdapter(list[UpOperation]).json_schema()
    schema["id"] = "urn:iotflow:connection:upOperations"
    return schema
