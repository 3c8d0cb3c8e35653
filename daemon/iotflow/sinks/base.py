"""The contract every sink keeps. Retry, expiry, order and the circuit live in delivery/."""

from __future__ import annotations

from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Protocol

from iotflow.downlinks import DownlinkHandler
from iotflow.errors import AuthenticationSinkError, PermanentSinkError, RetryableSinkError
from iotflow.spool import Delivery

MAX_ERROR_BODY = 512  # characters of a cloud's answer kept in errors and events


@dataclass(frozen=True, slots=True)
class SinkContext:
    """What the daemon gives a sink besides its connection."""

    timeout: float  # seconds, one send
    max_in_flight: int
    # Where a sink that receives commands from its cloud hands them (None: not available).
    downlink: DownlinkHandler | None = None
    # The fleet's `[mqtt] shared_group`: instances of a fleet share their subscriptions to a
    # cloud's downlink topic, so that each downlink is sent once, not once per instance.
    shared_group: str = ""


class Sink(Protocol):
    """Transport to one cloud for one connection.

    `send` returns when the cloud acknowledged the delivery and raises a SinkError subclass
    otherwise: RetryableSinkError (try later), AuthenticationSinkError (credentials refused),
    PermanentSinkError (never). Anything else it raises ends that delivery as failed (the
    worker lives on), so a sink need not guard against its own bugs, only classify what
    the cloud says. A send before `start` or after `close` (also one that `close`
    interrupts) raises RetryableSinkError. `healthcheck` is False before `start` and after
    `close`. tests/test_sink_contract.py checks all of this for each sink.
    """

    async def start(self) -> None: ...

    async def send(self, delivery: Delivery) -> None: ...

    async def healthcheck(self) -> bool: ...

    async def close(self) -> None: ...


def parse_retry_after(value: str | None, now: float) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def classify_http(status: int, body: str, retry_after: float | None, detail: str = "") -> None:
    """One rule for every HTTP sink: return on success, else raise what the status means.

    408, 429 and 5xx (but 501) are worth retrying; 401/403 mean our credentials are refused;
    any other 4xx (and 501, 3xx we did not follow) will not get better by trying again.
    `detail` (what the cloud's error says, in a few words) follows the status in the message.
    """
    if 200 <= status < 300:
        return
    text = body[:MAX_ERROR_BODY]
    message = f"HTTP {status}: {detail}" if detail else f"HTTP {status}"
    if status in (401, 403):
        raise AuthenticationSinkError(message, status=status, body=text, retry_after=retry_after)
    if status in (408, 429) or (status >= 500 and status != 501):
        raise RetryableSinkError(message, status=status, body=text, retry_after=retry_after)
    raise PermanentSinkError(message, status=status, body=text)
