"""Bearer tokens for the management API (health, readiness and metrics stay open)."""

from __future__ import annotations

import hmac

from aiohttp import web
from aiohttp.typedefs import Middleware

from iotflow.api.errors import ApiError, Handler

API_PREFIX = "/iot-flow/"


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


def auth_middleware(tokens: list[bytes]) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(API_PREFIX) and not authenticated(
            request.headers.get("Authorization"), tokens
        ):
            raise ApiError(
                401,
                "unauthorized",
                "A valid bearer token is required (Authorization: Bearer <token>).",
                headers={"WWW-Authenticate": 'Bearer realm="iotflow"'},
            )
        return await handler(request)

    return middleware
