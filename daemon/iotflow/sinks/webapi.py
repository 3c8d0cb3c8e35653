"""One keep-alive HTTP session to a cloud's web API, shared by the sinks that POST one
document per uplink to it (ThingsBoard, Splunk HEC, InfluxDB): what the transport can do
wrong is classified here, once (`transport_error`, `error_text`, for every HTTP sink);
what an answer means is each sink's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
import orjson

from iotflow import __version__
from iotflow.connectors.web import client_ssl
from iotflow.errors import RetryableSinkError
from iotflow.sinks.base import MAX_ERROR_BODY, SinkContext, parse_retry_after


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    text: str  # the body of an answer that is not 2xx, cut to MAX_ERROR_BODY; else ""
    retry_after: float | None  # seconds, from Retry-After

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class Deadlines:
    """Ends a sink's sends that take longer than `timeout` with a TimeoutError, as
    `asyncio.timeout` would: `with deadlines:` around each send.

    aiohttp's own total timeout makes a timer handle and a timer context for every request:
    about 10 µs of CPU per POST, a tenth of it (issue #16, docs/performance.md). Here one
    timer serves every send of the sink. It is set for the oldest send's deadline (sends
    are kept in the order they began) and, when it fires, ends the sends past theirs and
    moves on to the next oldest.
    """

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        # Each send under way: its deadline, and how many cancellations it had at entry.
        self._running: dict[asyncio.Task[Any], tuple[float, int]] = {}
        self._overrun: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def __enter__(self) -> None:
        task = asyncio.current_task()
        assert task is not None, "a send runs in a task"
        loop = task.get_loop()
        deadline = loop.time() + self._timeout
        self._running[task] = (deadline, task.cancelling())
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire, loop)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        _, cancelling = self._running.pop(task)
        if task in self._overrun:
            self._overrun.discard(task)
            # Our cancellation, and no other one: the send timed out.
            if task.uncancel() <= cancelling and kind is asyncio.CancelledError:
                raise TimeoutError from error

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        for task, (deadline, _) in self._running.items():
            if deadline > now:
                self._timer = loop.call_at(deadline, self._expire, loop)
                return
            if task not in self._overrun:
                self._overrun.add(task)
                task.cancel()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class WebApi:
    """POSTs to one cloud. `post` before `start` or after `close` is retryable."""

    def __init__(
        self,
        *,
        timeout: float,
        limit: int,
        headers: Mapping[str, str],
        ca: str | None = None,
    ) -> None:
        self._timeout = timeout
        self._limit = limit
        self._headers = {"User-Agent": f"iotflow/{__version__}", **headers}
        self._ca = ca
        self._session: aiohttp.ClientSession | None = None
        self._deadlines = Deadlines(timeout)

    @property
    def open(self) -> bool:
        return self._session is not None and not self._session.closed

    def start(self) -> None:
        self._session = client_session(limit=self._limit, headers=self._headers, ca=self._ca)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        self._deadlines.close()

    async def post(self, url: str, body: bytes, content_type: str) -> Answer:
        session = self._session
        if session is None or session.closed:
            # Closed under a delivery's feet (shutdown): not sent, tried again later.
            raise RetryableSinkError("the sink is not open")
        try:
            with self._deadlines:
                async with session.post(
                    url, data=body, headers={"Content-Type": content_type}, allow_redirects=False
                ) as response:
                    status = response.status
                    text, retry_after = await refusal(response)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise transport_error(exc, self._timeout) from None
        return Answer(status, text[:MAX_ERROR_BODY], retry_after)


def client_session(
    *, limit: int, headers: Mapping[str, str], ca: str | None
) -> aiohttp.ClientSession:
    """A keep-alive session to one cloud: at most `limit` connections, the server verified
    with `ca` alone when given (else the system store), `headers` on every request. It
    has no timeout of its own: each send is under the sink's `Deadlines`."""
    connector = aiohttp.TCPConnector(limit=limit, keepalive_timeout=60, ssl=client_ssl(ca))
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(),
        headers=headers,
        # Cookies from one delivery must not leak into the next.
        cookie_jar=aiohttp.DummyCookieJar(),
    )


class WebApiSink:
    """start, healthcheck and close of a sink whose one resource is its `WebApi`; the
    subclass sends."""

    def __init__(self, context: SinkContext, *, headers: Mapping[str, str], ca: str | None) -> None:
        self._api = WebApi(
            timeout=context.timeout, limit=context.max_in_flight, headers=headers, ca=ca
        )

    async def start(self) -> None:
        self._api.start()

    async def healthcheck(self) -> bool:
        return self._api.open

    async def close(self) -> None:
        await self._api.close()


def transport_error(
    exc: TimeoutError | aiohttp.ClientError, timeout: float, what: str = ""
) -> RetryableSinkError:
    """What a request that got no answer means, for every HTTP sink: try again later.
    `what` (`POST /path`) starts the message when given.

    aiohttp's text names host and port, never headers; a credential in a URL's path
    (ThingsBoard) is cleaned by the worker's redactor like any other secret of the connection.
    """
    prefix = f"{what}: " if what else ""
    # TimeoutError first: aiohttp's ServerTimeoutError is a ClientError too.
    if isinstance(exc, TimeoutError):
        return RetryableSinkError(f"{prefix}no answer within {timeout:g}s")
    return RetryableSinkError(f"{prefix}{type(exc).__name__}: {exc}")


async def refusal(response: aiohttp.ClientResponse) -> tuple[str, float | None]:
    """An answer's error text (`error_text`) and Retry-After (seconds); ("", None) for a 2xx,
    whose body and headers are not read."""
    if 200 <= response.status < 300:
        return "", None
    text = await error_text(response)
    return text, parse_retry_after(response.headers.get("Retry-After"), time.time())


async def error_text(response: aiohttp.ClientResponse) -> str:
    """The start of an error answer's body as text ("" when it cannot be read), a few times
    MAX_ERROR_BODY: enough for the cloud's message, which callers cut to what they keep."""
    try:
        raw = await response.content.read(MAX_ERROR_BODY * 4)
    except (TimeoutError, aiohttp.ClientError):
        return ""
    return raw.decode("utf-8", "replace")


def json_message(text: str) -> str:
    """The `message` of a JSON error answer (InfluxDB's, ThingsBoard's), cut to a few
    words for a delivery's reason; "" when the answer has none."""
    try:
        answer = orjson.loads(text)
    except orjson.JSONDecodeError:
        return ""
    message = answer.get("message") if isinstance(answer, dict) else None
    return message[:200] if isinstance(message, str) else ""
