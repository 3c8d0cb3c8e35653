"""`{Path}` templates over the Actility uplink document (topic patterns, header values)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fixtures_path import FIXTURES
from iotflow.formats import Template, actility_document, decode, render_template, resolve_path


def document(name: str = "actility_uplink.json", fmt: str = "actility") -> dict[str, Any]:
    return actility_document(decode(fmt, (FIXTURES / name).read_bytes()))


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{DevEUI}", "0018B20000000B20"),
        ("tpx/things/{DevEUI}/uplink", "tpx/things/0018B20000000B20/uplink"),
        ("{DevEUI_uplink.DevEUI}", "0018B20000000B20"),
        ("{FPort}", "1"),
        ("{LrrRSSI}", "-80.0"),
        ("{Frequency}", "868.1"),
        ("{CustomerData.name}", "My Demo Device"),
        ("{CustomerData.alr.pro}", "ADRF/DEMO"),
        ("{Lrrs.Lrr.0.Lrrid}", "004A18E3"),
        ("{Lrrs.Lrr.1.Lrrid|'single'}", "single"),
        ("{CustomerData.name|DevEUI|'none'}", "My Demo Device"),
        ("{CustomerData.nickname|DevEUI|'none'}", "0018B20000000B20"),
        ("{CustomerData.nickname|'none'}", "none"),
        ('{CustomerData.nickname|"no name"}', "no name"),
        ("{'first'|DevEUI}", "first"),
        ("{ CustomerData.nickname | DevEUI }", "0018B20000000B20"),
        ("{x|'a|b}c'}", "a|b}c"),
        ("{x|''}", ""),
        ("{CustomerData.nickname|Missing}", ""),
        ("a/{Missing}/b", "a//b"),
        ("{CustomerData}", ""),  # an object is not a value
        ("{CustomerData.tags|'none'}", "none"),  # nor is an array
        ("{DevEUI.x|'none'}", "none"),
        ("no braces at all", "no braces at all"),
        ("", ""),
        ("{DevEUI}{FPort}", "0018B20000000B201"),
    ],
)
def test_render(template: str, expected: str) -> None:
    assert Template(template).render(document()) == expected
    assert render_template(template, document()) == expected


def test_render_actility_strings_fixture() -> None:
    doc = document("actility_uplink_strings.json")
    # A pass-through document keeps ThingPark's spelling.
    assert render_template("{DevEUI}/{FPort}", doc) == "0018b20000000b21/1"
    assert render_template("{CustomerData.name|DevEUI}", doc) == "0018b20000000b21"
    assert render_template("{payload.temperature}", doc) == "24.6"


def test_render_converted_documents() -> None:
    pattern = "things/{DevEUI}/{CustomerData.name|'none'}/{FPort}"
    chirpstack = document("chirpstack_up.json", "chirpstack")
    assert render_template(pattern, chirpstack) == "things/A840414FC182F6C2/office-ers/5"
    tts = document("tts_up.json", "tts")
    assert render_template(pattern, tts) == "things/70B3D57ED005A1B2/eui-70b3d57ed005a1b2/2"


def test_empty_string_falls_through() -> None:
    doc = {"DevEUI_uplink": {"DevEUI": "0018B20000000B20", "CustomerData": {"name": ""}}}
    assert render_template("{CustomerData.name|DevEUI}", doc) == "0018B20000000B20"


def test_booleans_and_the_inner_object() -> None:
    inner = {"DevEUI": "0018B20000000B20", "Late": False}
    assert render_template("{Late}", {"DevEUI_uplink": inner}) == "false"
    # A body sent with sendMetadata has no root: it renders the same.
    assert render_template("{DevEUI}/{Late}", inner) == "0018B20000000B20/false"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("DevEUI", "0018B20000000B20"),
        ("DevEUI_uplink.DevEUI", "0018B20000000B20"),
        ("FCntUp", "1174"),
        ("CustomerData.name", "My Demo Device"),
        ("Lrrs.Lrr.0.LrrRSSI", "-80.0"),
        ("Lrrs.Lrr.7.LrrRSSI", None),
        ("Lrrs.Lrr.x", None),
        ("Lrrs.Lrr." + "0" * 5000, None),  # an index int() would refuse
        ("Lrrs.Lrr.\u0660", None),  # ARABIC-INDIC DIGIT ZERO is no index
        ("CustomerData", None),
        ("Missing", None),
        ("", None),
        ("CustomerData..name", None),
    ],
)
def test_resolve_path(path: str, expected: str | None) -> None:
    assert resolve_path(document(), path) == expected


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{", "unclosed '{' at position 0"),
        ("things/{DevEUI", "unclosed '{' at position 7"),
        ("}", "unbalanced '}' at position 0"),
        ("things/DevEUI}", "unbalanced '}' at position 13"),
        ("{DevEUI}}", "unbalanced '}' at position 8"),
        ("{}", "empty expression at position 1"),
        ("{ }", "empty expression at position 2"),
        ("{|DevEUI}", "empty expression at position 1"),
        ("{DevEUI|}", "empty expression at position 8"),
        ("{DevEUI||'x'}", "empty expression at position 8"),
        ("{a{b}}", "unexpected '{' at position 2"),
        ("{'x}", "unterminated quote at position 1"),
        ("{'x'y}", "unexpected text after a quoted literal at position 4"),
        ("{'x' 'y'}", "unexpected quote at position 5"),
        ("{a'x'}", "unexpected quote at position 2"),
        ("{CustomerData..name}", "malformed path 'CustomerData..name': empty key"),
        ("{DevEUI.}", "malformed path 'DevEUI.': empty key"),
    ],
)
def test_malformed(template: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        Template(template)
    with pytest.raises(ValueError, match=r"position|malformed"):
        render_template(template, document())


def test_template_value_semantics() -> None:
    assert Template("{DevEUI}") == Template("{DevEUI}")
    assert Template("{DevEUI}") != Template("{FPort}")
    assert len({Template("{DevEUI}"), Template("{DevEUI}")}) == 1
    assert repr(Template("a/{DevEUI}")) == "Template('a/{DevEUI}')"


json_documents = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children),
    max_leaves=10,
)


@given(text=st.text(alphabet=st.sampled_from("{}|'\". aDevEUI_uplink0"), max_size=30))
def test_any_text_is_a_template_or_a_value_error(text: str) -> None:
    try:
        template = Template(text)
    except ValueError:
        return
    template.render(document())


@given(
    text=st.text().filter(lambda t: "{" not in t and "}" not in t),
    doc=st.dictionaries(st.text(), json_documents),
)
def test_text_without_braces_renders_as_itself(text: str, doc: dict[str, Any]) -> None:
    assert Template(text).render(doc) == text


@given(
    inner=st.dictionaries(st.text(min_size=1), json_documents),
    path=st.lists(st.text(alphabet="ab0.", min_size=1, max_size=3), min_size=1, max_size=3),
)
def test_resolve_path_never_raises(inner: dict[str, Any], path: list[str]) -> None:
    result = resolve_path({"DevEUI_uplink": inner}, ".".join(path))
    assert result is None or (isinstance(result, str) and result != "")


def test_escape_applies_to_substituted_values_only() -> None:
    """How a URL template percent-encodes what an uplink puts into it, not its own text."""
    doc = {"DevEUI_uplink": {"DevEUI": "0018B20000000B20", "CustomerData": {"name": "a/b?c&d"}}}
    template = Template("https://h/{DevEUI}/x?n={CustomerData.name}&lit={Missing|'x y'}")
    assert template.render(doc, escape=lambda v: f"<{v}>") == (
        "https://h/<0018B20000000B20>/x?n=<a/b?c&d>&lit=<x y>"
    )
    assert template.render(doc) == "https://h/0018B20000000B20/x?n=a/b?c&d&lit=x y"


# What a template renders for every kind of value: documents built in Python (processors,
# the API) may hold values JSON cannot, and rendering must never raise on any of them.


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("text", "text"),
        ("", "fallback"),
        (42, "42"),
        (-7, "-7"),
        (2**64, "18446744073709551616"),  # beyond orjson's 64 bits
        (-(2**70), "-1180591620717411303424"),
        # More digits than Python spells out (pytest cannot name it either).
        pytest.param(10**5000, "fallback", id="5001-digit-int"),
        (868.1, "868.1"),
        (1e300, "1e+300"),
        (float("nan"), "fallback"),
        (float("inf"), "fallback"),
        (True, "true"),
        (False, "false"),
        (None, "fallback"),
        ({"a": 1}, "fallback"),
        ([1, 2], "fallback"),
        (b"bytes", "fallback"),
        ((1, 2), "fallback"),
        (object(), "fallback"),
    ],
)
def test_render_of_each_kind_of_value(value: object, expected: str) -> None:
    assert Template("{x|'fallback'}").render({"DevEUI_uplink": {"x": value}}) == expected


KEYS = ["DevEUI", "FPort", "CustomerData", "name", "Lrrs", "Lrr", "0", "1", "x"]
python_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=5)
    | st.binary(max_size=3),
    lambda children: (
        st.lists(children, max_size=3)
        | st.tuples(children)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=3), children, max_size=4)
    ),
    max_leaves=12,
)
paths = st.lists(st.sampled_from(KEYS), min_size=1, max_size=3).map(".".join)
expressions = st.lists(
    paths | st.text(alphabet="abc/ ", max_size=3).map(lambda t: f"'{t}'"), min_size=1, max_size=3
).map(lambda choices: "{" + "|".join(choices) + "}")


@given(
    document=st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=3), python_values),
    parts=st.lists(expressions | st.text(alphabet="ab/-", max_size=3), max_size=4),
    rooted=st.booleans(),
)
def test_any_template_renders_any_document(
    document: dict[str, Any], parts: list[str], rooted: bool
) -> None:
    template = Template("".join(parts))
    rendered = template.render({"DevEUI_uplink": document} if rooted else document)
    assert isinstance(rendered, str)
    for path in (p for p in "".join(parts).strip("{}").split("|") if "'" not in p):
        found = resolve_path(document, path)
        assert found is None or (isinstance(found, str) and found != "")
