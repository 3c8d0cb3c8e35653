"""`POST /iot-flow/v1/ingest/{ingestId}`: an uplink pushed by a network server.

The order of the checks is what each answer promises: the entry and its credentials first
(401, the same answer for an unknown id, so that ids cannot be probed), the body's size
(413), ChirpStack's non-up events (204), the uplink itself (400), then the commit: 200
only once the uplink's deliveries are in the spool, 503 with Retry-After when they could
not be written, so that the sender keeps the uplink and tries again.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from iotflow.api.body import dump, json
from iotflow.api.control import CONTROL, ControlPlane
from iotflow.api.errors import ApiError
from iotflow.api.models import IngestAccepted, UplinkInput
from iotflow.api.table import Answer, Auth, Param, RouteTable
from iotflow.config.model import IngestEndpoint
from iotflow.config.types import secret_value
from iotflow.errors import Rejection
from iotflow.ingest.thingpark import ReplayGuard, Unauthorized, verify_uplink
from iotflow.telemetry.logging import get_logger

__all__ = ["INGEST_REPLAYS", "INGEST_ROUTE", "ingest_routes", "ingest_uplink"]

log = get_logger("iotflow.ingest")

INGEST_ROUTE = "/iot-flow/v1/ingest/{ingestId}"
INGEST_REPLAYS: web.AppKey[ReplayGuard] = web.AppKey("ingest_replays", ReplayGuard)

# ChirpStack's HTTP integration posts every event to one URL, naming it in `?event=`.
CHIRPSTACK_UPLINK_EVENT = "up"
UNKNOWN_INGEST = "(unknown)"  # the metric label of requests to no configured entry
RETRY_AFTER_SECONDS = 10
_LOG_LINES = 60  # refused requests logged per minute at most; the rest are only counted
_DUMMY = b"iotflow-no-such-ingest"


class _LogBudget:
    """At most `lines` log lines a minute, so that a flood of bad requests cannot drown
    the log (the metric counts every one)."""

    def __init__(self, lines: int) -> None:
        self._lines = lines
        self._window = (0.0, 0)

    def take(self) -> bool:
        now = time.monotonic()
        start, used = self._window
        if now - start >= 60:
            start, used = now, 0
        self._window = (start, used + 1)
        return used < self._lines


_budget = _LogBudget(_LOG_LINES)


def _unauthorized() -> ApiError:
    return ApiError(
        401,
        "unauthorized",
        "The ingest id or its credentials are wrong.",
        headers={"WWW-Authenticate": 'Bearer realm="iotflow ingest"'},
    )


def _entry(control: ControlPlane, ingest_id: str) -> IngestEndpoint | None:
    # Read at each request: [[ingest]] follows a reload (SIGHUP) without a restart.
    for entry in control.config.ingest:
        if hmac.compare_digest(entry.id.encode(), ingest_id.encode()):
            return entry
    return None


def _header_ok(request: web.Request, name: str, expected: str) -> bool:
    given = request.headers.get(name, "")
    return hmac.compare_digest(given.encode(), expected.encode())


def _bearer_ok(request: web.Request, expected: str) -> bool:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        credentials.strip().encode(), expected.encode()
    )


async def _read_bounded(request: web.Request, limit: int) -> bytes | None:
    """The body, or None past `limit` bytes (read no further than that)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    body = bytearray()
    async for chunk in request.content.iter_chunked(16 * 1024):
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


ingest_routes = RouteTable()


