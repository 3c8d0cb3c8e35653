"""The route table: each route declared once, with what the OpenAPI document says about it.

A handler is registered with its method, path, summary, authentication (and the least role
of the bearer token), request model and answers (status → model); the router, the
bearer-token exemptions and roles, and `openapi.json` are all read from the same
declaration, so that the document cannot drift from the routes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from iotflow.config.model import Role

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Auth(StrEnum):
    BEARER = "bearer"  # the operators' bearer token ([api] tokens)
    DOWNLINK = "downlink"  # signed with the connection's downlinkAsId and downlinkAsKey
    OWN = "own"  # checks its own credentials (an [[ingest]] entry's)
    OPEN = "open"  # health, readiness, metrics: no credentials


@dataclass(frozen=True, slots=True)
class Param:
    """A path or query parameter, its JSON Schema as the handler checks it."""

    name: str
    where: str  # "path" or "query"
    schema: dict[str, Any]
    required: bool = False
    description: str | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """One documented answer. `model` is the body's model (a list of it when `many`);
    None for an error (the Error shape) or for no body."""

    description: str
    model: type[BaseModel] | None = None
    many: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    media_type: str = "application/json"
    schema: dict[str, Any] | None = None  # a body that is no model of ours (metrics)


BASE = "/iot-flow/v1"

# Answers that are not successes, in the Error shape, for every resource of the API.
_ERRORS = {
    400: "Malformed JSON, body or query",
    401: "Missing or wrong bearer token",
    404: "Not found",
    409: "Conflict (duplicate id, read-only provisioned {what})",
    413: "Body too large",
    415: "Body is not application/json",
    422: "Invalid {what}, field by field",
    503: "Registry unavailable",
}


def errors(*statuses: int, what: str = "connection") -> dict[int, Answer]:
    """The error answers of a route under the bearer token: always 401, and 503 when the
    registry is unavailable; `what` names the resource in the 409 and 422 texts. (403 is
    added by the document to the routes a reader may not call.)"""
    return {s: Answer(_ERRORS[s].format(what=what)) for s in (401, 503, *statuses)}


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    auth: Auth
    answers: dict[int, Answer]
    request: type[BaseModel] | None = None
    parameters: tuple[Param, ...] = ()
    description: str | None = None
    role: Role | None = None  # the least role of a bearer token that may call it

    @property
    def forbidden(self) -> Answer | None:
        """The 403 of a bearer route that not every token may call."""
        if self.auth is not Auth.BEARER or self.least_role is Role.READER:
            return None
        return Answer(f"The token's role is below {self.least_role.value} (code forbidden)")

    @property
    def least_role(self) -> Role:
        """The declared role, or by method: reading is for readers, changing for writers."""
        if self.role is not None:
            return self.role
        return Role.READER if self.method == "GET" else Role.WRITER


@dataclass
class RouteTable:
    routes: list[Route] = field(default_factory=list)

    def route(
        self,
        method: str,
        path: str,
        *,
        summary: str,
        answers: dict[int, Answer],
        auth: Auth = Auth.BEARER,
        request: type[BaseModel] | None = None,
        parameters: Iterable[Param] = (),
        description: str | None = None,
        role: Role | None = None,
    ) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            if any(r.method == method and r.path == path for r in self.routes):
                raise ValueError(f"{method} {path} is declared twice")
            self.routes.append(
                Route(
                    method,
                    path,
                    handler,
                    summary,
                    auth,
                    answers,
                    request,
                    tuple(parameters),
                    description,
                    role,
                )
            )
            return handler

        return register

    def __iter__(self) -> Iterator[Route]:
        return iter(self.routes)

    def __add__(self, other: RouteTable) -> RouteTable:
        return RouteTable([*self.routes, *other.routes])

    def add_to(self, router: web.UrlDispatcher) -> None:
        for route in self.routes:
            if route.method == "GET":  # and HEAD, as aiohttp's add_get does
                router.add_get(route.path, route.handler)
            else:
                router.add_route(route.method, route.path, route.handler)

    def roles(self) -> dict[tuple[str, str], Role]:
        """The least role of each bearer route, by (method, path)."""
        return {(r.method, r.path): r.least_role for r in self.routes if r.auth is Auth.BEARER}

    def exempt(self) -> set[str]:
        """Paths under the API prefix that do not take the bearer token."""
        return {r.path for r in self.routes if r.auth in (Auth.DOWNLINK, Auth.OWN)}
