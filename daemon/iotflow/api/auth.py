"""Bearer tokens for the management API (health, readiness and metrics stay open).

Downlinks posted by clouds are the exception: they carry their connection's own
credentials (see iotflow.downlinks.signature), not the operators' bearer token.
"""

from __future__ import annotations

import hmac
from collections.abc import Collection

from aiohttp import web
from aiohttp.typedefs import Middleware

from iotflow.api.errors import ApiError, Handler

API_PREFIX = "/iot-flow/"
_BAD_TOKEN = "A valid bearer token is required (Authorization: Bearer <token>)."
# Says what the operator must do; it reveals nothing a caller could use (no call works).
_NO_TOKENS = (
    "A valid bearer token is required, and no API token is configured: set [api] tokens "
    "in the config file (every call is refused until then)."
)


def authenticated(header: str | None, tokens: list[bytes]) -> bool:
    """Constant time in the token: every configured token is compared, whatever matches."""
    if not header or not tokens:
        return False
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "bearer" or not credentials:
        return False
    given = credentials.strip().encode()
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(given, token)
    return matched


def auth_middleware(tokens: list[bytes], exempt: Collection[str] = ()) -> Middleware:
    """Bearer tokens on every route under API_PREFIX but the `exempt` ones (their canonical
    paths, e.g. `/iot-flow/v1/downlinkMessages/{id}`), which authenticate on their own."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        # By the route that matched, not by a path prefix: nothing else can slip through.
        resource = request.match_info.route.resource
        if resource is not None and resource.canonical in exempt:
            return await handler(request)
        if request.path.startswith(API_PREFIX) and not authenticated(
            request.headers.get("Authorization"), tokens
        ):
            raise ApiError(
                401,
                "unauthorized",
                _NO_TOKENS if not tokens else _BAD_TOKEN,
                headers={"WWW-Authenticate": 'Bearer realm="iotflow"'},
            )
        return await handler(request)

    return middleware
