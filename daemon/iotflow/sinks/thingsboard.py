"""`actility-thingsboard-iot`: an uplink's values as one telemetry record of its device.

`POST {hostName}/api/v1/{accessToken}/telemetry` with `{"ts": <uplink time, ms>, "values":
{...}}` (ThingsBoard's HTTP device API): the decoded payload's fields, then the frame and
radio metadata (sinks/points.py). The token is the device's own, from `accessTokens` or
`accessTokenPattern`; ThingsBoard answers 401 for a token it does not know, which concerns
that device alone: the delivery fails, saying which device, and the connection goes on
delivering the other devices' uplinks.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import orjson

from iotflow.connectors.thingsboard import ThingsBoardConfig
from iotflow.errors import PermanentSinkError
from iotflow.formats import Template, Uplink
from iotflow.sinks.base import SinkContext, classify_http
from iotflow.sinks.points import time_ms, uplink_of, values
from iotflow.sinks.webapi import WebApiSink, json_message
from iotflow.spool import Delivery


def telemetry(uplink: Uplink) -> dict[str, Any]:
    """The telemetry record of an uplink, at the uplink's own time."""
    return {"ts": time_ms(uplink), "values": values(uplink)}


class ThingsBoardSink(WebApiSink):
    def __init__(self, config: ThingsBoardConfig, context: SinkContext) -> None:
        super().__init__(context, headers={}, ca=config.trustedCaCertficate)
        self._base = config.base_url
        self._tokens = {k: v.get_secret_value() for k, v in config.accessTokens.items()}
        self._pattern = (
            Template(config.accessTokenPattern) if config.accessTokenPattern is not None else None
        )

    def _token(self, uplink: Uplink) -> str:
        token = self._tokens.get(uplink.dev_eui)
        if token is None and self._pattern is not None:
            token = self._pattern.render(uplink.document)
        if not token:
            raise PermanentSinkError(
                f"no access token for device {uplink.dev_eui}: add it to accessTokens"
            )
        return token

    async def send(self, delivery: Delivery) -> None:
        uplink = uplink_of(delivery)
        # The token is a path segment: encoded whole, so that no value can change the path.
        url = f"{self._base}/api/v1/{quote(self._token(uplink), safe='')}/telemetry"
        answer = await self._api.post(url, orjson.dumps(telemetry(uplink)), "application/json")
        if answer.status == 401:
            raise PermanentSinkError(
                f"HTTP 401: ThingsBoard refused the access token of device {uplink.dev_eui}",
                status=401,
                body=answer.text,
            )
        classify_http(answer.status, answer.text, answer.retry_after, json_message(answer.text))
