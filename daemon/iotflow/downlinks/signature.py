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
from datetime import datetime, timedelta

from iotflow import thingpark
from iotflow.thingpark import Unauthorized, check_request, matches

__all__ = ["ReplayGuard", "Unauthorized", "sign", "signed_query", "verify"]


# Said for a wrong AS_ID or Token, a connection without credentials, and an unknown one.
MISMATCH = "AS_ID or Token does not match the connection's downlink credentials"


def sign(query: str, body: bytes, key: str) -> str:
    """The Token of a request: `query` is the query string without Token, decoded."""
    return hashlib.sha256(query.encode() + body + key.encode()).hexdigest()


def signed_query(raw_query: str) -> tuple[str, dict[str, str], str | None]:
    """(the signed part of the query, its parameters, the Token) of a raw query string:
    every parameter but Token is signed, decoded (see iotflow.thingpark.signed_query)."""
    return thingpark.signed_query(raw_query, after_token=True)


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
    # What is wrong with the request itself comes first, whatever the connection.
    token, sent_at = check_request(params, token, now=now, max_deviation=max_deviation)
    # Without credentials the same digest is computed and compared (against nothing that
    # can match): the time taken does not tell this case from a wrong Token.
    matched = matches(params, token, as_id=as_id or "", expected=sign(query, body, key or ""))
    if not as_id or not key:
        raise Unauthorized("the connection has no downlinkAsId and downlinkAsKey", public=MISMATCH)
    if not matched:
        raise Unauthorized(MISMATCH)
    return token.lower(), sent_at


class ReplayGuard(thingpark.ReplayGuard):
    """Tokens of downlink requests accepted lately (see iotflow.thingpark.ReplayGuard)."""

    REPLAYED = "this Token was used already; sign each request anew"
