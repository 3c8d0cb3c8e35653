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
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import unquote

from iotflow.formats.fields import parse_time

__all__ = ["ReplayGuard", "Unauthorized", "body_elements", "uplink_token", "verify_uplink"]

BODY_ELEMENTS = ("CustomerID", "DevEUI", "FPort", "FCntUp", "payload_hex")


class Unauthorized(Exception):
    """A request whose credentials do not hold; the message says which part (no secret)."""


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
    """The Token ThingPark sends: `query` is the signed part, decoded (see signed_query)."""
    return hashlib.sha256((elements + query + key).encode()).hexdigest()


def signed_query(raw_query: str) -> tuple[str, dict[str, str], str | None]:
    """(the signed part, its parameters, the Token) of a raw query string.

    The signed part is every parameter before Token, percent-decoded (a `+` stays a `+`:
    in a ThingPark Time it is the offset's sign, not a form-encoded space), in order.
    """
    signed: list[str] = []
    params: dict[str, str] = {}
    for part in raw_query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        name, value = unquote(name), unquote(value)
        if name == "Token":
            return "&".join(signed), params, value
        signed.append(f"{name}={value}")
        params.setdefault(name, value)
    return "&".join(signed), params, None


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
    query, params, token = signed_query(raw_query)
    missing = [name for name in ("AS_ID", "Time") if not params.get(name)]
    if not token:
        missing.append("Token")
    if missing:
        raise Unauthorized(f"the query must carry AS_ID, Time and Token; missing {missing}")
    assert token is not None
    sent_at = parse_time(params["Time"])
    if sent_at is None:
        raise Unauthorized("Time must be ISO 8601 with a UTC offset")
    if abs(now - sent_at) > max_skew:
        raise Unauthorized(
            f"Time is more than {max_skew.total_seconds():g}s from the server's clock"
        )
    expected = uplink_token(body_elements(document), query, key)
    # Both compared, whatever the first gives: the time taken says nothing about either.
    id_ok = hmac.compare_digest(params["AS_ID"].encode(), as_id.encode())
    token_ok = hmac.compare_digest(token.lower().encode(), expected.encode())
    if not (id_ok and token_ok):
        raise Unauthorized("AS_ID or Token does not match the ingest's as_id and as_key")
    return token.lower(), sent_at


class ReplayGuard:
    """Tokens accepted lately, each kept only while its Time is inside the skew window.

    A token outside the window is refused by the Time check already, so that is all the
    memory a replay check needs. In memory, per instance: of a scale-out, each instance
    refuses its own replays only.
    """

    def __init__(self, capacity: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()  # token -> forget after (epoch)
        self._capacity = capacity
        self._clock = clock

    def __len__(self) -> int:
        return len(self._seen)

    def use(self, token: str, sent_at: datetime, max_skew: timedelta) -> None:
        """Record `token`; Unauthorized when it was used already (a replay)."""
        now = self._clock()
        # Roughly in expiry order (Times are close to now): drop from the old end.
        while self._seen and next(iter(self._seen.values())) < now:
            self._seen.popitem(last=False)
        forget_after = self._seen.get(token)
        if forget_after is not None and forget_after >= now:
            raise Unauthorized("this Token was used already (a replay)")
        self._seen.pop(token, None)
        while len(self._seen) >= self._capacity:
            self._seen.popitem(last=False)
        self._seen[token] = sent_at.timestamp() + max_skew.total_seconds()

    def release(self, token: str) -> None:
        """Forget `token`: its request was not taken (503), so the sender may send it again."""
        self._seen.pop(token, None)
