"""ThingPark's application-server authentication of uplinks (LRC → AS tunnel interface).

ThingPark posts each uplink to the application server with query parameters `LrnDevEui`,
`LrnFPort`, `LrnInfos`, `AS_ID`, `Time` and, last, `Token`:

    Token = hex(SHA-256(CustomerID + DevEUI + FPort + FCntUp + payload_hex
                        + <query before "&Token=">
                        + <AS key>))

the five body elements taken from the `DevEUI_uplink` document as it writes them, joined
without a separator; the query as its parameters read percent-decoded (`Time=...+02:00`,
sent as `%2B`), joined by `&` in the order sent; the key as configured (ThingPark shows it
as 32 lower-case hex digits). Sources and a captured request that this reproduces are in
docs/ingest.md.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from typing import Any

from iotflow.thingpark import ReplayGuard, Unauthorized, check_request, matches, signed_query

__all__ = ["ReplayGuard", "Unauthorized", "body_elements", "uplink_token", "verify_uplink"]

BODY_ELEMENTS = ("CustomerID", "DevEUI", "FPort", "FCntUp", "payload_hex")


def body_elements(document: Any) -> str:
    """CustomerID, DevEUI, FPort, FCntUp and payload_hex of a `DevEUI_uplink`, concatenated.

    Older releases write numbers as strings, newer ones (JSON typed) as numbers: both read
    as their JSON text. An element that is absent counts as empty.
    """
    inner = document.get("DevEUI_uplink") if isinstance(document, dict) else None
    if not isinstance(inner, dict):
        return ""
    parts = []
    for name in BODY_ELEMENTS:
        value = inner.get(name)
        if value is None or isinstance(value, (bool, dict, list)):
            parts.append("")
        else:
            parts.append(str(value))
    return "".join(parts)


def uplink_token(elements: str, query: str, key: str) -> str:
    """The Token ThingPark sends: `query` is the signed part (the parameters before Token),
    decoded (see iotflow.thingpark.signed_query)."""
    return hashlib.sha256((elements + query + key).encode()).hexdigest()


def verify_uplink(
    raw_query: str,
    document: Any,
    *,
    as_id: str,
    key: str,
    now: datetime,
    max_skew: timedelta,
) -> tuple[str, datetime]:
    """Check AS_ID, Time and Token of an uplink request; return (Token, Time), else raise
    Unauthorized."""
    query, params, token = signed_query(raw_query, after_token=False)
    token, sent_at = check_request(params, token, now=now, max_deviation=max_skew)
    expected = uplink_token(body_elements(document), query, key)
    if not matches(params, token, as_id=as_id, expected=expected):
        raise Unauthorized("AS_ID or Token does not match the ingest's as_id and as_key")
    return token.lower(), sent_at
