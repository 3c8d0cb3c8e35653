"""`actility-http-iot`: one keep-alive aiohttp session per connection, a POST per uplink.

`destinationURL` and header values may be `{Path}` templates over the uplink document. A
value put into the URL is percent-encoded whole (`/`, `?`, `&`, `#`, CR/LF included), so
that no uplink can change the URL's structure; a header value rendered with a line break
or another control character is not sent (the delivery fails, saying which header).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from iotflow import __version__
from iotflow.connectors.http import HEADER_CONTROL, HttpConfig
from iotflow.errors import PermanentSinkError, RetryableSinkError
from iotflow.formats import Template, render_body
from iotflow.sinks.base import classify_http
from iotflow.sinks.webapi import Deadlines, refusal, transport_error
from iotflow.spool import Delivery


class HttpSink:
    def __init__(self, config: HttpConfig, *, timeout: float, max_in_flight: int) -> None:
        assert config.destinationURL is not None  # filled by the brand at validation
        self._url = config.destinationURL
        self._url_template = Template(self._url) if "{" in self._url else None
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
        self._deadlines = Deadlines(timeout)

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._limit, keepalive_timeout=60)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(),  # each send is under `Deadlines` instead
            headers=self._static,
            # Cookies from one delivery must not leak into the next.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    def _request(self, delivery: Delivery) -> tuple[str, bytes, dict[str, str]]:
        if not self._reshape and not self._templates and self._url_template is None:
            return self._url, delivery.document, {}
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
        headers = {}
        for name, template in self._templates.items():
            value = template.render(document)
            if HEADER_CONTROL.search(value):
                # aiohttp would refuse it (ValueError); sent, it would split the request.
                raise PermanentSinkError(
                    f"header {name!r}: its template renders to a value with a line break"
                    " or a control character; not sent"
                )
            headers[name] = value
        url = self._url
        if self._url_template is not None:
            # Every value is encoded whole: a `/`, `?`, `#`, `&` or CR/LF in it stays data.
            # (yarl then requotes the URL, keeping every escape that carries meaning.)
            url = self._url_template.render(document, escape=_url_value)
        return url, body, headers

    async def send(self, delivery: Delivery) -> None:
        session = self._session
        if session is None or session.closed:
            # Closed under a delivery's feet (shutdown): not sent, tried again later.
            raise RetryableSinkError("the sink is not open")
        url, body, headers = self._request(delivery)
        try:
            with self._deadlines:
                async with session.post(
                    url, data=body, headers=headers, allow_redirects=False
                ) as response:
                    status = response.status
                    text, retry_after = await refusal(response)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise transport_error(exc, self._timeout) from None
        classify_http(status, text, retry_after)

    async def healthcheck(self) -> bool:
        return self._session is not None and not self._session.closed

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._deadlines.close()


def _url_value(value: str) -> str:
    """A template's value as it goes into a URL: only unreserved characters stay as they are."""
    return quote(value, safe="")
