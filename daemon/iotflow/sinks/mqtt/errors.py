"""What a failed connection attempt means for deliveries.

- a CONNACK refusing our credentials, or a TLS handshake in which one side refuses the
  other's certificate: AuthenticationSinkError (state AUTHENTICATION_FAILED);
- anything else (broker down, a refusal for another reason): RetryableSinkError.
"""

from __future__ import annotations

import ssl

from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

from iotflow.errors import AuthenticationSinkError, RetryableSinkError, SinkError
from iotflow.sinks.mqtt.endpoint import Endpoint

# CONNACK reason codes that mean "your credentials": MQTT 5 Bad user name or password,
# Not authorized, Bad authentication method (paho reports 3.1.1's return codes 4 and 5 as
# the first two); 4 and 5 themselves in case a raw 3.1.1 code comes through.
_AUTH_REASON_CODES = {0x86, 0x87, 0x8C}
_AUTH_RETURN_CODES = {4, 5}
# OpenSSL reasons (`ssl.SSLError.reason`, also inside its text) of a handshake in which one
# side refused the other's certificate: ours (the alerts the broker sends) or theirs
# (our verification). A bare handshake_failure is left out: it also means "no common
# cipher", which no credential fixes.
TLS_AUTH_REASONS = (
    "CERTIFICATE_VERIFY_FAILED",
    "ALERT_BAD_CERTIFICATE",
    "ALERT_UNKNOWN_CA",
    "ALERT_CERTIFICATE_REQUIRED",
    "ALERT_CERTIFICATE_UNKNOWN",
    "ALERT_CERTIFICATE_REVOKED",
    "ALERT_CERTIFICATE_EXPIRED",
    "ALERT_UNSUPPORTED_CERTIFICATE",
    "ALERT_ACCESS_DENIED",
)


def tls_auth_reason(error: BaseException) -> str | None:
    """The OpenSSL reason when `error` is one side refusing the other's certificate."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return "CERTIFICATE_VERIFY_FAILED"
    reason = getattr(error, "reason", None) if isinstance(error, ssl.SSLError) else None
    text = reason if isinstance(reason, str) else str(error).upper()
    for known in TLS_AUTH_REASONS:
        if known in text:
            return known
    return None


def _causes(error: BaseException) -> list[BaseException]:
    """`error` and what it was raised from. aiomqtt re-raises connect errors `from None`,
    which hides the original but keeps it as `__context__`."""
    chain = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        chain.append(current)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return chain


def classify_connect_error(
    error: BaseException, endpoint: Endpoint, socket_error: OSError | None = None
) -> SinkError:
    """What a failed connection attempt means for deliveries: see the module docstring.

    `socket_error` is what the socket reported before the broker answered (a TLS 1.3
    client certificate is refused after the handshake, on the first read).
    """
    candidates = ([socket_error] if socket_error is not None else []) + _causes(error)
    for candidate in candidates:
        if isinstance(candidate, MqttConnectError):
            rc = candidate.rc
            refused = (
                rc.value in _AUTH_REASON_CODES
                if isinstance(rc, ReasonCode)
                else rc in _AUTH_RETURN_CODES
            )
            if refused:
                return AuthenticationSinkError(f"{endpoint} refused the connection: {candidate}")
            return RetryableSinkError(f"{endpoint} refused the connection: {candidate}")
        reason = tls_auth_reason(candidate)
        if reason is not None:
            side = "its" if "VERIFY_FAILED" in reason else "our"
            return AuthenticationSinkError(
                f"TLS with {endpoint} failed on {side} certificate ({reason}): {candidate}"
            )
    detail = socket_error if socket_error is not None else error
    return RetryableSinkError(f"cannot connect to {endpoint}: {detail}")
