"""Local doubles of three clouds' write APIs, as their public documentation describes them.

They cannot be reached from the test machine (and Debian's InfluxDB, 1.6, has no v2 write
API), so each is an aiohttp server on a free port of 127.0.0.1, in the test's event loop:

- `FakeThingsBoard`: the HTTP device API, `POST /api/v1/{accessToken}/telemetry`
  (thingsboard.io/docs/reference/http-api): 200 with an empty body; 401 for a token no device
  has; 400 for a body that is not a JSON object (or array of them), a `ts` that is not an
  integer, `values` that is not an object, a null value; 413 past the transport's payload
  limit (65536 bytes by default).
- `FakeSplunkHec`: the HTTP Event Collector, `POST /services/collector/event`, `GET
  /services/collector/health` (Splunk "Format events for HTTP Event Collector",
  "Troubleshoot HTTP Event Collector"): answers `{"text", "code"}` — 200/0 Success, 401/2
  Token is required, 401/3 Invalid authorization, 403/4 Invalid token, 403/1 Token
  disabled, 400/5 No data, 400/6 Invalid data format, 400/7 Incorrect index, 400/10 Data
  channel is missing (a token with indexer acknowledgment), 400/12 Event field is required,
  400/13 Event field cannot be blank, 503/9 Server is busy; 413 past `max_content_length`.
  A body may hold several event objects one after the other (a batch).
- `FakeInfluxDb`: the v2 write API, `POST /api/v2/write?org=&bucket=&precision=`
  (docs.influxdata.com/influxdb/v2: "Write data", "Troubleshoot issues writing data",
  "Line protocol"): 204 written; 401 `unauthorized` without `Authorization: Token <token>`
  of a known token; 404 `not found` for an unknown org or bucket; 400 `invalid` for a line
  that does not parse (strictly, with the documented escaping rules: `parse_line`) or a
  precision other than ns/us/ms/s; 413 `request too large`; 422 `unprocessable entity` for
  a field of another type than the one already written. Errors are `{"code", "message"}`.

Every double records each request (`requests`), takes injected answers first (`fail`: a
status with Retry-After and a body, a reset connection, or a hang until `release`), and
lets a test wait for what it holds (`wait_until`).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .server import LocalHttpServer

HOST = "127.0.0.1"
Handler = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


@dataclass
class Call:
    """One request as the double saw it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    status: int | None = None


@dataclass
class Injected:
    """An answer given instead of what the API would do."""

    status: int = 500
    body: Any = None  # JSON; None: the API's own error shape for the status
    headers: dict[str, str] = field(default_factory=dict)
    reset: bool = False  # drop the connection instead of answering
    hang: bool = False  # answer only once released


