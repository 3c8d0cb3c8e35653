"""aiohttp application of the API listener."""

from __future__ import annotations

import functools
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from iotflow.api.auth import auth_middleware, principal_of, tokens_of
from iotflow.api.body import dump, json
from iotflow.api.console import console_routes
from iotflow.api.control import CONTROL, ControlPlane
from iotflow.api.deadletters import recovery_routes
from iotflow.api.drivers import driver_routes
from iotflow.api.errors import error_middleware
from iotflow.api.fleetwide import fleet_middleware, fleet_wide
from iotflow.api.flows import flow_routes
from iotflow.api.models import Health, OpenApi, Readiness, WhoAmI
from iotflow.api.openapi import generate
from iotflow.api.routes import REPLAYS, routes
from iotflow.api.table import BASE, Answer, Auth, RouteTable
from iotflow.downlinks.signature import ReplayGuard
from iotflow.ingest.http import INGEST_REPLAYS, ingest_routes
from iotflow.ingest.thingpark import ReplayGuard as IngestReplayGuard

health = RouteTable()


@health.route(
    "GET",
    "/healthz",
    summary="Liveness: the process answers",
    auth=Auth.OPEN,
    answers={200: Answer("Alive", Health)},
)
async def healthz(request: web.Request) -> web.Response:
    return json(dump(Health(status="ok")))


@health.route(
    "GET",
    "/readyz",
    summary="Readiness: the broker and the registry are reachable",
    auth=Auth.OPEN,
    answers={200: Answer("Ready", Readiness), 503: Answer("Not ready", Readiness)},
)
async def readyz(request: web.Request) -> web.Response:
    checks = await request.app[CONTROL].readiness()
    ready = all(checks.values())
    answer = Readiness(status="ready" if ready else "not ready", checks=checks)
    return json(dump(answer), status=200 if ready else 503)


@health.route(
    "GET",
    "/metrics",
    summary="Prometheus metrics",
    auth=Auth.OPEN,
    answers={
        200: Answer(
            "The text exposition format", media_type="text/plain", schema={"type": "string"}
        )
    },
)
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[CONTROL].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@health.route(
    "GET",
    f"{BASE}/openapi.json",
    summary="This document",
    answers={
        200: Answer("OpenAPI 3.1", OpenApi),
        401: Answer("Missing or wrong bearer token"),
        503: Answer("Registry unavailable"),
    },
)
async def openapi(request: web.Request) -> web.Response:
    return json(openapi_document())


@health.route(
    "GET",
    f"{BASE}/whoami",
    summary="The caller's token: its name and role (what the console may offer)",
    answers={200: Answer("The token", WhoAmI), 401: Answer("Missing or wrong bearer token")},
)
async def whoami(request: web.Request) -> web.Response:
    principal = principal_of(request)
    return json(dump(WhoAmI(name=principal.name, role=principal.role.value)))


# Every route of the listener, each declared once: the router and the document read it.
TABLE = (
    health
    + routes
    + flow_routes
    + fleet_wide(recovery_routes)
    + ingest_routes
    + driver_routes
    + console_routes
)


@functools.cache
def openapi_document() -> dict[str, Any]:
    return generate(TABLE)


def create_app(control: ControlPlane) -> web.Application:
    api = control.config.api
    tokens = tokens_of(api.tokens)
    app = web.Application(
        client_max_size=api.max_body_bytes,
        middlewares=[
            error_middleware,
            auth_middleware(tokens, TABLE.roles(), exempt=TABLE.exempt()),
            # After authentication: a peer is asked with the caller's own token.
            fleet_middleware(),
        ],
    )
    app[CONTROL] = control
    app[REPLAYS] = ReplayGuard()
    app[INGEST_REPLAYS] = IngestReplayGuard()
    TABLE.add_to(app.router)
    return app
