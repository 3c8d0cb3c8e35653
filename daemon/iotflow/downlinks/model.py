"""What a downlink is, whoever asked for it (an MQTT cloud, Cumulocity, the HTTP API)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from iotflow.errors import IotflowError

# Why a downlink was refused: a small fixed set, so that it can be a metric label, the
# `code` of an API error and a field of the connection's event log.
REASONS = (
    "not_json",  # the message is not a JSON object
    "wrong_shape",  # neither of the two shapes, or a field of the wrong type
    "bad_dev_eui",  # missing, not 16 hex digits, or not the device of the topic
    "bad_port",  # missing without a downlinkPort, or outside 1..223
    "bad_payload",  # not even-length hex, too long, or something only a driver could encode
    "unknown_device",  # not bound to the connection, or no uplink of it seen yet
    "disabled",  # the connection has downlinkEnabled=false, is deactivated, or is gone
    "not_connected",  # the source broker did not take it
)


@dataclass(frozen=True, slots=True)
class DownlinkRequest:
    dev_eui: str  # 16 upper-case hex digits
    f_port: int  # 1..223
    payload: bytes
    confirmed: bool = False
    correlation_id: str | None = None  # the cloud's own reference, echoed in events
    # A decoded `payload` to encode with the device's driver (encodeDownlink); `payload` is
    # empty until it is encoded.
    data: Any = None


class DownlinkRejected(IotflowError):
    """A downlink that cannot be sent: bad shape, unknown device, downlinks disabled.

    `reason` is one of REASONS; `path` names the offending field when there is one
    (`DevEUI_downlink.FPort`), for the API's error details.
    """

    def __init__(self, reason: str, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.path = path


class DownlinkHandler(Protocol):
    """Sends a downlink of a connection to its device; raises DownlinkRejected."""

    async def __call__(self, connection_id: str, request: DownlinkRequest) -> None: ...