class ServiceDouble(LocalHttpServer):
    """What the three doubles share: routes, records, injected answers, holding."""

    def __init__(self) -> None:
        self.requests: list[Call] = []
        self._injected: deque[Injected] = deque()
        self._held = False
        self._gate = asyncio.Event()
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    def routes(self) -> list[tuple[str, str, Handler]]:
        raise NotImplementedError

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def error_body(self, status: int, message: str) -> Any:
        """The API's error document for an injected status."""
        return {"message": message}

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=1 << 26)
        for method, path, handler in self.routes():
            app.router.add_route(method, path, self._wrap(handler))
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
        self.release()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- test controls -------------------------------------------------------------------

    def fail(
        self,
        status: int = 500,
        *,
        times: int = 1,
        retry_after: int | str | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
        reset: bool = False,
        hang: bool = False,
    ) -> None:
        """Answer the next `times` requests so, whatever they carry."""
        all_headers = dict(headers or {})
        if retry_after is not None:
            all_headers["Retry-After"] = str(retry_after)
        self._injected.extend([Injected(status, body, all_headers, reset=reset, hang=hang)] * times)

    def hold(self) -> None:
        """Leave every request unanswered (recorded) until `release`."""
        self._held = True
        self._gate.clear()

    def release(self) -> None:
        self._held = False
        self._gate.set()

    async def wait_until(
        self, predicate: Callable[[], bool], *, timeout: float = 30, what: str = "condition"
    ) -> None:
        async with self._changed:
            try:
                async with asyncio.timeout(timeout):
                    await self._changed.wait_for(predicate)
            except TimeoutError:
                raise AssertionError(
                    f"{type(self).__name__}: no {what} within {timeout}s; requests:\n"
                    + self.describe()
                ) from None

    def describe(self) -> str:
        return "\n".join(
            f"  {c.method} {c.path} -> {c.status} {c.body[:160]!r}" for c in self.requests
        )

    def count(self, status: int | None = None) -> int:
        return sum(1 for c in self.requests if status is None or c.status == status)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- serving -------------------------------------------------------------------------

    def _wrap(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def serve(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            call = Call(
                request.method,
                request.path,
                dict(request.query),
                dict(request.headers),
                body,
            )
            self.requests.append(call)
            injected = self._injected.popleft() if self._injected else None
            await self._notify()
            if self._held or (injected is not None and injected.hang):
                await self._gate.wait()
            if injected is not None and injected.reset and request.transport is not None:
                request.transport.abort()
                return web.Response(status=500)  # never sent: the connection is gone
            if injected is not None and not injected.hang:
                payload = (
                    injected.body
                    if injected.body is not None
                    else self.error_body(injected.status, f"Injected {injected.status}")
                )
                response: web.StreamResponse = web.json_response(
                    payload, status=injected.status, headers=injected.headers
                )
            else:
                response = await handler(request, body)
            call.status = response.status
            await self._notify()
            return response

        return serve


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return _INVALID


_INVALID = object()


# -- ThingsBoard -------------------------------------------------------------------------


class FakeThingsBoard(ServiceDouble):
    """ThingsBoard's HTTP device API for the devices `add_device` registered."""

    def __init__(self, max_payload: int = 65536) -> None:
        super().__init__()
        self.max_payload = max_payload
        self.tokens: dict[str, str] = {}  # access token → device name
        # Device name → the telemetry records it received, as sent ({"ts", "values"} or flat).
        self.telemetry: dict[str, list[dict[str, Any]]] = {}

    def add_device(self, name: str, token: str) -> None:
        self.tokens[token] = name
        self.telemetry.setdefault(name, [])

    def url_of(self, token: str) -> str:
        return self.url(f"/api/v1/{token}/telemetry")

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [("POST", "/api/v1/{token}/telemetry", self._telemetry)]

    def error_body(self, status: int, message: str) -> Any:
        return {"status": status, "message": message, "errorCode": 2}

    def records(self, name: str) -> list[dict[str, Any]]:
        return self.telemetry.get(name, [])

    async def _telemetry(self, request: web.Request, body: bytes) -> web.StreamResponse:
        device = self.tokens.get(request.match_info["token"])
        if device is None:
            return web.Response(status=401)
        if len(body) > self.max_payload:
            return web.Response(status=413)
        document = _json(body)
        records = document if isinstance(document, list) else [document]
        for record in records:
            problem = _telemetry_problem(record)
            if problem is not None:
                return web.json_response(self.error_body(400, problem), status=400)
        self.telemetry[device].extend(records)
        return web.Response(status=200)


def _telemetry_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return "Invalid JSON: expected an object"
    if "ts" in record:
        ts, values = record.get("ts"), record.get("values")
        if not isinstance(ts, int) or isinstance(ts, bool):
            return "ts must be a long"
        if not isinstance(values, dict):
            return "values must be an object"
        record = values
    for key, value in record.items():
        if not key:
            return "empty key"
        if value is None:
            return f"Can't parse value of {key}"
    return None


# -- Splunk HEC --------------------------------------------------------------------------


def hec(text: str, code: int) -> dict[str, Any]:
    return {"text": text, "code": code}


class FakeSplunkHec(ServiceDouble):
    """One HEC token of a Splunk instance, and the indexes it may write."""

    def __init__(
        self,
        token: str,
        *,
        indexes: tuple[str, ...] = ("main",),
        max_content_length: int = 1_000_000,
    ) -> None:
        super().__init__()
        self.token = token
        self.indexes = indexes
        self.default_index = indexes[0]
        self.max_content_length = max_content_length
        self.disabled = False
        self.use_ack = False  # indexer acknowledgment: requests need a channel
        self.events: list[dict[str, Any]] = []  # as indexed: the envelope, index filled in

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("POST", "/services/collector/event", self._event),
            ("GET", "/services/collector/health", self._health),
        ]

    def error_body(self, status: int, message: str) -> Any:
        codes = {500: 8, 503: 9, 401: 3, 403: 4, 400: 6}
        return hec(message, codes.get(status, 8))

    async def _health(self, request: web.Request, body: bytes) -> web.StreamResponse:
        return web.json_response(hec("HEC is healthy", 17))

    def _refusal(self, request: web.Request) -> web.Response | None:
        authorization = request.headers.get("Authorization")
        if authorization is None:
            return web.json_response(hec("Token is required", 2), status=401)
        scheme, _, token = authorization.partition(" ")
        if scheme != "Splunk" or not token:
            return web.json_response(hec("Invalid authorization", 3), status=401)
        if token != self.token:
            return web.json_response(hec("Invalid token", 4), status=403)
        if self.disabled:
            return web.json_response(hec("Token disabled", 1), status=403)
        return None

    async def _event(self, request: web.Request, body: bytes) -> web.StreamResponse:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        if len(body) > self.max_content_length:
            return web.json_response(hec("Content length too large", 27), status=413)
        if self.use_ack and "X-Splunk-Request-Channel" not in request.headers:
            return web.json_response(hec("Data channel is missing", 10), status=400)
        if not body.strip():
            return web.json_response(hec("No data", 5), status=400)
        accepted = []
        decoder = json.JSONDecoder()
        text, at = body.decode("utf-8", "replace"), 0
        while at < len(text):
            while at < len(text) and text[at].isspace():
                at += 1
            if at == len(text):
                break
            try:
                envelope, at = decoder.raw_decode(text, at)
            except ValueError:
                return web.json_response(hec("Invalid data format", 6), status=400)
            if not isinstance(envelope, dict):
                return web.json_response(hec("Invalid data format", 6), status=400)
            if "event" not in envelope:
                return web.json_response(hec("Event field is required", 12), status=400)
            if envelope["event"] in ("", None):
                return web.json_response(hec("Event field cannot be blank", 13), status=400)
            index = envelope.get("index", self.default_index)
            if index not in self.indexes:
                return web.json_response(hec("Incorrect index", 7), status=400)
            accepted.append({**envelope, "index": index})
        self.events.extend(accepted)
        return web.json_response(hec("Success", 0))


# -- InfluxDB ----------------------------------------------------------------------------


class LineError(ValueError):
    """A line that does not parse, with why."""


@dataclass(frozen=True)
class Point:
    measurement: str
    tags: dict[str, str]
    fields: dict[str, float | int | bool | str]
    timestamp: int | None


_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INT = re.compile(r"[+-]?[0-9]+i")
_UINT = re.compile(r"[0-9]+u")
_TRUE = {"t", "T", "true", "True", "TRUE"}
_FALSE = {"f", "F", "false", "False", "FALSE"}
_TIMESTAMP = re.compile(r"-?[0-9]+")


def _scan(text: str, at: int, stops: str, specials: str) -> tuple[str, int]:
    """Read an unquoted element from `at` up to an unescaped character of `stops`. A
    backslash escapes one of `specials` or a backslash; before anything else it is literal."""
    out = []
    while at < len(text):
        ch = text[at]
        if ch == "\\" and at + 1 < len(text) and (text[at + 1] in specials or text[at + 1] == "\\"):
            out.append(text[at + 1])
            at += 2
            continue
        if ch in stops:
            break
        out.append(ch)
        at += 1
    return "".join(out), at


def _name(kind: str, value: str) -> str:
    if not value:
        raise LineError(f"missing {kind}")
    if value.startswith("_"):
        raise LineError(f"{kind} {value!r}: names starting with '_' are reserved")
    return value


def parse_line(text: str) -> Point:
    """One line of line protocol, read strictly as InfluxDB v2 documents it."""
    measurement, at = _scan(text, 0, ", ", ", ")
    _name("measurement", measurement)
    tags: dict[str, str] = {}
    while at < len(text) and text[at] == ",":
        key, at = _scan(text, at + 1, "=, ", ",= ")
        if at >= len(text) or text[at] != "=":
            raise LineError(f"missing tag value of {key!r}")
        value, at = _scan(text, at + 1, ", ", ",= ")
        tags[_name("tag key", key)] = value
        if not value:
            raise LineError(f"missing tag value of {key!r}")
    if at >= len(text) or text[at] != " ":
        raise LineError("missing fields")
    at += 1
    fields: dict[str, float | int | bool | str] = {}
    while True:
        key, at = _scan(text, at, "=, ", ",= ")
        if key == "time":
            raise LineError("invalid field name: 'time'")
        _name("field key", key)
        if at >= len(text) or text[at] != "=":
            raise LineError(f"missing field value of {key!r}")
        at += 1
        if at < len(text) and text[at] == '"':
            value_chars = []
            at += 1
            while True:
                if at >= len(text):
                    raise LineError(f"unterminated string of field {key!r}")
                ch = text[at]
                if ch == "\\" and at + 1 < len(text) and text[at + 1] in '"\\':
                    value_chars.append(text[at + 1])
                    at += 2
                elif ch == '"':
                    at += 1
                    break
                else:
                    value_chars.append(ch)
                    at += 1
            fields[key] = "".join(value_chars)
        else:
            raw, at = _scan(text, at, ", ", "")
            fields[key] = _field_value(key, raw)
        if at < len(text) and text[at] == ",":
            at += 1
            continue
        break
    timestamp = None
    if at < len(text):
        if text[at] != " ":
            raise LineError(f"unexpected {text[at]!r} after the fields")
        raw = text[at + 1 :]
        if not _TIMESTAMP.fullmatch(raw):
            raise LineError(f"bad timestamp {raw!r}")
        timestamp = int(raw)
    return Point(measurement, tags, fields, timestamp)


def _field_value(key: str, raw: str) -> float | int | bool:
    if _INT.fullmatch(raw):
        number = int(raw[:-1])
        if not -(2**63) <= number < 2**63:
            raise LineError(f"field {key!r}: integer out of range")
        return number
    if _UINT.fullmatch(raw):
        return int(raw[:-1])
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    if _FLOAT.fullmatch(raw):
        return float(raw)
    raise LineError(f"field {key!r}: invalid value {raw!r}")


def _type(value: float | int | bool | str) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    return "string"


_PRECISION = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}


