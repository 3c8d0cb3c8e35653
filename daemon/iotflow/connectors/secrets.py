"""Where a connection's secrets hide, how they are masked, and how text is cleaned of them.

Three rules, one module, so that every connector follows the same ones:
- a *credential name* (of a header or a URL query parameter) is one that matches
  `CREDENTIAL_NAME`: its value is a secret;
- a URL is shown with the password of its user info and the values of its credential
  query parameters replaced by `*****` (`mask_url`); sent back so, they keep their stored
  values (`unmask_url`);
- text that came from outside or from an exception (a cloud's error body, a reason, a log
  field) has every secret value of its connection replaced by `*****` (`Redactor`).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus, unquote_plus, urlsplit, urlunsplit

from iotflow.config.types import MASK

# Names whose values are credentials. `key` catches apikey, api_key, x-api-key, signingKey;
# `auth` catches Authorization and authorization (TagoIO); `sig`/`code` are the bare names
# of signed URLs (Azure SAS `sig`, Azure Functions `code`).
CREDENTIAL_NAME = re.compile(
    r"(?i)auth|token|key|secret|passw|pwd|signature|signing|cookie|credential|^sig$|^code$"
)

# Shorter values are not searched for in text: they would mask ordinary words and letters.
MIN_REDACTED_LENGTH = 3


def is_credential_name(name: str) -> bool:
    return bool(CREDENTIAL_NAME.search(name))


def _split_query(query: str) -> list[tuple[str, str, str]]:
    """(raw name, '=' or '', raw value) of each `&`-separated part, in order."""
    parts = []
    for part in query.split("&"):
        name, eq, value = part.partition("=")
        parts.append((name, eq, value))
    return parts


def _is_masked(raw_value: str) -> bool:
    return unquote_plus(raw_value) == MASK


def mask_url(url: str) -> str:
    """`url` with the secrets it carries shown as `*****`; the rest of the text unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK  # not a URL we can read: nothing of it is shown
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":" + MASK
        netloc = f"{userinfo}@{host}"
    query = "&".join(
        f"{name}{eq}{MASK if eq and value and is_credential_name(unquote_plus(name)) else value}"
        for name, eq, value in _split_query(parts.query)
    )
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def unmask_url(new: str, old: str) -> str:
    """`new` with each `*****` that `mask_url` would have written replaced by the value at
    the same place in `old`: the n-th parameter of a name takes the n-th of that name."""
    if MASK not in new:
        return new
    try:
        new_parts, old_parts = urlsplit(new), urlsplit(old)
    except ValueError:
        return new
    changed = False
    netloc = new_parts.netloc
    if "@" in netloc and "@" in old_parts.netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, _, password = userinfo.partition(":")
        old_password = old_parts.netloc.rsplit("@", 1)[0].partition(":")[2]
        if password == MASK and old_password:
            netloc, changed = f"{user}:{old_password}@{host}", True
    stored: dict[str, list[str]] = {}
    for name, eq, value in _split_query(old_parts.query):
        if eq:
            stored.setdefault(unquote_plus(name), []).append(value)
    seen: dict[str, int] = {}
    out = []
    for name, eq, value in _split_query(new_parts.query):
        key = unquote_plus(name)
        index = seen.get(key, 0)
        seen[key] = index + 1
        values = stored.get(key, [])
        if eq and _is_masked(value) and is_credential_name(key) and index < len(values):
            value, changed = values[index], True
        out.append(f"{name}{eq}{value}")
    if not changed:
        return new  # nothing of ours was masked there: the client's text as it sent it
    return urlunsplit((new_parts.scheme, netloc, new_parts.path, "&".join(out), new_parts.fragment))


def url_secrets(url: str) -> set[str]:
    """The secret values a URL carries: its user info's password, its credential parameters."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return {url}
    found: set[str] = set()
    if parts.password:
        found.add(parts.password)
    for name, eq, value in _split_query(parts.query):
        if eq and value and is_credential_name(unquote_plus(name)):
            found.update((value, unquote_plus(value)))
    return found


def header_secrets(name: str, value: str) -> set[str]:
    """The secrets in a header value: the whole value, the credential after an auth scheme
    (`Token abc` → `abc`), and for Basic the decoded `user:password` and the password."""
    if not is_credential_name(name):
        return set()
    found = {value}
    scheme, _, credential = value.partition(" ")
    credential = credential.strip()
    if credential:
        found.add(credential)
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credential, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            if decoded:
                found.add(decoded)
                found.add(decoded.partition(":")[2])
    return found


class Redactor:
    """Replaces a connection's secret values in text by `*****`, longest first (a secret
    that contains another is masked whole). Also their percent-encoded forms, as a cloud
    may quote a URL or a form it received."""

    __slots__ = ("_pattern",)

    def __init__(self, secrets: Iterable[str]) -> None:
        variants: set[str] = set()
        for secret in secrets:
            if len(secret) < MIN_REDACTED_LENGTH:
                continue
            variants.update((secret, quote(secret, safe=""), quote_plus(secret)))
        self._pattern = (
            re.compile("|".join(re.escape(v) for v in sorted(variants, key=len, reverse=True)))
            if variants
            else None
        )

    def __call__(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(MASK, text)
