"""`actility-http-iot`: an HTTPS POST per uplink, and its brands as data."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, SerializationInfo, field_serializer, field_validator

from iotflow.config.types import MASK, reveal
from iotflow.connectors.catalog import Connector
from iotflow.connectors.common import CommonConfig
from iotflow.connectors.secrets import header_secrets, is_credential_name, mask_url, url_secrets
from iotflow.errors import Problem
from iotflow.formats import Template

if TYPE_CHECKING:
    from iotflow.connectors.connection import Connection
    from iotflow.sinks.base import Sink, SinkContext

# Header names whose values are credentials (masked on output, never logged): the same rule
# as for URL query parameters, see connectors/secrets.py.
is_credential_header = is_credential_name

# Control characters a header value cannot hold (RFC 9110 5.5: only HTAB among them).
HEADER_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class HttpConfig(CommonConfig):
    destinationURL: Annotated[str, Field(min_length=1, max_length=2048)] | None = Field(
        default=None,
        description="May use {DevEUI}-style templates in its path and query, rendered per"
        " uplink and percent-encoded. Credential query parameters (authorization, token,"
        " *key*, signature, ...) are shown as *****.",
    )
    headers: dict[str, Annotated[str, Field(max_length=8192)]] = Field(
        default_factory=dict,
        json_schema_extra={
            "description": "Header values may use {DevEUI}-style templates. Values of "
            "credential headers (Authorization, *key*, *token*, ...) are write-only.",
        },
    )

    @field_validator("destinationURL")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            parts = urlsplit(value)
        except ValueError:  # a broken IPv6 literal
            raise ValueError("expected an absolute http:// or https:// URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an absolute http:// or https:// URL")
        if HEADER_CONTROL.search(value):
            raise ValueError("control characters must be percent-encoded")
        if "{" in value or "}" in value:
            Template(value)  # raises ValueError with the position of the mistake
            # The authority picks the server: a template there would let an uplink's value
            # choose where its connection's credentials go. Fragments are never sent.
            authority_end = len(parts.scheme) + 3 + len(parts.netloc)
            if "{" in value[:authority_end] or "}" in value[:authority_end]:
                raise ValueError("templates are allowed in the path and the query only")
            if parts.fragment:
                raise ValueError("a templated URL cannot have a #fragment")
        try:
            port = parts.port  # past 65535 or not a number: refused here, not at the first send
        except ValueError:
            port = 0
        if port == 0:
            raise ValueError("the port must be a number from 1 to 65535")
        return value

    @field_validator("headers")
    @classmethod
    def _valid_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", name):
                raise ValueError(f"{name!r} is not a valid header name")
            if HEADER_CONTROL.search(text):
                raise ValueError(f"header {name!r}: line breaks and control characters are refused")
            try:
                Template(text)
            except ValueError as exc:
                raise ValueError(f"header {name!r}: {exc}") from None
        return value

    @field_serializer("headers")
    def _mask_credentials(self, value: dict[str, str], info: SerializationInfo) -> dict[str, str]:
        if reveal(info):
            return value
        return {k: MASK if is_credential_header(k) else v for k, v in value.items()}

    @field_serializer("destinationURL")
    def _mask_url(self, value: str | None, info: SerializationInfo) -> str | None:
        if value is None or reveal(info):
            return value
        return mask_url(value)

    def secret_values(self) -> set[str]:
        found = super().secret_values()
        for name, value in self.headers.items():
            found |= header_secrets(name, value)
        if self.destinationURL is not None:
            found |= url_secrets(self.destinationURL)
        return found


@dataclass(frozen=True, slots=True)
class Requirement:
    """A header or query parameter a brand's cloud needs, and what its value looks like."""

    name: str
    pattern: str = r".+"
    hint: str = "must be set"
    where: str = "header"  # header | query


@dataclass(frozen=True, slots=True)
class Brand:
    id: str
    description: str
    url: str | None  # None: no public default endpoint, destinationURL is required
    requires: tuple[Requirement, ...] = field(default_factory=tuple)


