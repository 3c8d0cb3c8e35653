"""Where a connection's secrets hide, how they are masked on output and cleaned from text."""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotflow.config.types import MASK, unmask
from iotflow.connectors import parse_connection
from iotflow.connectors.secrets import (
    Redactor,
    header_secrets,
    is_credential_name,
    mask_url,
    unmask_url,
    url_secrets,
)
from iotflow.errors import ConfigError


@pytest.mark.parametrize(
    "name",
    [
        "authorization",
        "Authorization",
        "token",
        "access_token",
        "key",
        "apikey",
        "api_key",
        "X-Api-Key",
        "webhookSigningKey",
        "signature",
        "sig",
        "code",
        "password",
        "client_secret",
        "Cookie",
    ],
)
def test_credential_names(name: str) -> None:
    assert is_credential_name(name)


@pytest.mark.parametrize("name", ["site", "projectId", "format", "devEUI", "region", "encoding"])
def test_ordinary_names(name: str) -> None:
    assert not is_credential_name(name)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "https://actility.middleware.tago.io/uplink?authorization=abc-123",
            "https://actility.middleware.tago.io/uplink?authorization=*****",
        ),
        (
            "https://h/x?site=paris&token=t1&apikey=k2&format=json",
            "https://h/x?site=paris&token=*****&apikey=*****&format=json",
        ),
        ("https://user:p4ss@h:8443/x?a=1", "https://user:*****@h:8443/x?a=1"),
        ("https://h/x?sig=s%2Bg%3D&code=", "https://h/x?sig=*****&code="),
        ("https://h/{DevEUI}?key={CustomerData.key}", "https://h/{DevEUI}?key=*****"),
        ("https://h/plain/path", "https://h/plain/path"),
        ("https://h/x?flag&b=2", "https://h/x?flag&b=2"),
    ],
)
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown
    assert unmask_url(shown, url) == url


def test_unmask_url_keeps_what_the_client_changed() -> None:
    stored = "https://h/up?authorization=old-secret&site=a"
    # The client changed the site and kept the masked credential: the stored one stays.
    assert unmask_url("https://h/up?authorization=*****&site=b", stored) == (
        "https://h/up?authorization=old-secret&site=b"
    )
    # A new credential typed in replaces the stored one.
    assert unmask_url("https://h/up?authorization=new&site=a", stored) == (
        "https://h/up?authorization=new&site=a"
    )
    # A masked parameter the stored URL does not have stays as sent (then it is a value).
    assert unmask_url("https://h/up?token=*****", stored) == "https://h/up?token=*****"
    # Not a URL, or nothing masked: the text as sent.
    assert unmask_url("Token *****", "Token abc") == "Token *****"


def test_unmask_restores_urls_inside_a_configuration() -> None:
    url = "https://h/?authorization=s3"
    stored = {"destinationURL": url, "headers": {"Authorization": "T"}}
    sent = {"destinationURL": mask_url(url), "headers": {"Authorization": MASK}}
    assert unmask(sent, stored, unmask_url) == stored


query_values = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=3)


@given(secret=query_values, other=st.text(alphabet="abcdefgh", max_size=8))
def test_a_masked_url_never_shows_the_secret(secret: str, other: str) -> None:
    url = f"https://h/x?site={other}&authorization={quote_plus(secret)}"
    shown = mask_url(url)
    assert shown == f"https://h/x?site={other}&authorization=*****"
    assert unmask_url(shown, url) == url
    assert secret in url_secrets(url)


def test_header_secrets() -> None:
    assert header_secrets("Authorization", "Token abc123") == {"Token abc123", "abc123"}
    basic = base64.b64encode(b"tenant/user:pa55").decode()
    assert header_secrets("Authorization", f"Basic {basic}") == {
        f"Basic {basic}",
        basic,
        "tenant/user:pa55",
        "pa55",
    }
    assert header_secrets("projectId", "p-1") == set()


def test_redactor() -> None:
    redact = Redactor(["s3cret/value", "s3cret", "ab"])
    text = f"got s3cret/value and s3cret, {quote('s3cret/value', safe='')}, ab stays"
    assert redact(text) == "got ***** and *****, *****, ab stays"
    assert Redactor([])("anything") == "anything"


def _secrets(body: dict[str, Any]) -> set[str]:
    return parse_connection({"id": "c", "name": "n", **body}).secret_values()


def test_every_connector_knows_its_secret_values() -> None:
    http = _secrets(
        {
            "connectorId": "actility-http-iot",
            "configuration": {
                "destinationURL": "https://u:pw1@h/x?token=tk2&site=s",
                "headers": {"Authorization": "Token tk3", "X-Site": "visible"},
                "downlinkAsKey": "ak4",
            },
        }
    )
    assert {"pw1", "tk2", "Token tk3", "tk3", "ak4"} <= http
    assert "visible" not in http
    assert "s" not in http
    mqtt = _secrets(
        {
            "connectorId": "actility-mqtt-iot",
            "configuration": {"hostName": "b:1883", "username": "u", "password": "mq5"},
        }
    )
    assert mqtt == {"mq5"}
    aws = _secrets(
        {
            "connectorId": "actility-aws-iot",
            "configuration": {
                "region": "eu-west-1",
                "accountPrefix": "a1",
                "accessKeyId": "AKIA6",
                "secretAccessKey": "sk7",
            },
        }
    )
    assert {"AKIA6", "sk7"} <= aws
    c8y = _secrets(
        {
            "connectorId": "actility-cumulocity-iot",
            "configuration": {
                "hostName": "c8y.example.com",
                "tenantId": "t1",
                "username": "u",
                "password": "pw8",
            },
        }
    )
    assert c8y == {"pw8", base64.b64encode(b"t1/u:pw8").decode()}
    board = _secrets(
        {
            "connectorId": "actility-thingsboard-iot",
            "configuration": {
                "hostName": "tb.example.com",
                "accessTokens": {"0018B20000000B20": "tb9", "0018b20000000b21": "tb10"},
                "accessTokenPattern": "{DevEUI}",
            },
        }
    )
    # The tokens that go into the URL's path; a pattern's tokens are the DevEUIs (public).
    assert board == {"tb9", "tb10"}
    hec = _secrets(
        {
            "connectorId": "actility-splunk-iot",
            "configuration": {"hostName": "splunk", "hecToken": "hec11", "source": "s"},
        }
    )
    assert hec == {"hec11"}
    influx = _secrets(
        {
            "connectorId": "actility-influxdb-iot",
            "configuration": {"hostName": "i", "org": "o", "bucket": "b", "token": "ix12"},
        }
    )
    assert influx == {"ix12"}


@pytest.mark.parametrize("value", ["a\r\nb", "a\nb", "a\x00b", "a\x7fb"])
def test_header_values_with_control_characters_are_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="control characters"):
        parse_connection(
            {
                "id": "c",
                "name": "n",
                "connectorId": "actility-http-iot",
                "configuration": {"destinationURL": "https://h/", "headers": {"X-A": value}},
            }
        )


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://{DevEUI}.h/x", "path and the query only"),
        ("https://h:{FPort}/x", "path and the query only"),
        ("https://h/{DevEUI", "unclosed"),
        ("https://h/x}", "unbalanced"),
        ("https://h/{DevEUI}#top", "fragment"),
        ("https://h/x\r\n", "control characters"),
    ],
)
def test_destination_url_templates_refused(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        parse_connection(
            {
                "id": "c",
                "name": "n",
                "connectorId": "actility-http-iot",
                "configuration": {"destinationURL": url},
            }
        )
