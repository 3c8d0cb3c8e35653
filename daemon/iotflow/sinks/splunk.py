"""`actility-splunk-iot`: one event per uplink to a Splunk HTTP Event Collector.

`POST {hostName}/services/collector/event` with `Authorization: Splunk <hecToken>` and the
event envelope `{"time", "host", "source", "sourcetype", "index"?, "event"}`: `time` is the
uplink's own (epoch seconds, milliseconds as decimals), `event` the document the connection
sends (its `sendMetadata`/`sendRawDecodedFormat` apply, as for a webhook).

HEC answers `{"text": ..., "code": n}`; the text and code go into the delivery's reason.
What a status means is the rule of every HTTP sink (sinks/base.py), which is what Splunk
documents for its codes: 401/403 (token required, invalid authorization, token disabled,
invalid token) are refused credentials, 500 and 503 (server busy, queues full) are retried,
400 (no data, invalid data format, incorrect index, ...) and 413 are not.
"""

from __future__ import annotations

from typing import Any

import orjson

from iotflow.connectors.splunk import SplunkConfig
from iotflow.formats import render_body
from iotflow.sinks.base import SinkContext, classify_http
from iotflow.sinks.webapi import WebApiSink
from iotflow.spool import Delivery

PATH = "/services/collector/event"


def hec_detail(text: str) -> str:
    """`Invalid token (code 4)` from HEC's JSON answer; "" when it is not one."""
    try:
        answer = orjson.loads(text)
    except orjson.JSONDecodeError:
        return ""
    if not isinstance(answer, dict) or not isinstance(answer.get("text"), str):
        return ""
    code = answer.get("code")
    suffix = f" (code {code})" if isinstance(code, int) and not isinstance(code, bool) else ""
    return f"{answer['text'][:200]}{suffix}"


class SplunkSink(WebApiSink):
    def __init__(self, config: SplunkConfig, context: SinkContext) -> None:
        super().__init__(
            context,
            headers={"Authorization": f"Splunk {config.hecToken.get_secret_value()}"},
            ca=config.trustedCaCertficate,
        )
        self._config = config
        self._url = config.base_url + PATH

    def event(self, delivery: Delivery) -> dict[str, Any]:
        """The HEC envelope of a delivery."""
        config = self._config
        body = render_body(
            orjson.loads(delivery.document),
            send_metadata=config.sendMetadata,
            send_raw_decoded=config.sendRawDecodedFormat,
        )
        envelope: dict[str, Any] = {
            "time": round(delivery.uplink_time, 3),
            "host": config.host or delivery.dev_eui,
            "source": config.source,
            "sourcetype": config.sourcetype,
        }
        if config.index is not None:
            envelope["index"] = config.index
        envelope["event"] = orjson.loads(body)
        return envelope

    async def send(self, delivery: Delivery) -> None:
        answer = await self._api.post(
            self._url, orjson.dumps(self.event(delivery)), "application/json"
        )
        if not answer.ok:
            classify_http(answer.status, answer.text, answer.retry_after, hec_detail(answer.text))
