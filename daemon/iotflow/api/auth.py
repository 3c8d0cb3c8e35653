"""Bearer tokens for the management API (health, readiness and metrics stay open), and the
role each one has.

Downlinks posted by clouds are the exception: they carry their connection's own
credentials (see iotflow.downlinks.signature), not the operators' bearer token.
"""

from __future__ import annotations

import hmac
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware

from iotflow.api.errors import ApiError, Handler
from iotflow.config.model import ApiToken, Role

API_PREFIX = "/iot-flow/"
_BAD_TOKEN = "A valid bearer token is required (Authorization: Bearer <token>)."
# Says what the operator must do; it reveals nothing a caller could use (no call works).
_NO_TOKENS = (
    "A valid bearer token is required, and no API token is configured: set [api] tokens "
    "in the config file (every call is refused until then)."
)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request: the token's name (what events and logs say) and its role."""

    name: str
    role: Role


# A plain key: web.RequestKey needs aiohttp 3.12, and pyproject allows 3.9.
_PRINCIPAL = "iotflow.principal"


@dataclass(frozen=True, slots=True)
class BearerToken:
    secret: bytes
    principal: Principal


def tokens_of(settings: Sequence[ApiToken]) -> list[BearerToken]:
    return [
        BearerToken(t.token.get_secret_value().encode(), Principal(t.name, t.role))
        for t in settings
    ]


def authenticate(header: str | None, tokens: Sequence[BearerToken]) -> Principal | None:
    """Constant time in the token: every configured token is compared, whatever matches."""
    if not header or not tokens:
        return None
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "bearer" or not credentials:
        return None
    given = credentials.strip().encode()
    found: Principal | None = None
    for token in tokens:
        if hmac.compare_digest(given, token.secret):
            found = token.principal  # no early return: the time says nothing of which one
    return found


# The caller of a route table mounted without the middleware (an in-process test of some
# routes): what events said before tokens had names.
_UNNAMED = Principal("api", Role.OWNER)


def principal_of(request: web.Request) -> Principal:
    """The caller of a bearer-authenticated route (the middleware has checked the token)."""
    principal = request.get(_PRINCIPAL, _UNNAMED)
    assert isinstance(principal, Principal)
    return principal


def auth_middleware(
    tokens: Sequence[BearerToken],
    roles: Mapping[tuple[str, str], Role],
    exempt: Collection[str] = (),
) -> Middleware:
    """Bearer tokens on every route under API_PREFIX but the `exempt` ones (their canonical
    paths, e.g. `/iot-flow/v1/downlinkMessages/{id}`), which authenticate on their own.
    `roles` gives the least role of each (method, canonical path); a request that matches
    none (404, 405) needs a token of any role, and then gets its 404 or 405."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        # By the route that matched, not by a path prefix: nothing else can slip through.
        resource = request.match_info.route.resource
        canonical = resource.canonical if resource is not None else None
        method = "GET" if request.method == "HEAD" else request.method
        if canonical in exempt or not request.path.startswith(API_PREFIX):
            return await handler(request)
        needed = roles.get((method, canonical)) if canonical is not None else None
        principal = authenticate(request.headers.get("Authorization"), tokens)
        if principal is None:
            raise ApiError(
                401,
                "unauthorized",
                _NO_TOKENS if not tokens else _BAD_TOKEN,
                headers={"WWW-Authenticate": 'Bearer realm="iotflow"'},
            )
        if needed is not None and not principal.role.allows(needed):
            raise ApiError(
                403,
                "forbidden",
                f"Token {principal.name!r} has the role {principal.role.value}; "
                f"this needs {needed.value}.",
            )
        request[_PRINCIPAL] = principal
        return await handler(request)

    return middleware
