"""HTTP downlinks signed the way ThingPark's network server wants them: AS_ID, Time, Token.

ThingPark's network server (the LRC) takes a downlink from an application server as an
HTTP POST whose query carries `AS_ID` (the application server's id), `Time` (ISO 8601, the
sender's clock) and last `Token`: the lower-case hex SHA-256 of the query string before
`&Token=` followed by the AS key both sides share. It refuses a Time further from its own
clock than the AS profile's "Max Time Deviation". The connection's `downlinkAsId` and
`downlinkAsKey` are that id and key, so a cloud or script that drives ThingPark already
knows how to sign for iotflow.

One difference: ThingPark puts the command in the query (`DevEUI`, `FPort`, `Payload`),
iotflow in the JSON body. So the body is signed too, between the query and the key:

    Token = hex(SHA-256(<query before Token> + <body bytes> + <downlinkAsKey>))

The query is signed as its parameters read once percent-decoded (`Time=...+02:00` whether
the `+` was sent as `%2B` or not: ThingPark's clients differ there), in the order sent.
A Token is accepted once: while its Time is within the deviation, a replay is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import OrderedDict
from datetime import datetime, timedelta
from urllib.parse import unquote

from iotflow.formats.fields import parse_time

__all__ = ["ReplayGuard", "Unauthorized", "sign", "signed_query", "verify"]


class Unauthorized(Exception):
    """A downlink request whose signature does not hold; the message says which part.

    `public` is what the sender is told: the same as the message where it is about the
    request alone (a missing parameter, the clock), and one sentence for everything that
    depends on the connection, so that the answer does not tell whether it exists or has
    credentials.
    """

    def __init__(self, message: str, *, public: str | None = None) -> None:
        super().__init__(message)
        self.public = public if public is not None else message


# Said for a wrong AS_ID or Token, a connection without credentials, and an unknown one.
MISMATCH = "AS_ID or Token does not match the connection's downlink credentials"


def sign(query: str, body: bytes, key: str) -> str:
    """The Token of a request: `query` is the query string without Token, decoded."""
    return hashlib.sha256(query.encode() + body + key.encode()).hexdigest()


def signed_query(raw_query: str) -> tuple[str, dict[str, str], str | None]:
    """(the signed part of the query, its parameters, the Token) of a raw query string.

    Every parameter but Token is signed, percent-decoded (`+` stays a `+`: in a ThingPark
    Time it is the offset's sign, not a form-encoded space), joined by `&` in order.
    """
    signed: list[str] = []
    params: dict[str, str] = {}
    token: str | None = None
    for part in raw_query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        name, value = unquote(name), unquote(value)
        if name == "Token":
            token = value
            continue
        signed.append(f"{name}={value}")
        params.setdefault(name, value)
    return "&".join(signed), params, token


def verify(
    raw_query: str,
    body: bytes,
    *,
    as_id: str | None,
    key: str | None,
    now: datetime,
    max_deviation: timedelta,
) -> tuple[str, datetime]:
    """Check the AS_ID, Time and Token of a request; return (Token, Time), else raise
    Unauthorized. `as_id` and `key` are the connection's; without both, nothing passes."""
    query, params, token = signed_query(raw_query)
    missing = [name for name in ("AS_ID", "Time") if not params.get(name)]
    if not token:
        missing.append("Token")
    if missing:
        raise Unauthorized(f"the query must carry AS_ID, Time and Token; missing {missing}")
    assert token is not None
    # What is wrong with the request itself comes first, whatever the connection.
    sent_at = parse_time(params["Time"])
    if sent_at is None:
        raise Unauthorized("Time must be ISO 8601 with a UTC offset")
    if abs(now - sent_at) > max_deviation:
        raise Unauthorized(
            f"Time is more than {max_deviation.total_seconds():g}s from the server's clock"
        )
    # Without credentials the same digest is computed and compared (against nothing that
    # can match): the time taken does not tell this case from a wrong Token.
    expected = sign(query, body, key or "")
    id_ok = hmac.compare_digest(params["AS_ID"].encode(), (as_id or "").encode())
    token_ok = hmac.compare_digest(token.lower().encode(), expected.encode())
    if not as_id or not key:
        raise Unauthorized("the connection has no downlinkAsId and downlinkAsKey", public=MISMATCH)
    # Both compared above, whatever the first gives: the time taken says nothing about either.
    if not (id_ok and token_ok):
        raise Unauthorized(MISMATCH)
    return token.lower(), sent_at


class ReplayGuard:
    """Tokens accepted lately, each kept until its Time is out of the deviation window.

    In memory, per instance: of a scale-out, each instance refuses its own replays only.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()  # token -> forget after (epoch)
        self._capacity = capacity

    def use(self, token: str, sent_at: datetime, max_deviation: timedelta) -> None:
        """Record `token`; Unauthorized when it was used already (a replay)."""
        now = time.time()
        # Roughly in expiry order (Times are close to now): drop from the old end.
        while self._seen and next(iter(self._seen.values())) < now:
            self._seen.popitem(last=False)
        forget_after = self._seen.get(token)
        if forget_after is not None and forget_after >= now:
            raise Unauthorized("this Token was used already; sign each request anew")
        self._seen.pop(token, None)  # expired, but not reached by the sweep yet
        while len(self._seen) >= self._capacity:
            self._seen.popitem(last=False)
        self._seen[token] = sent_at.timestamp() + max_deviation.total_seconds()
