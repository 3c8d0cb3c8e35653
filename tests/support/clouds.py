"""An in-process HTTP cloud that behaves as webhook platforms do.

The real platforms (Datacake, Cayenne, Qubitro, TagoIO…) cannot be reached from the test
machine, so `FakeCloud` plays them: it records every request, answers with what a test
configured (an outage, a rate limit, a hang), and checks credentials the way a brand's
public documentation says the platform does. Brands are data (`Requirement`), not code.

Behaviours are chosen per request, most specific first:
the path's one-shot behaviours (`times=N`), the path's standing behaviour, the global
one-shot behaviours, the global standing behaviour, then 200.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from aiohttp import web
from multidict import CIMultiDictProxy

from .server import LocalHttpServer

HOST = "127.0.0.1"

# A header or query value the platform accepts: exactly this string, or any string the
# pattern matches in full.
Expected = str | re.Pattern[str]


@dataclass
class Received:
    """One request as the cloud saw it."""

    method: str
    path: str
    query: dict[str, str]
    # Case-insensitive, as HTTP headers are: `headers["authorization"]` finds
    # `Authorization` whatever case the client sent.
    headers: CIMultiDictProxy[str]
    body: bytes
    # The body parsed as JSON, or None when it is empty or not JSON.
    json: Any
    # time.monotonic() when the request arrived.
    at: float
    # The status answered; None while the request hangs or when the client left first.
    status: int | None = None
    # The path and query as they were on the wire, still percent-encoded.
    raw_path: str = ""

    def describe(self, origin: float | None = None) -> str:
        when = f" at +{self.at - origin:.3f}s" if origin is not None else ""
        query = "&".join(f"{k}={v}" for k, v in self.query.items())
        target = f"{self.path}?{query}" if query else self.path
        body = self.body[:200] + (b"..." if len(self.body) > 200 else b"")
        answered = self.status if self.status is not None else "no answer"
        return f"{self.method} {target} -> {answered}{when} body={body!r}"


@dataclass(frozen=True)
class Behaviour:
    """How the cloud answers: a status, headers, a JSON body, or a hang."""

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    # JSON response body; None answers a small document that names the status.
    body: Any = None
    # Hold the request unanswered until `release()` (or `stop()`), then answer as above.
    hang: bool = False
    # Drop the TCP connection instead of answering (a crashed or restarted server).
    reset: bool = False
    # Quote the request's Authorization header and query back in the body, as careless
    # platforms do in their error answers: what a client stores of it may leak secrets.
    echo: bool = False


@dataclass(frozen=True)
class Requirement:
    """What a platform checks before it accepts a webhook call (opt-in per path).

    Checked only when the behaviour would answer 2xx: a platform that is down or
    rate limiting answers so before it looks at credentials.
    """

    headers: Mapping[str, Expected] = field(default_factory=dict)
    query: Mapping[str, Expected] = field(default_factory=dict)
    method: str | None = None
    json_body: bool = False
    # Status when a credential is absent, and when it is present but wrong.
    missing_status: int = 401
    invalid_status: int = 401


_ANY_VALUE = re.compile(r"\S+")


def datacake(token: str | None = None) -> Requirement:
    """Datacake: `Authorization: Token <key>`; 401 for a missing or bad token."""
    expected: Expected = f"Token {token}" if token is not None else re.compile(r"Token \S+")
    return Requirement(headers={"Authorization": expected}, method="POST", json_body=True)


def qubitro(project_id: str | None = None, signing_key: str | None = None) -> Requirement:
    """Qubitro: `projectId` and `webhookSigningKey` headers; 401 absent, 403 wrong."""
    return Requirement(
        headers={
            "projectId": project_id if project_id is not None else _ANY_VALUE,
            "webhookSigningKey": signing_key if signing_key is not None else _ANY_VALUE,
        },
        method="POST",
        json_body=True,
        missing_status=401,
        invalid_status=403,
    )


def tago(token: str | None = None) -> Requirement:
    """TagoIO: the device token in the `authorization` query parameter."""
    return Requirement(
        query={"authorization": token if token is not None else _ANY_VALUE},
        method="POST",
        json_body=True,
    )


def cayenne() -> Requirement:
    """Cayenne: no credential (the device is claimed by DevEUI), a JSON POST."""
    return Requirement(method="POST", json_body=True)


_Scope = str | None  # a request path, or None for every path


class FakeCloud(LocalHttpServer):
    """An aiohttp server on a free port of 127.0.0.1, in the test's event loop."""

    def __init__(self) -> None:
        self.all_requests: list[Received] = []
        # The requests answered 2xx: what the daemon may count as delivered.
        self.accepted: list[Received] = []
        self._standing: dict[_Scope, Behaviour] = {}
        self._one_shot: dict[_Scope, deque[Behaviour]] = {}
        self._requirements: dict[_Scope, Requirement] = {}
        # One gate per scope that has hung requests; release() opens it.
        self._gates: dict[_Scope, asyncio.Event] = {}
        # Notified on every arrival and every answer; wait_for() sleeps on it.
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._closing = False
        self._started_at = time.monotonic()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("the fake cloud is already started")
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # access_log=None: the records above say more, without flooding test output.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
        await runner.setup()
        # Port 0: the kernel picks a free one, so there is no race with other processes.
        site = web.TCPSite(runner, HOST, 0)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        self._started_at = time.monotonic()

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        # Hung handlers would hold the shutdown for its whole timeout; they answer
        # 503 now, to clients that have usually given up already.
        self._closing = True
        for gate in self._gates.values():
            gate.set()
        await runner.cleanup()

    def url(self, path: str = "/") -> str:
        if not path.startswith("/"):
            raise ValueError(f"a path starts with '/': {path!r}")
        return f"{self.base_url}{path}"

    # -- behaviour -----------------------------------------------------------------------

    def set_behaviour(
        self, behaviour: Behaviour, *, path: str | None = None, times: int | None = None
    ) -> None:
        """Answer the next `times` requests so, or every request from now on (None).

        A standing behaviour replaces the scope's standing one and drops its pending
        one-shot behaviours: "from now on" means from now on.
        """
        if times is None:
            self._standing[path] = behaviour
            self._one_shot.pop(path, None)
        else:
            if times < 1:
                raise ValueError(f"times must be at least 1, not {times}")
            self._one_shot.setdefault(path, deque()).extend([behaviour] * times)

    def respond(
        self,
        status: int = 200,
        *,
        path: str | None = None,
        times: int | None = None,
        headers: Mapping[str, str] | None = None,
        body: Any = None,
        retry_after: float | None = None,
    ) -> None:
        """Shorthand: `respond(503, times=3)`, `respond(429, retry_after=2)`."""
        all_headers = dict(headers or {})
        if retry_after is not None:
            all_headers["Retry-After"] = _format_seconds(retry_after)
        self.set_behaviour(
            Behaviour(status=status, headers=all_headers, body=body), path=path, times=times
        )

    def reset_connection(self, *, path: str | None = None, times: int | None = None) -> None:
        """Drop the connection of requests without an answer."""
        self.set_behaviour(Behaviour(reset=True), path=path, times=times)

    def hang(self, *, path: str | None = None, times: int | None = None) -> None:
        """Leave requests unanswered until `release()` with the same path."""
        self.set_behaviour(Behaviour(hang=True), path=path, times=times)

    def release(self, *, path: str | None = None) -> None:
        """Answer the requests hung in this scope (200) and stop hanging new ones."""
        standing = self._standing.get(path)
        if standing is not None and standing.hang:
            del self._standing[path]
        pending = self._one_shot.get(path)
        if pending is not None:
            self._one_shot[path] = deque(b for b in pending if not b.hang)
        gate = self._gates.pop(path, None)
        if gate is not None:
            gate.set()

    def require(self, requirement: Requirement, *, path: str | None = None) -> None:
        """Check credentials on this path (or every path) as the platform would."""
        self._requirements[path] = requirement

    def reset(self) -> None:
        """Forget behaviours and requirements (not records); release hung requests."""
        self._standing.clear()
        self._one_shot.clear()
        self._requirements.clear()
        for scope in list(self._gates):
            self.release(path=scope)

    # -- records -------------------------------------------------------------------------

    def requests_to(self, path: str, *, accepted: bool = False) -> list[Received]:
        source = self.accepted if accepted else self.all_requests
        return [r for r in source if r.path == path]

    async def wait_for(
        self, count: int, *, path: str | None = None, timeout: float = 30.0
    ) -> list[Received]:
        """Wait until at least `count` requests (to `path`) were answered 2xx.

        Returns those requests. On timeout, fails the test with everything received,
        which is usually the explanation.
        """
        return await self._wait(count, path, timeout, accepted=True)

    async def wait_for_requests(
        self, count: int, *, path: str | None = None, timeout: float = 30.0
    ) -> list[Received]:
        """Wait until at least `count` requests (to `path`) arrived, answered or not."""
        return await self._wait(count, path, timeout, accepted=False)

    def describe(self) -> str:
        if not self.all_requests:
            return "  (no request at all)"
        return "\n".join(f"  {r.describe(self._started_at)}" for r in self.all_requests)

    async def _wait(
        self, count: int, path: str | None, timeout: float, *, accepted: bool
    ) -> list[Received]:
        def matching() -> list[Received]:
            source = self.accepted if accepted else self.all_requests
            return [r for r in source if path is None or r.path == path]

        async with self._changed:
            try:
                async with asyncio.timeout(timeout):
                    await self._changed.wait_for(lambda: len(matching()) >= count)
            except TimeoutError:
                what = "accepted (2xx)" if accepted else "received"
                where = f" to {path}" if path is not None else ""
                raise AssertionError(
                    f"FakeCloud: expected at least {count} request(s) {what}{where} within"
                    f" {timeout}s, got {len(matching())}. All requests:\n{self.describe()}"
                ) from None
            return matching()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- serving -------------------------------------------------------------------------

    def _next_behaviour(self, path: str) -> tuple[_Scope, Behaviour]:
        for scope in (path, None):
            pending = self._one_shot.get(scope)
            if pending:
                return scope, pending.popleft()
            if scope in self._standing:
                return scope, self._standing[scope]
        return None, Behaviour()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        received = Received(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers=request.headers,
            body=body,
            json=_parse_json(body),
            at=time.monotonic(),
            raw_path=request.raw_path,
        )
        self.all_requests.append(received)
        # Chosen before any await, so behaviours apply in the order requests arrived.
        scope, behaviour = self._next_behaviour(request.path)
        await self._notify()

        if behaviour.hang and not self._closing:
            gate = self._gates.setdefault(scope, asyncio.Event())
            await gate.wait()
        if behaviour.reset and not self._closing and request.transport is not None:
            request.transport.abort()
            await self._notify()
            return web.Response(status=500)  # never sent: the connection is gone
        if behaviour.echo:
            behaviour = Behaviour(
                status=behaviour.status,
                headers=behaviour.headers,
                body={
                    **_error(_phrase(behaviour.status).lower().replace(" ", "_"), "Refused"),
                    "request": {
                        "headers": {"Authorization": received.headers.get("Authorization")},
                        "query": received.query,
                    },
                },
            )
        if self._closing:
            response = _json_response(503, None, {})
        elif 200 <= behaviour.status < 300:
            requirement = self._requirements.get(request.path, self._requirements.get(None))
            rejection = _check(requirement, received)
            if rejection is not None:
                response = _json_response(*rejection, {})
            else:
                response = _json_response(behaviour.status, behaviour.body, behaviour.headers)
        else:
            response = _json_response(behaviour.status, behaviour.body, behaviour.headers)

        transport = request.transport
        if transport is None or transport.is_closing():
            # The client gave up (a hung request it timed out): it never sees this
            # answer, so the request is not accepted.
            return response
        # Recorded before aiohttp sends the answer, so that a client which saw a 2xx
        # always finds its request in `accepted`, with no window in between.
        received.status = response.status
        if 200 <= response.status < 300:
            self.accepted.append(received)
        await self._notify()
        return response


