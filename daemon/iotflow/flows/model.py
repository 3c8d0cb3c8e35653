"""A flow, in the product's shape, validated once at the edge.

`{"name", "description", "driver": {"id"}, "matchers": [...], "connectors": [{"id",
"connectionId", "uplinkTimeValidity"}]}`. A flow routes an uplink when ANY of its matchers
matches it; a `thing` matcher matches when the device has ALL of its tags. Keys, tags and
applications are normalised here (DevEUI upper case, tags and applications folded), so the
routing index compares plain strings.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from iotflow.connectors.common import Validity
from iotflow.connectors.connection import ID_PATTERN, problems_of
from iotflow.errors import ConfigError, Problem
from iotflow.formats.fields import normalize_dev_eui
from iotflow.formats.uplink import fold

__all__ = [
    "ApplicationMatcher",
    "Flow",
    "FlowConnector",
    "FlowDriver",
    "FlowInput",
    "FlowView",
    "KeyMatcher",
    "Matcher",
    "RangeMatcher",
    "ThingMatcher",
    "parse_flow",
]

MAX_MATCHERS = 1000
MAX_TAGS = 50
DRIVER_ID = re.compile(r"^[A-Za-z0-9._-]+:[A-Za-z0-9._-]+:[A-Za-z0-9._-]+$")
_KEY_PREFIX = "lora:"


def _dev_eui(value: str) -> str:
    return normalize_dev_eui(value)


def _key(value: str) -> str:
    # The product's device key is `lora:<DevEUI>`; a bare DevEUI is accepted too.
    rest = value[len(_KEY_PREFIX) :] if value.lower().startswith(_KEY_PREFIX) else value
    return _KEY_PREFIX + normalize_dev_eui(rest).lower()


def _label(value: str) -> str:
    folded = fold(value)
    if not folded:
        raise ValueError("must not be blank")
    if "\x00" in folded:
        raise ValueError("must not contain U+0000")
    return folded


Label = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_label)]
DevEui = Annotated[str, AfterValidator(_dev_eui)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KeyMatcher(_Strict):
    type: Literal["key"]
    key: Annotated[str, AfterValidator(_key)]

    @property
    def dev_eui(self) -> str:
        return self.key[len(_KEY_PREFIX) :].upper()


class ThingMatcher(_Strict):
    type: Literal["thing"]
    tags: Annotated[list[Label], Field(min_length=1, max_length=MAX_TAGS)]


class ApplicationMatcher(_Strict):
    type: Literal["application"]
    id: Label


class RangeMatcher(_Strict):
    type: Literal["range"]
    from_: Annotated[DevEui, Field(alias="from")]
    to: DevEui

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _ordered(self) -> RangeMatcher:
        if int(self.from_, 16) > int(self.to, 16):
            raise ValueError("`from` must not be above `to`")
        return self


Matcher = Annotated[
    KeyMatcher | ThingMatcher | ApplicationMatcher | RangeMatcher, Field(discriminator="type")
]


class FlowDriver(_Strict):
    id: Annotated[str, Field(pattern=DRIVER_ID.pattern, max_length=200)]


class FlowConnector(_Strict):
    # The connector of the connection (e.g. `actility-http-iot`): optional, and when given
    # it must be the connection's (checked against the registry, not here).
    id: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    connectionId: Annotated[str, Field(pattern=ID_PATTERN)]
    uplinkTimeValidity: Validity | None = None

    @property
    def validity_seconds(self) -> float | None:
        v = self.uplinkTimeValidity
        return None if v is None else v.total_seconds()


class _FlowFields(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    description: Annotated[str, Field(max_length=2000)] | None = None
    driver: FlowDriver | None = None
    matchers: Annotated[list[Matcher], Field(min_length=1, max_length=MAX_MATCHERS)]
    connectors: Annotated[list[FlowConnector], Field(min_length=1, max_length=100)]


class FlowInput(_FlowFields):
    """The body of POST and PUT: `id` is optional (POST makes one; PUT takes the path's)."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="FlowInput")

    id: Annotated[str, Field(pattern=ID_PATTERN)] | None = None
    provisioned: bool | None = Field(default=None, description="read-only; ignored on input")


class FlowView(_FlowFields):
    """A flow as the API shows it."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="Flow")

    id: str
    provisioned: bool = Field(description="defined in the config file: read-only here")


class Flow(_FlowFields):
    id: Annotated[str, Field(pattern=ID_PATTERN)]
    provisioned: bool = Field(default=False, exclude=True)

    @model_validator(mode="after")
    def _distinct_connections(self) -> Flow:
        seen: set[str] = set()
        for c in self.connectors:
            if c.connectionId in seen:
                raise ValueError(f"connection {c.connectionId!r} is named twice in connectors")
            seen.add(c.connectionId)
        return self

    def document(self) -> dict[str, Any]:
        """The wire form (also what the registry stores)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    @property
    def connection_ids(self) -> list[str]:
        return [c.connectionId for c in self.connectors]


def parse_flow(
    document: Any,
    *,
    prefix: str = "",
    provisioned: bool = False,
    default_id: str | None = None,
) -> Flow:
    """A flow from its wire form; ConfigError with key paths (never values) when invalid.

    `default_id` is the id of a document without one (or with `"id": null`).
    """
    if not isinstance(document, dict):
        raise ConfigError([Problem(prefix, "expected an object")])
    if default_id is not None and document.get("id") is None:
        document = {**document, "id": default_id}
    try:
        flow = Flow.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(problems_of(exc, prefix)) from None
    return flow.model_copy(update={"provisioned": provisioned}) if provisioned else flow
