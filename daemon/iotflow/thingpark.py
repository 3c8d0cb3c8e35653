"""ThingPark's application-server request authentication: `AS_ID`, `Time` and, last, `Token`.

ThingPark signs what its network server posts to an application server this way (HTTP
ingest, ingest/thingpark.py), and iotflow takes downlinks signed the same way
(downlinks/signature.py). What each signs differs; what they check alike is here: the
three parameters are there, Time is within the allowed deviation from the server's clock,
AS_ID and Token are compared in constant time, and a Token is accepted once.
"""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from urllib.parse import unquote

from iotflow.formats.fields import parse_time

__all__ = ["ReplayGuard", "Unauthorized", "check_request", "matches", "signed_query"]


class Unauthorized(Exception):
    """A request whose signature does not hold; the message says which part (no secret).

    `public` is what the sender is told: the message unless the caller says otherwise
    (downlinks tell one sentence for everything that depends on the connection).
    """

    def __init__(self, message: str, *, public: str | None = None) -> None:
        super().__init__(message)
        self.public = public if public is not None else message


def signed_query(raw_query: str, *, after_token: bool) -> tuple[str, dict[str, str], str | None]:
    """(the signed part, its parameters, the Token) of a raw query string.

    The signed part is every parameter before Token (`after_token`: after it as well),
    percent-decoded (a `+` stays a `+`: in a ThingPark Time it is the offset's sign, not a
    form-encoded space), joined by `&` in order.
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
            if not after_token:
                break
            continue
        signed.append(f"{name}={value}")
        params.setdefault(name, value)
    return "&".join(signed), params, token


def check_request(
    params: Mapping[str, str], token: str | None, *, now: datetime, max_deviation: timedelta
) -> tuple[str, datetime]:
    """(Token, Time) of a request's query parameters, else Unauthorized: AS_ID, Time and
    Token must be there, and Time within `max_deviation` of `now`."""
    missing = [name for name in ("AS_ID", "Time") if not params.get(name)]
    if not token:
        missing.append("Token")
    if missing:
        raise Unauthorized(f"the query must carry AS_ID, Time and Token; missing {missing}")
    assert token is not None
    sent_at = parse_time(params["Time"])
    if sent_at is None:
        raise Unauthorized("Time must be ISO 8601 with a UTC offset")
    if abs(now - sent_at) > max_deviation:
        raise Unauthorized(
            f"Time is more than {max_deviation.total_seconds():g}s from the server's clock"
        )
    return token, sent_at


def matches(params: Mapping[str, str], token: str, *, as_id: str, expected: str) -> bool:
    """Whether AS_ID is `as_id` and Token (in any case) the `expected` digest."""
    # Both compared, whatever the first gives: the time taken says nothing about either.
    id_ok = hmac.compare_digest(params["AS_ID"].encode(), as_id.encode())
    token_ok = hmac.compare_digest(token.lower().encode(), expected.encode())
    return id_ok and token_ok


class ReplayGuard:
    """Tokens accepted lately, each kept only while its Time is inside the deviation window.

    A token outside the window is refused by the Time check already, so that is all the
    memory a replay check needs. In memory, per instance: of a scale-out, each instance
    refuses its own replays only. `REPLAYED` is what a replay is refused with.
    """

    REPLAYED = "this Token was used already (a replay)"

    def __init__(self, capacity: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()  # token -> forget after (epoch)
        self._capacity = capacity
        self._clock = clock

    def __len__(self) -> int:
        return len(self._seen)

    def use(self, token: str, sent_at: datetime, max_deviation: timedelta) -> None:
        """Record `token`; Unauthorized when it was used already (a replay)."""
        now = self._clock()
        # Roughly in expiry order (Times are close to now): drop from the old end.
        while self._seen and next(iter(self._seen.values())) < now:
            self._seen.popitem(last=False)
        forget_after = self._seen.get(token)
        if forget_after is not None and forget_after >= now:
            raise Unauthorized(self.REPLAYED)
        self._seen.pop(token, None)  # expired, but not reached by the sweep yet
        while len(self._seen) >= self._capacity:
            self._seen.popitem(last=False)
        self._seen[token] = sent_at.timestamp() + max_deviation.total_seconds()

    def release(self, token: str) -> None:
        """Forget `token`: its request was not taken (503), so the sender may send it again."""
        self._seen.pop(token, None)