def _check(requirement: Requirement | None, received: Received) -> tuple[int, Any] | None:
    """The (status, body) a platform rejects this request with, or None to accept it."""
    if requirement is None:
        return None
    if requirement.method is not None and received.method != requirement.method:
        return 405, _error("method_not_allowed", f"Use {requirement.method}")
    checks: list[tuple[str, Mapping[str, Expected], Callable[[str], str | None]]] = [
        ("header", requirement.headers, received.headers.get),
        ("query parameter", requirement.query, received.query.get),
    ]
    for kind, expectations, lookup in checks:
        for name, expected in expectations.items():
            value = lookup(name)
            if value is None:
                return requirement.missing_status, _error("unauthorized", f"Missing {kind} {name}")
            if not _matches(expected, value):
                return requirement.invalid_status, _error(
                    "unauthorized" if requirement.invalid_status == 401 else "forbidden",
                    f"Invalid {kind} {name}",
                )
    if requirement.json_body and received.json is None:
        return 400, _error("bad_request", "The body is not a JSON document")
    return None


def _matches(expected: Expected, value: str) -> bool:
    if isinstance(expected, str):
        return value == expected
    return expected.fullmatch(value) is not None


def _error(code: str, message: str) -> dict[str, str]:
    return {"error": code, "detail": message}


def _json_response(status: int, body: Any, headers: Mapping[str, str]) -> web.Response:
    if status in (204, 304) or 100 <= status < 200:
        # These statuses have no body by definition.
        return web.Response(status=status, headers=dict(headers))
    if body is None:
        phrase = _phrase(status)
        body = (
            {"ok": True}
            if 200 <= status < 300
            else _error(phrase.lower().replace(" ", "_"), phrase)
        )
    return web.json_response(body, status=status, headers=dict(headers))


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"Status {status}"


def _parse_json(body: bytes) -> Any:
    if not body:
        return None
    try:
        return jsonlib.loads(body)
    except ValueError:
        return None


def _format_seconds(seconds: float) -> str:
    # Retry-After is whole seconds (RFC 9110); a fraction would be rejected by clients.
    return str(max(0, round(seconds)))
