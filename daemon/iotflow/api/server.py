"""aiohttp application of the API listener."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from iotflow.api.auth import auth_middleware
from iotflow.api.body import json
from iotflow.api.errors import error_middleware
from iotflow.api.openapi import openapi_document
from iotflow.api.routes import BASE, DOWNLINK_ROUTE, REPLAYS, routes
from iotflow.downlinks.signature import ReplayGuard
from iotflow.ingest.http import INGEST_REPLAYS, INGEST_ROUTE, ingest_uplink
from iotflow.ingest.thingpark import ReplayGuard as IngestReplayGuard

if TYPE_CHECKING:
    from iotflow.app import Daemon

DAEMON: web.AppKey[Daemon] = web.AppKey("daemon")


async def healthz(request: web.Request) -> web.Response:
    return json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    checks = await daemon.readiness()
    ready = all(checks.values())
    return json(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status=200 if ready else 503,
    )


async def metrics(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    body = generate_latest(daemon.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return json(openapi_document())


def create_app(daemon: Daemon) -> web.Application:
    api = daemon.settings.config.api
    tokens = [t.get_secret_value().encode() for t in api.tokens]
    app = web.Application(
        client_max_size=api.max_body_bytes,
        middlewares=[
            error_middleware,
            auth_middleware(tokens, exempt={DOWNLINK_ROUTE, INGEST_ROUTE}),
        ],
    )
    app[DAEMON] = daemon
    app[REPLAYS] = ReplayGuard()
    app[INGEST_REPLAYS] = IngestReplayGuard()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get(f"{BASE}/openapi.json", openapi)
    app.router.add_routes(routes)
    app.router.add_post(INGEST_ROUTE, ingest_uplink)
    return app
