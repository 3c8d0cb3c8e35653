"""What a downlink is, whoever asked for it (an MQTT cloud, Cumulocity, the HTTP API)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from iotflow.errors import IotflowError


@dataclass(frozen=True, slots=True)
class DownlinkRequest:
    dev_eui: str  # 16 upper-case hex digits
    f_port: int  # 1..223
    payload: bytes
    confirmed: bool = False
    correlation_id: str | None = None  # the cloud's own reference, echoed in events


class DownlinkRejected(IotflowError):
    """A downlink that cannot be sent: bad shape, unknown device, downlinks disabled."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class DownlinkHandler(Protocol):
    """Sends a downlink of a connection to its device; raises DownlinkRejected."""

    async def __call__(self, connection_id: str, request: DownlinkRequest) -> None: ...