@ingest_routes.route(
    "POST",
    INGEST_ROUTE,
    summary="An uplink pushed by a network server, to an [[ingest]] entry",
    description="Not bearer-authenticated: each [[ingest]] entry checks its own credentials"
    " (auth = thingpark: ThingPark's AS_ID, Time and Token query parameters; header: the"
    " entry's header and token; bearer: Authorization: Bearer <token>). 200 only once the"
    " uplink's deliveries are committed to the spool. See docs/ingest.md.",
    auth=Auth.OWN,
    parameters=[
        Param("ingestId", "path", {"type": "string"}, required=True),
        Param(
            "event",
            "query",
            {"type": "string"},
            description="ChirpStack's event type; only 'up' is an uplink",
        ),
    ],
    request=UplinkInput,
    answers={
        200: Answer("Committed to the spool (routed), or bound to no connection", IngestAccepted),
        204: Answer("A ChirpStack event that is not an uplink"),
        400: Answer(
            "Not an uplink of the entry's format; code: not_json, wrong_shape, bad_dev_eui"
        ),
        401: Answer("Unknown ingest id, or missing, wrong, stale or replayed credentials"),
        413: Answer("Body larger than the entry's max_body_bytes"),
        503: Answer(f"The spool could not commit it; Retry-After: {RETRY_AFTER_SECONDS}"),
    },
)
async def ingest_uplink(request: web.Request) -> web.StreamResponse:
    control = request.app[CONTROL]
    ingest_id = request.match_info["ingestId"]
    entry = _entry(control, ingest_id)
    label = entry.id if entry is not None else UNKNOWN_INGEST
    requests = control.metrics.ingest_requests

    def refuse(result: str, answer: ApiError, reason: str, **fields: Any) -> ApiError:
        requests.labels(label, result).inc()
        if _budget.take():
            log.warning("Ingest request refused", ingest=label, reason=reason, **fields)
        return answer

    if entry is None:
        hmac.compare_digest(_DUMMY, _DUMMY)  # about the time a wrong credential takes
        raise refuse("unauthorized", _unauthorized(), "no such ingest id", id=ingest_id[:64])
    # Credentials that do not depend on the body are checked before reading it.
    if entry.auth == "header":
        assert entry.header is not None
        if not _header_ok(request, entry.header, secret_value(entry.token) or ""):
            raise refuse("unauthorized", _unauthorized(), f"wrong or missing {entry.header}")
    elif entry.auth == "bearer" and not _bearer_ok(request, secret_value(entry.token) or ""):
        raise refuse("unauthorized", _unauthorized(), "wrong or missing bearer token")
    body = await _read_bounded(request, entry.max_body_bytes)
    if body is None:
        raise refuse(
            "rejected",
            ApiError(
                413,
                "payload_too_large",
                f"The body is larger than this ingest's {entry.max_body_bytes} bytes.",
            ),
            "too_large",
        )
    token: str | None = None
    replays = request.app[INGEST_REPLAYS]
    if entry.auth == "thingpark":
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            document = None  # no body elements: the Token cannot match
        try:
            token, sent_at = verify_uplink(
                request.query_string,
                document,
                as_id=entry.as_id or "",
                key=secret_value(entry.as_key) or "",
                now=datetime.now(UTC),
                max_skew=entry.max_clock_skew,
            )
            replays.use(token, sent_at, entry.max_clock_skew)
        except Unauthorized as exc:
            raise refuse("unauthorized", _unauthorized(), str(exc)) from None
    if entry.format == "chirpstack":
        event = request.query.get("event", CHIRPSTACK_UPLINK_EVENT)
        if event != CHIRPSTACK_UPLINK_EVENT:
            # Acknowledged so that ChirpStack does not log a failure for every join or
            # status event; counted, and not logged (they are routine).
            control.metrics.uplinks_rejected.labels("not_uplink").inc()
            requests.labels(label, "rejected").inc()
            log.debug("Ingest event that is not an uplink", ingest=label, kind=event[:40])
            return web.Response(status=204)
    try:
        commit = control.accept(entry.format, body, hold=False, ingest=label)
    except Rejection as rejection:
        requests.labels(label, "rejected").inc()  # logged by the daemon, rate-limited
        status = 413 if rejection.reason == "too_large" else 400
        raise ApiError(
            status,
            rejection.reason,
            f"The body is not a {entry.format} uplink: {rejection.message}.",
        ) from None
    if commit is not None:
        try:
            # Shielded: a client that hangs up must not cancel a spool write half-way.
            await asyncio.shield(commit)
        except Exception as exc:
            # The spool could not take it (disk full, closed while stopping): the sender
            # keeps the uplink and retries; a retried ThingPark Token is not a replay.
            if token is not None:
                replays.release(token)
            raise refuse(
                "unavailable",
                ApiError(
                    503,
                    "spool_unavailable",
                    "The uplink could not be stored; try again later.",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                ),
                "spool commit failed",
                error=str(exc) or type(exc).__name__,
            ) from None
    requests.labels(label, "accepted").inc()
    return json(dump(IngestAccepted(accepted=True, routed=commit is not None)))
