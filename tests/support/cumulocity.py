"""A local Cumulocity tenant: the REST resources iotflow uses, as Cumulocity documents them.

Cumulocity cannot be reached from the test machine, so `FakeCumulocity` plays one tenant,
following Cumulocity's public REST reference (guides/reference: rest-implementation,
identity, inventory, events, measurements, device-control):

- Authentication: HTTP Basic, user `{tenantId}/{username}` (or `{username}` alone, the
  tenant then being the host's); anything else is 401 with `WWW-Authenticate: Basic` and
  an error body.
- Errors: `{"error": "<domain>/<kind>", "message": "...", "info": "<doc URL>"}` as
  `application/vnd.com.nsn.cumulocity.error+json`.
- Media types: a request body must be `application/json` or the resource's
  `application/vnd.com.nsn.cumulocity.<type>+json` (else 415); an `Accept` that admits
  neither is 406. Without `Accept`, a POST or PUT answers 201/200 with an empty body, as
  the reference warns.
- Resources: `GET /identity/externalIds/{type}/{id}` (404 when unknown),
  `GET|POST /identity/globalIds/{id}/externalIds` (409 for an external id already bound),
  `POST /inventory/managedObjects`, `GET|DELETE /inventory/managedObjects/{id}`,
  `POST /event/events` and `POST /measurement/measurements` (422 without their mandatory
  fields or with an unknown source), `GET /devicecontrol/operations` (filters `deviceId`,
  `agentId`, `status`, `fragmentType`, `pageSize`), `GET|PUT /devicecontrol/operations/{id}`.

Tests add operations (`add_operation`), inject failures (`fail`), and read what the tenant
holds (`managed_objects`, `external_ids`, `events`, `measurements`, `operations`) and every
request it saw (`requests`, `count`).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from .server import LocalHttpServer

HOST = "127.0.0.1"
INFO = "https://cumulocity.com/guides/reference/rest-implementation"
MEDIA = "application/vnd.com.nsn.cumulocity.{}+json"
STATUSES = ("PENDING", "EXECUTING", "SUCCESSFUL", "FAILED")

# The request body, parsed and checked to be a JSON object, for the POST and PUT handlers.
BODY = web.RequestKey("body", dict[str, Any])

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Call:
    """One request as the tenant saw it."""

    method: str
    path: str
    query: dict[str, str]
    json: Any
    login: str | None  # the Basic user name, `tenant/user`
    headers: dict[str, str]
    status: int | None = None


@dataclass
class Failure:
    """An injected answer, instead of what the resource would do."""

    status: int
    method: str | None = None  # None: any method
    path: str | None = None  # a path prefix; None: any path
    error: str = "general/internalError"
    message: str = "Injected failure"
    delay: float = 0.0  # seconds before answering (a slow tenant, for timeouts)
    headers: dict[str, str] = field(default_factory=dict)
    reset: bool = False  # drop the connection instead of answering

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (
            self.path is None or path.startswith(self.path)
        )


class FakeCumulocity(LocalHttpServer):
    """An aiohttp server on a free port of 127.0.0.1, in the test's event loop."""

    def __init__(
        self, tenant: str = "t1234", username: str = "iotflow", password: str = "c8y-secret"
    ) -> None:
        self.tenant = tenant
        self.username = username
        self.password = password
        self.managed_objects: dict[str, dict[str, Any]] = {}
        self.external_ids: dict[tuple[str, str], str] = {}  # (type, value) → managed object id
        self.events: list[dict[str, Any]] = []
        self.measurements: list[dict[str, Any]] = []
        self.operations: dict[str, dict[str, Any]] = {}
        # Every status an operation was given, in order, by operation id.
        self.operation_history: dict[str, list[str]] = {}
        self.requests: list[Call] = []
        self._ids = itertools.count(10_001)
        self._one_shot: deque[Failure] = deque()
        self._standing: list[Failure] = []
        self._held: tuple[str, str] | None = None  # (method, path prefix) left unanswered
        self._release = asyncio.Event()
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        routes = [
            ("GET", "/identity/externalIds/{type}/{value}", self._get_external_id),
            ("GET", "/identity/globalIds/{id}/externalIds", self._list_external_ids),
            ("POST", "/identity/globalIds/{id}/externalIds", self._create_external_id),
            ("POST", "/inventory/managedObjects", self._create_managed_object),
            ("GET", "/inventory/managedObjects/{id}", self._get_managed_object),
            ("DELETE", "/inventory/managedObjects/{id}", self._delete_managed_object),
            ("POST", "/event/events", self._create_event),
            ("POST", "/measurement/measurements", self._create_measurement),
            ("GET", "/devicecontrol/operations", self._list_operations),
            ("GET", "/devicecontrol/operations/{id}", self._get_operation),
            ("PUT", "/devicecontrol/operations/{id}", self._update_operation),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, HOST, 0)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- test controls ---------------------------------------------------------------------

    def fail(
        self,
        status: int,
        *,
        method: str | None = None,
        path: str | None = None,
        times: int | None = 1,
        error: str | None = None,
        message: str | None = None,
        delay: float = 0.0,
        retry_after: int | str | None = None,
        reset: bool = False,
    ) -> None:
        """Answer `status` to the next `times` matching requests (None: until `heal()`);
        `reset`: drop their connection instead. `retry_after`: seconds or an HTTP date."""
        failure = Failure(
            status=status,
            method=method,
            path=path,
            error=error or _default_error(status),
            message=message or f"Injected {status}",
            delay=delay,
            headers={"Retry-After": str(retry_after)} if retry_after is not None else {},
            reset=reset,
        )
        if times is None:
            self._standing.append(failure)
        else:
            self._one_shot.extend([failure] * times)

    def heal(self) -> None:
        self._one_shot.clear()
        self._standing.clear()

    def hold(self, method: str, path: str) -> None:
        """Leave matching requests unanswered (they are recorded) until `release`."""
        self._held = (method, path)
        self._release.clear()

    def release(self) -> None:
        self._held = None
        self._release.set()

    def add_device(self, serial: str, name: str | None = None) -> str:
        """A device registered by someone else, with its `c8y_Serial` external id."""
        device = self._new_managed_object({"name": name or serial, "c8y_IsDevice": {}})
        self.external_ids[("c8y_Serial", serial)] = device["id"]
        return str(device["id"])

    def add_operation(self, device_id: str, description: str = "", **fragments: Any) -> str:
        """A PENDING operation for a device, as the Device Management UI creates one."""
        if device_id not in self.managed_objects:
            raise KeyError(f"no managed object {device_id}")
        operation_id = str(next(self._ids))
        self.operations[operation_id] = {
            "id": operation_id,
            "self": f"{self.base_url}/devicecontrol/operations/{operation_id}",
            "deviceId": device_id,
            "agentId": device_id,
            "creationTime": _now(),
            "status": "PENDING",
            "description": description or "Operation",
            **fragments,
        }
        self.operation_history[operation_id] = ["PENDING"]
        return operation_id

    def device_of(self, serial: str) -> dict[str, Any] | None:
        device = self.external_ids.get(("c8y_Serial", serial))
        return self.managed_objects.get(device) if device is not None else None

    def count(self, method: str, path_prefix: str, *, status: int | None = None) -> int:
        return sum(
            1
            for c in self.requests
            if c.method == method
            and c.path.startswith(path_prefix)
            and (status is None or c.status == status)
        )

    async def wait_until(
        self, predicate: Callable[[], bool], *, timeout: float = 30.0, what: str = ""
    ) -> None:
        """Wait until `predicate()` holds (checked after every request); fail with the log."""
        async with self._changed:
            try:
                async with asyncio.timeout(timeout):
                    await self._changed.wait_for(predicate)
            except TimeoutError:
                raise AssertionError(
                    f"FakeCumulocity: {what or 'condition'} not met within {timeout}s."
                    f" Requests:\n{self.describe()}"
                ) from None

    def describe(self) -> str:
        if not self.requests:
            return "  (no request at all)"
        lines = []
        for c in self.requests:
            query = "&".join(f"{k}={v}" for k, v in c.query.items())
            target = f"{c.path}?{query}" if query else c.path
            body = orjson.dumps(c.json).decode()[:160] if c.json is not None else ""
            lines.append(f"  {c.method} {target} -> {c.status} {body}")
        return "\n".join(lines)

    # -- serving ---------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        raw = await request.read()
        try:
            parsed = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            parsed = _UNPARSABLE
        call = Call(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            json=None if parsed is _UNPARSABLE else parsed,
            login=_basic_login(request),
            headers=dict(request.headers),
        )
        self.requests.append(call)
        try:
            response = await self._answer(request, handler, parsed)
        except web.HTTPException as exc:
            # aiohttp's own 404/405 for paths and methods the tenant does not have.
            response = _error(exc.status, "general/notFound", exc.reason)
        call.status = response.status
        async with self._changed:
            self._changed.notify_all()
        return response

    async def _answer(
        self, request: web.Request, handler: Handler, parsed: Any
    ) -> web.StreamResponse:
        # Authentication comes first, as on the platform: no credential, no information.
        if not self._authenticated(request):
            return _error(
                401,
                "security/Unauthorized",
                "Invalid credentials! : Bad credentials",
                headers={"WWW-Authenticate": 'Basic realm="Cumulocity"'},
            )
        held = self._held
        if held is not None and request.method == held[0] and request.path.startswith(held[1]):
            async with self._changed:
                self._changed.notify_all()  # arrived, answered or not
            await self._release.wait()
        failure = self._next_failure(request.method, request.path)
        if failure is not None and failure.reset and request.transport is not None:
            request.transport.abort()
            return web.Response(status=500)  # never sent: the connection is gone
        if failure is not None:
            if failure.delay:
                await asyncio.sleep(failure.delay)
            return _error(failure.status, failure.error, failure.message, failure.headers)
        resource = _resource_of(request)
        if request.method in ("POST", "PUT"):
            content_type = request.headers.get("Content-Type", "")
            if not _media_accepted(content_type, resource, accept=False):
                return _error(415, "general/unsupportedMediaType", f"Content type {content_type!r}")
            if parsed is _UNPARSABLE or not isinstance(parsed, dict):
                return _error(422, "general/invalidJson", "Could not parse the request body")
        accept = request.headers.get("Accept")
        if accept is not None and not _media_accepted(accept, resource, accept=True):
            return _error(406, "general/notAcceptable", f"Cannot produce {accept!r}")
        if isinstance(parsed, dict):
            request[BODY] = parsed
        response = await handler(request)
        if accept is None and request.method in ("POST", "PUT") and response.status < 300:
            # "For all PUT/POST requests an accept header should be provided, otherwise an
            # empty response body will be returned."
            return web.Response(status=response.status)
        return response

    def _authenticated(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            login, _, password = base64.b64decode(encoded).decode("utf-8").partition(":")
        except ValueError:
            return False
        return password == self.password and login in (
            f"{self.tenant}/{self.username}",
            self.username,
        )

    def _next_failure(self, method: str, path: str) -> Failure | None:
        for failure in self._one_shot:
            if failure.matches(method, path):
                self._one_shot.remove(failure)
                return failure
        return next((f for f in self._standing if f.matches(method, path)), None)

    # -- identity --------------------------------------------------------------------------

    def _external_id(self, kind: str, value: str, device: str) -> dict[str, Any]:
        return {
            "self": f"{self.base_url}/identity/externalIds/{kind}/{value}",
            "externalId": value,
            "type": kind,
            "managedObject": {
                "id": device,
                "self": f"{self.base_url}/inventory/managedObjects/{device}",
            },
        }

    async def _get_external_id(self, request: web.Request) -> web.Response:
        kind, value = request.match_info["type"], request.match_info["value"]
        device = self.external_ids.get((kind, value))
        if device is None:
            return _error(
                404,
                "identity/Not Found",
                f"External id not found; external id = ID [type={kind}, value={value}]",
            )
        return _json(200, self._external_id(kind, value, device), "externalid")

    async def _list_external_ids(self, request: web.Request) -> web.Response:
        device = request.match_info["id"]
        if device not in self.managed_objects:
            return _not_found("inventory", device)
        found = [
            self._external_id(kind, value, mo)
            for (kind, value), mo in self.external_ids.items()
            if mo == device
        ]
        return _json(200, {"externalIds": found}, "externalidcollection")

    async def _create_external_id(self, request: web.Request) -> web.Response:
        device = request.match_info["id"]
        body = request[BODY]
        kind, value = body.get("type"), body.get("externalId")
        if not isinstance(kind, str) or not isinstance(value, str) or not kind or not value:
            return _validation_error("externalId, type")
        if device not in self.managed_objects:
            return _not_found("inventory", device)
        if (kind, value) in self.external_ids:
            return _error(
                409,
                "identity/Conflict",
                f"External id already bound: ID [type={kind}, value={value}]",
            )
        self.external_ids[(kind, value)] = device
        return _json(201, self._external_id(kind, value, device), "externalid")

    # -- inventory -------------------------------------------------------------------------

    def _new_managed_object(self, body: dict[str, Any]) -> dict[str, Any]:
        device = str(next(self._ids))
        now = _now()
        document = {
            **body,
            "id": device,
            "self": f"{self.base_url}/inventory/managedObjects/{device}",
            "creationTime": now,
            "lastUpdated": now,
            "owner": self.username,
        }
        self.managed_objects[device] = document
        return document

    async def _create_managed_object(self, request: web.Request) -> web.Response:
        body = {k: v for k, v in request[BODY].items() if k not in ("id", "self")}
        return _json(201, self._new_managed_object(body), "managedobject")

    async def _get_managed_object(self, request: web.Request) -> web.Response:
        device = self.managed_objects.get(request.match_info["id"])
        if device is None:
            return _not_found("inventory", request.match_info["id"])
        return _json(200, device, "managedobject")

    async def _delete_managed_object(self, request: web.Request) -> web.Response:
        device = request.match_info["id"]
        if self.managed_objects.pop(device, None) is None:
            return _not_found("inventory", device)
        # Its external ids go with it, as on the platform.
        for key in [k for k, mo in self.external_ids.items() if mo == device]:
            del self.external_ids[key]
        return web.Response(status=204)

    # -- events and measurements -----------------------------------------------------------

    def _source_problem(self, body: dict[str, Any], fields: tuple[str, ...]) -> web.Response | None:
        missing = [f for f in fields if body.get(f) in (None, "")]
        if missing:
            return _validation_error(", ".join(missing))
        if not isinstance(body["time"], str) or not _valid_time(body["time"]):
            return _error(422, "undefined/validationError", f"Invalid time {body['time']!r}")
        source = body["source"]
        source_id = source.get("id") if isinstance(source, dict) else None
        if not isinstance(source_id, str) or source_id not in self.managed_objects:
            return _error(
                422,
                "undefined/validationError",
                f"Source with id {source_id} does not exist",
            )
        return None

    async def _create_event(self, request: web.Request) -> web.Response:
        body = request[BODY]
        problem = self._source_problem(body, ("source", "type", "text", "time"))
        if problem is not None:
            return problem
        event_id = str(next(self._ids))
        event = {
            **body,
            "id": event_id,
            "self": f"{self.base_url}/event/events/{event_id}",
            "creationTime": _now(),
        }
        self.events.append(event)
        return _json(201, event, "event")

    async def _create_measurement(self, request: web.Request) -> web.Response:
        body = request[BODY]
        problem = self._source_problem(body, ("source", "type", "time"))
        if problem is not None:
            return problem
        for name, fragment in body.items():
            if name in ("source", "type", "time") or not isinstance(fragment, dict):
                continue
            for series, value in fragment.items():
                number = value.get("value") if isinstance(value, dict) else None
                if isinstance(number, bool) or not isinstance(number, int | float):
                    return _error(
                        422,
                        "measurement/Unprocessable Entity",
                        f"Series {name}.{series} has no numeric value",
                    )
        measurement_id = str(next(self._ids))
        measurement = {
            **body,
            "id": measurement_id,
            "self": f"{self.base_url}/measurement/measurements/{measurement_id}",
        }
        self.measurements.append(measurement)
        return _json(201, measurement, "measurement")

    # -- device control --------------------------------------------------------------------

    async def _list_operations(self, request: web.Request) -> web.Response:
        query = request.query
        page_size = int(query.get("pageSize", "5"))  # Cumulocity's default page is 5
        found = [
            op
            for op in self.operations.values()
            if all(
                query.get(key) in (None, op.get(key)) for key in ("deviceId", "agentId", "status")
            )
            and ("fragmentType" not in query or query["fragmentType"] in op)
        ]
        page = found[:page_size]
        return _json(
            200,
            {
                "self": str(request.url),
                "operations": page,
                "statistics": {"pageSize": page_size, "currentPage": 1},
            },
            "operationcollection",
        )

    async def _get_operation(self, request: web.Request) -> web.Response:
        operation = self.operations.get(request.match_info["id"])
        if operation is None:
            return _not_found("devicecontrol", request.match_info["id"])
        return _json(200, operation, "operation")

    async def _update_operation(self, request: web.Request) -> web.Response:
        operation_id = request.match_info["id"]
        operation = self.operations.get(operation_id)
        if operation is None:
            return _not_found("devicecontrol", operation_id)
        body = request[BODY]
        status = body.get("status")
        if status is not None and status not in STATUSES:
            return _error(422, "undefined/validationError", f"Invalid status {status!r}")
        operation.update({k: v for k, v in body.items() if k not in ("id", "self", "deviceId")})
        if status is not None:
            self.operation_history[operation_id].append(status)
        return _json(200, operation, "operation")


_UNPARSABLE = object()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _valid_time(text: str) -> bool:
    try:
        return datetime.fromisoformat(text).utcoffset() is not None
    except ValueError:
        return False


def _basic_login(request: web.Request) -> str | None:
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        return base64.b64decode(encoded).decode("utf-8").partition(":")[0]
    except ValueError:
        return None


def _resource_of(request: web.Request) -> str:
    """The media type name of what a request reads or writes."""
    path = request.path
    if path.startswith("/identity/"):
        return (
            "externalid"
            if request.method == "POST" or "/externalIds/" in path
            else ("externalidcollection")
        )
    if path.startswith("/inventory/"):
        return "managedobject"
    if path.startswith("/event/"):
        return "event"
    if path.startswith("/measurement/"):
        return "measurement"
    if path == "/devicecontrol/operations" and request.method == "GET":
        return "operationcollection"
    return "operation"


def _media_accepted(header: str, resource: str, *, accept: bool) -> bool:
    """Media types are case-insensitive (RFC 9110 8.3.1); parameters do not matter here."""
    wanted = {"application/json", MEDIA.format(resource).lower()}
    if accept:
        wanted |= {"*/*", "application/*", MEDIA.format("error").lower()}
    offered = {part.split(";")[0].strip().lower() for part in header.split(",")}
    return bool(wanted & offered)


def _json(status: int, body: Any, resource: str) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type=MEDIA.format(resource),
        charset="utf-8",
    )


def _error(
    status: int, error: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"error": error, "message": message, "info": INFO}),
        content_type=MEDIA.format("error"),
        charset="utf-8",
        headers=headers,
    )


def _not_found(domain: str, object_id: str) -> web.Response:
    return _error(404, f"{domain}/Not Found", f"Finding object with id {object_id} failed")


def _validation_error(fields: str) -> web.Response:
    return _error(
        422,
        "undefined/validationError",
        f"Following mandatory fields should be included: {fields}",
    )


def _default_error(status: int) -> str:
    if status == 401:
        return "security/Unauthorized"
    if status == 422:
        return "undefined/validationError"
    if status >= 500:
        return "general/internalError"
    return "general/badRequest"
