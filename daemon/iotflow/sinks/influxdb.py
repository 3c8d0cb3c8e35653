"""`actility-influxdb-iot`: one line-protocol point per uplink, through InfluxDB's v2 write API.

`POST {hostName}/api/v2/write?org=…&bucket=…&precision=ms` with `Authorization: Token …`;
204 is written. The point (docs/influxdb.md): measurement `measurement`, tags `devEUI` and
`fPort`, fields the decoded payload's (nested objects flattened with `_`), then the frame
and radio metadata (sinks/points.py); the timestamp is the uplink's own time.

InfluxDB's errors are JSON `{"code": "invalid", "message": "..."}`; the message goes into the
delivery's reason. Statuses follow the rule of every HTTP sink (sinks/base.py), as InfluxDB
documents them: 400 (malformed line), 404 (no such org or bucket), 413, 422 (a field of
another type, out of the retention period) are not retried; 429 and 503 are, after their
Retry-After; 401 is a refused token.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

from iotflow.connectors.influxdb import InfluxDbConfig
from iotflow.errors import PermanentSinkError
from iotflow.formats import Uplink
from iotflow.sinks import lineprotocol
from iotflow.sinks.base import SinkContext, classify_http
from iotflow.sinks.lineprotocol import FieldValue, Integer
from iotflow.sinks.points import metadata, time_ms, uplink_of
from iotflow.sinks.webapi import WebApiSink, json_message
from iotflow.spool import Delivery

# Metadata written as integer fields; the other numbers are floats (lineprotocol.Integer).
_INTEGERS = frozenset({"fCnt", "sf", "gatewayCount"})
# Field keys InfluxDB keeps for itself, or refuses (`time`): such a decoded field is left out.
_RESERVED = frozenset({"time"})
MAX_DEPTH = 8  # of nested decoded objects flattened into field keys


def _flatten(prefix: str, value: Any, depth: int = 0) -> Iterator[tuple[str, FieldValue]]:
    if isinstance(value, dict):
        if depth < MAX_DEPTH:
            for key, inner in value.items():
                yield from _flatten(f"{prefix}_{key}" if prefix else str(key), inner, depth + 1)
    elif isinstance(value, list):
        if depth < MAX_DEPTH:
            for index, inner in enumerate(value):
                yield from _flatten(f"{prefix}_{index}", inner, depth + 1)
    elif isinstance(value, bool | int | float | str):
        yield prefix, value


def fields(uplink: Uplink) -> dict[str, FieldValue]:
    """The point's fields: decoded ones first, then the metadata under the names still free."""
    found: dict[str, FieldValue] = {}
    for key, value in _flatten("", uplink.decoded or {}):
        if key and key not in _RESERVED and not key.startswith("_"):
            found.setdefault(key, value)
    for key, value in metadata(uplink).items():
        if key == "fPort":
            continue  # a tag
        found.setdefault(key, Integer(value) if key in _INTEGERS else value)
    return found


def point(measurement: str, uplink: Uplink) -> str | None:
    tags = [("devEUI", uplink.dev_eui)]
    if uplink.f_port is not None:
        tags.append(("fPort", str(uplink.f_port)))
    return lineprotocol.line(measurement, tags, fields(uplink), time_ms(uplink))


class InfluxDbSink(WebApiSink):
    def __init__(self, config: InfluxDbConfig, context: SinkContext) -> None:
        super().__init__(
            context,
            headers={"Authorization": f"Token {config.token.get_secret_value()}"},
            ca=config.trustedCaCertficate,
        )
        self._measurement = config.measurement
        query = urlencode({"org": config.org, "bucket": config.bucket, "precision": "ms"})
        self._url = f"{config.base_url}/api/v2/write?{query}"

    async def send(self, delivery: Delivery) -> None:
        uplink = uplink_of(delivery)
        text = point(self._measurement, uplink)
        if text is None:
            raise PermanentSinkError(f"uplink of {uplink.dev_eui} has no value to write")
        answer = await self._api.post(self._url, text.encode() + b"\n", "text/plain; charset=utf-8")
        if not answer.ok:
            classify_http(answer.status, answer.text, answer.retry_after, json_message(answer.text))
