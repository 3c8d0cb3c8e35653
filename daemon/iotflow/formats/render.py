"""What the sinks send: the Actility uplink document, its body variants, and `{Path}` templates.

Every HTTP brand receives the ThingPark document `{"DevEUI_uplink": {...}}`, converted from
the input when the input is not ThingPark. Topic patterns and header values are templates
over that document: `{DevEUI}`, `{CustomerData.name|DevEUI|'none'}`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

from iotflow.formats.uplink import Uplink

ROOT = "DevEUI_uplink"


def actility_document(uplink: Uplink) -> dict[str, Any]:
    """The ThingPark uplink document for `uplink`.

    A ThingPark input is returned as it was received (the same object: callers must not
    modify it). Other inputs are converted; a key whose value is unknown is left out
    rather than sent as null.
    """
    if uplink.format == "actility":
        return uplink.document
    radio = uplink.radio
    best = radio.gateways[0] if radio.gateways else None
    inner: dict[str, Any] = {
        "Time": uplink.time.isoformat(timespec="milliseconds"),
        "DevEUI": uplink.dev_eui,
        "FPort": uplink.f_port,
        "FCntUp": uplink.f_cnt,
        "payload_hex": uplink.payload.hex(),
        "LrrRSSI": radio.rssi,
        "LrrSNR": radio.snr,
        "Lrrid": best.id if best is not None else None,
        "SpFact": radio.spreading_factor,
        "Frequency": radio.frequency_mhz,
        "DevAddr": radio.dev_addr,
        "Lrrs": {
            "Lrr": [
                _without_none({"Lrrid": g.id, "LrrRSSI": g.rssi, "LrrSNR": g.snr})
                for g in radio.gateways
            ]
        }
        if radio.gateways
        else None,
        "LrrLAT": best.latitude if best is not None else None,
        "LrrLON": best.longitude if best is not None else None,
        "CustomerData": {"name": uplink.device_name} if uplink.device_name else None,
        "payload": uplink.decoded,
    }
    return {ROOT: _without_none(inner)}


def _without_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def render_body(document: dict[str, Any], *, send_metadata: bool, send_raw_decoded: bool) -> bytes:
    """The JSON body a connection sends for `document`, by its two options.

    - neither: the whole document, `{"DevEUI_uplink": {...}}`;
    - `send_metadata` (sendMetadata): the inner object, without the `DevEUI_uplink` root;
    - `send_raw_decoded` (sendRawDecodedFormat): only the decoded `payload` object. When
      the uplink was not decoded, the body is what the connection would send without this
      option: the whole document, or the inner object when `send_metadata` is also set.

    Both set: the decoded payload wins, as the narrower of the two requests.
    """
    inner = document.get(ROOT)
    if send_raw_decoded and isinstance(inner, dict):
        decoded = inner.get("payload")
        if isinstance(decoded, dict):
            return orjson.dumps(decoded)
    if send_metadata and isinstance(inner, dict):
        return orjson.dumps(inner)
    return orjson.dumps(document)


# Templates


@dataclass(frozen=True, slots=True)
class _Literal:
    text: str


@dataclass(frozen=True, slots=True)
class _Path:
    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Expression:
    choices: tuple[_Literal | _Path, ...]


def _split_path(path: str) -> tuple[str, ...]:
    """The keys of a dotted path, relative to the inner object. ValueError when malformed."""
    path = path.strip()
    if path.startswith(ROOT + "."):
        path = path[len(ROOT) + 1 :]
    keys = tuple(path.split("."))
    if not all(keys):
        raise ValueError(f"malformed path {path!r}: empty key")
    return keys


def _inner(document: dict[str, Any]) -> dict[str, Any]:
    # Accept the bare inner object too (a body rendered with sendMetadata).
    inner = document.get(ROOT)
    return inner if isinstance(inner, dict) else document


def _is_index(key: str) -> bool:
    # ASCII digits only, and few: int() refuses more than 4300 digits with a ValueError.
    return key.isascii() and key.isdigit() and len(key) <= 18


def _lookup(root: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    value: Any = root
    for key in keys:
        if isinstance(value, dict):
            value = value.get(key)
        elif isinstance(value, list) and _is_index(key) and int(key) < len(value):
            value = value[int(key)]
        else:
            return None
    return _scalar_text(value)


def _scalar_text(value: Any) -> str | None:
    """A scalar in JSON's spelling (`868.1`, `42`, `true`); None for anything else.

    Documents built in Python (processors, the API) may hold what JSON cannot: integers
    beyond 64 bits are spelt in full, NaN and infinities count as absent.
    """
    if isinstance(value, str):
        return value or None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        try:
            return str(value)
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
            return None
    if isinstance(value, float):
        return orjson.dumps(value).decode() if math.isfinite(value) else None
    return None  # absent, null, object, array or a non-JSON value


def resolve_path(document: dict[str, Any], path: str) -> str | None:
    """The text of the scalar at dotted `path` in the inner `DevEUI_uplink` object.

    A leading `DevEUI_uplink.` is accepted; a decimal key indexes an array
    (`Lrrs.Lrr.0.Lrrid`). None when the path is malformed or does not lead to a non-empty
    scalar.
    """
    try:
        keys = _split_path(path)
    except ValueError:
        return None
    return _lookup(_inner(document), keys)


def _parse_expression(text: str, start: int) -> tuple[_Expression, int]:
    """The expression that starts after the `{` at `start - 1`, and the index after its `}`."""
    choices: list[_Literal | _Path] = []
    path: list[str] = []
    literal: str | None = None
    i = start
    while i < len(text):
        ch = text[i]
        if ch in "'\"":
            if literal is not None or "".join(path).strip():
                raise ValueError(f"unexpected quote at position {i}")
            close = text.find(ch, i + 1)
            if close < 0:
                raise ValueError(f"unterminated quote at position {i}")
            literal = text[i + 1 : close]
            i = close + 1
            continue
        if ch in "|}":
            if literal is not None:
                choices.append(_Literal(literal))
            elif "".join(path).strip():
                choices.append(_Path(_split_path("".join(path))))
            else:
                raise ValueError(f"empty expression at position {i}")
            if ch == "}":
                return _Expression(tuple(choices)), i + 1
            path, literal = [], None
        elif ch == "{":
            raise ValueError(f"unexpected '{{' at position {i}")
        elif literal is not None and not ch.isspace():
            raise ValueError(f"unexpected text after a quoted literal at position {i}")
        else:
            path.append(ch)
        i += 1
    raise ValueError(f"unclosed '{{' at position {start - 1}")


class Template:
    """A `{Path}` template, parsed once.

    Text outside braces is kept. `{A|B|'x'}` renders the first of the paths `A`, `B` that
    leads to a non-empty scalar (see `resolve_path`), else the quoted literal; an
    expression with no such path and no literal renders as the empty string. Braces cannot
    be escaped. A malformed template (unbalanced braces, empty expression, unterminated
    quote) raises ValueError at construction.
    """

    __slots__ = ("_parts", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        parts: list[str | _Expression] = []
        i = plain = 0
        while i < len(text):
            if text[i] == "}":
                raise ValueError(f"unbalanced '}}' at position {i}")
            if text[i] != "{":
                i += 1
                continue
            if plain < i:
                parts.append(text[plain:i])
            expression, i = _parse_expression(text, i + 1)
            parts.append(expression)
            plain = i
        if plain < len(text):
            parts.append(text[plain:])
        self._parts = tuple(parts)

    def render(self, document: dict[str, Any], escape: Callable[[str], str] | None = None) -> str:
        """The text for `document`; `escape` is applied to each substituted value (not to
        the template's own text), e.g. to percent-encode values put into a URL."""
        root = _inner(document)
        out = []
        for part in self._parts:
            if isinstance(part, str):
                out.append(part)
                continue
            for choice in part.choices:
                found = choice.text if isinstance(choice, _Literal) else _lookup(root, choice.keys)
                if found is not None:
                    out.append(found if escape is None else escape(found))
                    break
        return "".join(out)

    def __repr__(self) -> str:
        return f"Template({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Template) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


@lru_cache(maxsize=256)
def _compiled(template: str) -> Template:
    return Template(template)


def render_template(template: str, document: dict[str, Any]) -> str:
    """Render `template` over `document` (see `Template`); ValueError when it is malformed."""
    return _compiled(template).render(document)
