"""The error hierarchy: the type of an exception decides what the framework does next."""

from __future__ import annotations

from dataclasses import dataclass


class IotflowError(Exception):
    """Base of every error iotflow raises on purpose."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with an input, at a key path (`connections[0].configuration.brand`)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(IotflowError):
    """A configuration file or a connection definition is invalid: every problem is listed."""

    def __init__(self, problems: list[Problem], source: str = "") -> None:
        self.problems = problems
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + "; ".join(str(p) for p in problems))


class RegistryError(IotflowError):
    """The registry could not be read or written."""


class NotFoundError(RegistryError):
    """A connection or device that does not exist."""


class ConflictError(RegistryError):
    """A change that contradicts the registry (duplicate id, read-only connection)."""


class SpoolError(IotflowError):
    """The spool could not do what was asked."""


class SpoolClosedError(SpoolError):
    """The spool is closed (or closing): nothing more can be queued."""


class SpoolWriteError(SpoolError):
    """A transaction failed (disk full, I/O error): what it carried was not committed."""


class SpoolUnavailableError(SpoolWriteError):
    """The spool cannot commit for now: nothing of the request was written; try again later.

    Public: what an ingest answers with 503 and the MQTT source does not acknowledge (the
    broker keeps the uplink). The spool retries by itself with backoff;
    `Spool.wait_writable()` returns once it commits again.
    """


class SpoolFullError(SpoolUnavailableError):
    """The spool cannot commit because its disk (or its database's page limit) is full."""


class SinkError(IotflowError):
    """A delivery to a cloud did not succeed."""

    def __init__(self, message: str, *, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class RetryableSinkError(SinkError):
    """Try again later; `retry_after` is the cloud's own hint in seconds, when it gave one."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        body: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, body=body)
        self.retry_after = retry_after


class AuthenticationSinkError(RetryableSinkError):
    """The cloud refused our credentials: retried slowly, state AUTHENTICATION_FAILED."""


class PermanentSinkError(SinkError):
    """The cloud will never accept this delivery: counted as failed, not retried."""


class Rejection(IotflowError):
    """An uplink message that cannot be routed: counted by `reason` and dropped.

    Reasons are a small fixed set, used as a metric label: `not_json`, `too_large`,
    `wrong_shape`, `bad_dev_eui`, `no_subscription`, and `not_uplink`: a well-formed message
    of the format that is another event (ChirpStack join/status/ack/..., The Things Stack
    join_accept/downlink_*, ThingPark DevEUI_notification/...), normal traffic on a wildcard
    subscription, so it is logged at debug level only.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    @property
    def routine(self) -> bool:
        """Normal traffic rather than a fault: counted, logged at debug level only."""
        return self.reason == NOT_UPLINK


NOT_UPLINK = "not_uplink"
