"""`acme-echo`: an iotflow connector that POSTs each uplink to the Acme echo service.

The whole connector is this module: a configuration model, a sink, and the `CONNECTOR`
that pyproject.toml registers in the `iotflow.connectors` entry-point group. It uses only
`iotflow.plugin`, the API iotflow promises to keep stable.

Each delivery is one `POST <url>` with the uplink document as its body and the headers
`X-Acme-Key` (the connection's `apiKey`), `X-Acme-Device` (the DevEUI), `X-Acme-Uplink-Time`
(epoch seconds) and `X-Acme-Attempt` (1 for the first try). The service answers 2xx once it
has the uplink; 401/403 when it refuses the key; 408, 429 and 5xx when it is busy or down
(with `Retry-After` in seconds or as an HTTP date); any other status means never.
"""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime
from typing import Annotated, Any
from urllib.parse import urlsplit

import aiohttp
from pydantic import Field, field_validator

from iotflow.plugin import (
    AuthenticationSinkError,
    Connector,
    ConnectorConfiguration,
    Delivery,
    PermanentSinkError,
    RetryableSinkError,
    Secret,
    SinkContext,
)

MAX_BODY = 512  # characters of the service's answer kept in an error


class EchoConfiguration(ConnectorConfiguration):
    """The connection's `configuration`: the common keys come with the base class."""

    url: Annotated[str, Field(min_length=1, max_length=2048, description="Where uplinks go")]
    apiKey: Secret = Field(description="Sent as X-Acme-Key; write-only")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an absolute http:// or https:// URL")
        return value


def _retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class EchoSink:
    """One connection's sink: a keep-alive session, one POST per delivery."""

    def __init__(self, connection: Any, context: SinkContext) -> None:
        # `connection.configuration` is this connector's model, validated by iotflow.
        configuration: EchoConfiguration = connection.configuration
        self._url = configuration.url
        self._key = configuration.apiKey.get_secret_value()
        self._timeout = context.timeout
        self._limit = context.max_in_flight
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._limit),
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            headers={"Content-Type": "application/json", "X-Acme-Key": self._key},
        )

    async def send(self, delivery: Delivery) -> None:
        session = self._session
        if session is None or session.closed:
            # Not started, or closed under this send (shutdown): tried again later.
            raise RetryableSinkError("the sink is not open")
        headers = {
            "X-Acme-Device": delivery.dev_eui,
            "X-Acme-Uplink-Time": f"{delivery.uplink_time:.3f}",
            "X-Acme-Attempt": str(delivery.attempts),  # 1 on the first try
        }
        try:
            async with session.post(
                self._url, data=delivery.document, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                body = "" if 200 <= status < 300 else (await response.text())[:MAX_BODY]
                retry_after = _retry_after(response.headers.get("Retry-After"))
        except TimeoutError:
            raise RetryableSinkError(f"no answer within {self._timeout:g}s") from None
        except aiohttp.ClientError as exc:
            # The text names host and port; iotflow also cleans it of the connection's secrets.
            raise RetryableSinkError(f"{type(exc).__name__}: {exc}") from None
        if 200 <= status < 300:
            return
        message = f"HTTP {status}"
        if status in (401, 403):
            raise AuthenticationSinkError(
                message, status=status, body=body, retry_after=retry_after
            )
        if status in (408, 429) or (status >= 500 and status != 501):
            raise RetryableSinkError(message, status=status, body=body, retry_after=retry_after)
        raise PermanentSinkError(message, status=status, body=body)

    async def healthcheck(self) -> bool:
        return self._session is not None and not self._session.closed

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


CONNECTOR = Connector(
    id="acme-echo",
    description="Acme echo service: each uplink POSTed to a URL with an API key",
    version="1.0.0",
    configuration=EchoConfiguration,
    create_sink=EchoSink,
)
