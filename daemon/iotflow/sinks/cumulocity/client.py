"""The HTTP client of one connection's tenant: one keep-alive session, HTTP Basic
`{tenantId}/{username}`, Cumulocity's media types, and what each status means."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from iotflow import __version__
from iotflow.connectors.cumulocity import CumulocityConfig
from iotflow.errors import PermanentSinkError, RetryableSinkError, SinkError
from iotflow.sinks.base import MAX_ERROR_BODY, classify_http
from iotflow.sinks.webapi import Deadlines, client_session, refusal, transport_error

_MEDIA = "application/vnd.com.nsn.cumulocity.{}+json"
_ERROR_MEDIA = _MEDIA.format("error")


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: Any  # parsed JSON of a 2xx, else None


class CumulocityClient:
    """Requests to one tenant. `call` before `open` or after `close` is retryable."""

    def __init__(self, config: CumulocityConfig, *, timeout: float, limit: int) -> None:
        self._config = config
        self._base = config.base_url
        self._timeout = timeout
        self._limit = limit
        self._session: aiohttp.ClientSession | None = None
        self._deadlines = Deadlines(timeout)

    @property
    def open(self) -> bool:
        return self._session is not None and not self._session.closed

    def start(self) -> None:
        self._session = client_session(
            # One more than the workers, so that polling never waits behind deliveries.
            limit=self._limit + 1,
            # No X-Cumulocity-Application-Key: requests without it count as the device's
            # own traffic, which keeps the device "available" in Cumulocity.
            headers={
                "Authorization": basic_authorization(
                    f"{self._config.tenantId}/{self._config.username}",
                    self._config.password.get_secret_value(),
                ),
                "User-Agent": f"iotflow/{__version__}",
            },
            # Only this CA when given: the connection is pinned to the tenant's private PKI.
            ca=self._config.trustedCaCertficate,
        )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        self._deadlines.close()

    async def call(
        self,
        method: str,
        path: str,
        media: str,
        body: Any = None,
        *,
        params: Mapping[str, str] | None = None,
        missing_ok: bool = False,
    ) -> Response:
        """One request; a 2xx returns its JSON, anything else raises what it means.

        `media` names the resource's Cumulocity media type, sent as Content-Type and Accept:
        without Accept a POST answers an empty body (and so no id), and some resources
        refuse `application/json` with 406.
        """
        session = self._session
        if session is None or session.closed:
            # Not started, or closed (also under a send): not delivered, try again later.
            raise RetryableSinkError(f"{method} {path}: the sink is closed")
        media_type = _MEDIA.format(media)
        headers = {"Accept": f"{media_type}, {_ERROR_MEDIA}"}
        data = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = media_type
        try:
            with self._deadlines:
                async with session.request(
                    method,
                    self._base + path,
                    params=params,
                    data=data,
                    headers=headers,
                    allow_redirects=False,
                ) as response:
                    status = response.status
                    if 200 <= status < 300:
                        return Response(status, _json(await response.read()))
                    text, retry_after = await refusal(response)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise transport_error(exc, self._timeout, f"{method} {path}") from None
        if status == 404 and missing_ok:
            return Response(status, None)
        _raise_for(status, text, retry_after, f"{method} {path}")
        raise AssertionError("unreachable: a non-2xx status always raises")


def basic_authorization(login: str, password: str) -> str:
    """HTTP Basic (RFC 7617) in UTF-8; aiohttp's BasicAuth is deprecated and latin-1 only."""
    return "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode("ascii")


def _json(raw: bytes) -> Any:
    # A 2xx whose body is not JSON still happened: retrying a POST would duplicate it.
    # Callers that need the body (an id) fail on None with a message of their own.
    try:
        return orjson.loads(raw) if raw.strip() else None
    except orjson.JSONDecodeError:
        return None


def _raise_for(status: int, text: str, retry_after: float | None, what: str) -> None:
    """classify_http's verdict, with Cumulocity's own words in the message."""
    try:
        classify_http(status, text, retry_after)
    except PermanentSinkError as exc:
        raise PermanentSinkError(
            _message(exc, what, text), status=exc.status, body=exc.body
        ) from None
    except RetryableSinkError as exc:  # and AuthenticationSinkError, its subclass
        raise type(exc)(
            _message(exc, what, text), status=exc.status, body=exc.body, retry_after=retry_after
        ) from None


def _message(exc: SinkError, what: str, text: str) -> str:
    """`HTTP 422 on POST /event/events: undefined/validationError: <Cumulocity's message>`."""
    detail = cumulocity_error(text)
    return f"{exc} on {what}: {detail}" if detail else f"{exc} on {what}"


def cumulocity_error(text: str) -> str | None:
    """`<error>: <message>` of Cumulocity's error body (`{"error", "message", "info"}`)."""
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict):
        return None
    parts = [str(document[k]) for k in ("error", "message") if document.get(k)]
    return ": ".join(parts)[:MAX_ERROR_BODY] or None


def id_of(document: Any, what: str) -> str:
    value = document.get("id") if isinstance(document, dict) else None
    if isinstance(value, str | int) and not isinstance(value, bool):
        return str(value)
    raise PermanentSinkError(f"Cumulocity answered a {what} without an id")


def managed_object_id(document: Any, what: str) -> str:
    managed = document.get("managedObject") if isinstance(document, dict) else None
    return id_of(managed, f"{what}'s managed object")