class FakeInfluxDb(ServiceDouble):
    """One InfluxDB 2 instance: its orgs, buckets, tokens, and the points written."""

    def __init__(
        self, token: str, *, org: str = "acme", bucket: str = "lora", max_body: int = 1 << 20
    ) -> None:
        super().__init__()
        self.token = token
        self.orgs = {org}
        self.buckets = {(org, bucket)}
        self.max_body = max_body
        # (org, bucket) → points written, timestamps in nanoseconds.
        self.points: dict[tuple[str, str], list[Point]] = {}
        self._types: dict[tuple[str, str, str, str], str] = {}

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [("POST", "/api/v2/write", self._write)]

    def error_body(self, status: int, message: str) -> Any:
        codes = {
            400: "invalid",
            401: "unauthorized",
            404: "not found",
            413: "request too large",
            422: "unprocessable entity",
            429: "too many requests",
            503: "unavailable",
        }
        return {"code": codes.get(status, "internal error"), "message": message}

    def _error(self, status: int, message: str) -> web.Response:
        return web.json_response(self.error_body(status, message), status=status)

    def written(self, org: str = "acme", bucket: str = "lora") -> list[Point]:
        return self.points.get((org, bucket), [])

    async def _write(self, request: web.Request, body: bytes) -> web.StreamResponse:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Token" or token != self.token:
            return self._error(401, "unauthorized access")
        org, bucket = request.query.get("org", ""), request.query.get("bucket", "")
        if org not in self.orgs:
            return self._error(404, f'organization name "{org}" not found')
        if (org, bucket) not in self.buckets:
            return self._error(404, f'bucket "{bucket}" not found')
        precision = request.query.get("precision", "ns")
        if precision not in _PRECISION:
            return self._error(400, f"invalid precision {precision!r}")
        if len(body) > self.max_body:
            return self._error(413, "request body too large")
        points = []
        for number, text in enumerate(body.decode("utf-8", "replace").split("\n"), 1):
            if not text.strip() or text.startswith("#"):
                continue
            try:
                point = parse_line(text)
            except LineError as exc:
                return self._error(400, f"unable to parse '{text[:120]}': line {number}: {exc}")
            if point.timestamp is not None:
                point = Point(
                    point.measurement,
                    point.tags,
                    point.fields,
                    point.timestamp * _PRECISION[precision],
                )
            points.append(point)
        types: dict[tuple[str, str, str, str], str] = {}
        for point in points:
            for key, value in point.fields.items():
                kind = _type(value)
                where = (org, bucket, point.measurement, key)
                known = types.setdefault(where, self._types.get(where, kind))
                if known != kind:
                    return self._error(
                        422,
                        f"failure writing points to database: partial write: field type"
                        f' conflict: input field "{key}" on measurement'
                        f' "{point.measurement}" is type {kind}, already exists as type'
                        f" {known} dropped={len(points)}",
                    )
        self._types.update(types)
        self.points.setdefault((org, bucket), []).extend(points)
        return web.Response(status=204)