BRANDS: dict[str, Brand] = {
    brand.id: brand
    for brand in (
        Brand(
            "DATACAKE",
            "Datacake",
            "https://api.datacake.co/integrations/lorawan/actility",
            (Requirement("Authorization", r"Token \S+", "must be 'Token <your access token>'"),),
        ),
        Brand(
            "CAYENNE", "myDevices Cayenne", "https://lora.mydevices.com/v1/networks/actility/uplink"
        ),
        Brand(
            "QUBITRO",
            "Qubitro",
            "https://webhook.qubitro.com/integrations/actility",
            (
                Requirement("projectId", r"\S+", "must be your Qubitro project id"),
                Requirement("webhookSigningKey", r"\S+", "must be your webhook signing key"),
            ),
        ),
        Brand(
            "TAGO",
            "TagoIO",
            "https://actility.middleware.tago.io/uplink",
            (
                Requirement(
                    "authorization",
                    r"\S+",
                    "destinationURL must carry ?authorization=<your TagoIO authorization>",
                    where="query",
                ),
            ),
        ),
        Brand("UNABIZ", "UnaBiz", None),
        Brand("WIDGELIX", "Widgelix", None),
        Brand("NOMOSENSE", "Nomosense", None),
        Brand("GEAR_STUDIO", "Gear Studio", None),
    )
}


def apply_brand(brand_id: str | None, config: HttpConfig) -> tuple[HttpConfig, list[Problem]]:
    """Fill the brand's default URL and check what the brand's cloud requires."""
    problems: list[Problem] = []
    brand = BRANDS.get(brand_id) if brand_id else None
    if brand_id and brand is None:
        problems.append(Problem("brand", f"unknown brand {brand_id!r}; known: {sorted(BRANDS)}"))
        return config, problems
    if config.destinationURL is None:
        if brand is None or brand.url is None:
            hint = f" (brand {brand.id} has no default endpoint)" if brand else ""
            problems.append(Problem("configuration.destinationURL", f"is required{hint}"))
            return config, problems
        config = config.model_copy(update={"destinationURL": brand.url})
    if brand is None:
        return config, problems
    query = parse_qs(urlsplit(config.destinationURL or "").query)
    headers = {name.lower(): value for name, value in config.headers.items()}
    for req in brand.requires:
        if req.where == "query":
            values = query.get(req.name)
            value = values[0] if values else None
            path = "configuration.destinationURL"
        else:
            value = headers.get(req.name.lower())
            path = f"configuration.headers.{req.name}"
        if value is None or not re.fullmatch(req.pattern, value):
            problems.append(Problem(path, f"{brand.id}: {req.hint}"))
    return config, problems


def brand_documents() -> list[dict[str, Any]]:
    """The brands as the catalog shows them."""
    return [
        {
            "id": b.id,
            "description": b.description,
            "destinationURL": b.url,
            # What a form needs to ask for each one: its own field, what to type, and
            # whether it is a credential (write-only, shown as *****).
            "requires": [
                {
                    "name": r.name,
                    "in": r.where,
                    "pattern": r.pattern,
                    "description": r.hint,
                    "writeOnly": r.where == "header" and bool(is_credential_header(r.name)),
                }
                for r in b.requires
            ],
        }
        for b in BRANDS.values()
    ]


def _create_sink(connection: Connection, context: SinkContext) -> Sink:
    # Imported here: the sink module imports this one for its configuration.
    from iotflow.sinks.http import HttpSink

    config = connection.configuration
    assert isinstance(config, HttpConfig)  # validated with this connector's model
    return HttpSink(config, timeout=context.timeout, max_in_flight=context.max_in_flight)


def _apply_brand(brand_id: str | None, config: Any) -> tuple[Any, list[Problem]]:
    assert isinstance(config, HttpConfig)
    return apply_brand(brand_id, config)


CONNECTOR = Connector(
    id="actility-http-iot",
    description="HTTP webhook connector (Datacake, Cayenne, Qubitro, TagoIO, ...)",
    version="1.0.0",
    configuration=HttpConfig,
    create_sink=_create_sink,
    brands=brand_documents(),
    apply_brand=_apply_brand,
)
