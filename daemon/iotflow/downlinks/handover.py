"""A cloud's downlink message handed to the downlink path, for the sinks that subscribe to
their cloud (MQTT, AWS IoT, Azure IoT Hub, AMQP): parsed, handed over within a timeout,
and its outcome logged. Nothing but cancellation leaves it: a bad message or a failure
downstream must not end the cloud session (and uplinks with it)."""

from __future__ import annotations

import asyncio
from typing import Any

from iotflow.downlinks.model import DownlinkHandler, DownlinkRejected
from iotflow.downlinks.parse import parse_downlink
from iotflow.telemetry.logging import get_logger

__all__ = ["hand_over"]

log = get_logger("iotflow.downlinks")


async def hand_over(
    handler: DownlinkHandler | None,
    connection_id: str,
    payload: bytes,
    *,
    dev_eui: str | None,
    default_port: int | None,
    within: float,
    **where: Any,
) -> None:
    """Parse `payload` and hand it to `handler` within `within` seconds; `where` names
    its origin in log lines (`topic=`, `routing_key=`). Without a handler it is rejected
    as `disabled`."""
    if handler is None:
        log.warning(
            "Downlink rejected",
            connection=connection_id,
            **where,
            reason="disabled",
            error="this daemon has no downlink path",
        )
        return
    try:
        request = parse_downlink(payload, dev_eui=dev_eui, default_port=default_port)
        async with asyncio.timeout(within):
            await handler(connection_id, request)
    except DownlinkRejected as exc:
        log.warning(
            "Downlink rejected",
            connection=connection_id,
            **where,
            reason=exc.reason,
            error=exc.message,
        )
    except TimeoutError:
        log.warning(
            "Downlink not handed over in time",
            connection=connection_id,
            **where,
            error=f"no answer within {within:g}s",
        )
    except Exception as exc:
        log.warning("Downlink failed", connection=connection_id, **where, error=str(exc))
    else:
        log.info(
            "Downlink received",
            connection=connection_id,
            devEUI=request.dev_eui,
            fPort=request.f_port,
            correlationId=request.correlation_id,
        )
