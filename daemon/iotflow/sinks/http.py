"""`actility-http-iot`: one keep-alive aiohttp session per connection, a POST per uplink."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import orjson

from iotflow import __version__
from iotflow.connectors.http import HttpConfig
from iotflow.errors import RetryableSinkError
from iotflow.formats import Template, render_body
from iotflow.sinks.base import MAX_ERROR_BODY, classify_http, parse_retry_after
from iotflow.spool import Delivery


class HttpSink:
    def __init__(self, config: HttpConfig, *, timeout: float, max_in_flight: int) -> None:
        assert config.destinationURL is not None  # filled by the brand at validation
        self._url = config.destinationURL
        self._config = config
        self._timeout = timeout
        self._limit = max_in_flight
        self._static: dict[str, str] = {}
        self._templates: dict[str, Template] = {}
        for name, value in config.headers.items():
            if "{" in value:
                self._templates[name] = Template(value)
            else:
                self._static[name] = value
        self._static.setdefault("Content-Type", "application/json")
        self._static.setdefault("User-Agent", f"iotflow/{__version__}")
        # The stored document goes out as it is unless the configuration reshapes it.
        self._reshape = config.sendMetadata or config.sendRawDecodedFormat
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._limit, keepalive_timeout=60)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            headers=self._static,
            # Cookies from one delivery must not leak into the next.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    def _request(self, delivery: Delivery) -> tuple[bytes, dict[str, str]]:
        if not self._reshape and not self._templates:
            return delivery.document, {}
        document: dict[str, Any] = orjson.loads(delivery.document)
        body = (
            render_body(
                document,
                send_metadata=self._config.sendMetadata,
                send_raw_decoded=self._config.sendRawDecodedFormat,
            )
            if self._reshape
            else delivery.document
        )
        headers = {name: t.render(document) for name, t in self._templates.items()}
        return body, headers

    async def send(self, delivery: Delivery) -> None:
        assert self._session is not None, "start() first"
        body, headers = self._request(delivery)
        try:
            async with self._session.post(
                self._url, data=body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                text = "" if 200 <= status < 300 else await _read_text(response)
                retry_after = parse_retry_after(response.headers.get("Retry-After"), time.time())
        except TimeoutError:
            raise RetryableSinkError(f"no answer within {self._timeout:g}s") from None
        except aiohttp.ClientError as exc:
            # The exception text names host and port, never the headers or credentials.
            raise RetryableSinkError(f"{type(exc).__name__}: {exc}") from None
        classify_http(status, text, retry_after)

    async def healthcheck(self) -> bool:
        return self._session is not None and not self._session.closed

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _read_text(response: aiohttp.ClientResponse) -> str:
    try:
        raw = await response.content.read(MAX_ERROR_BODY * 4)
    except (TimeoutError, aiohttp.ClientError):
        return ""
    return raw.decode("utf-8", "replace")[:MAX_ERROR_BODY]
