"""API token roles (reader, writer, owner), the caller's name in events, and the config
that declares them (docs/console.md "Roles")."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from iotflow.api.server import TABLE, openapi_document
from iotflow.api.table import Auth
from iotflow.config.load import load_settings
from iotflow.config.model import Role
from iotflow.errors import ConfigError
from support.clouds import FakeCloud
from support.daemon import DaemonProcess
from support.mosquitto import Mosquitto

BASE = "/iot-flow/v1"
TOKENS = (
    '["owner-secret-1", {name = "grafana", token = "reader-secret-2", role = "reader"},'
    ' {name = "ci", token = "writer-secret-3", role = "writer"}]'
)
SECRETS = ("owner-secret-1", "reader-secret-2", "writer-secret-3")
DEV = "0018B20000003001"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Caller:
    def __init__(self, session: aiohttp.ClientSession, base: str, token: str) -> None:
        self.session, self.base, self.token = session, base, token

    async def __call__(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        sent = headers if headers is not None else bearer(self.token)
        async with self.session.request(
            method, f"{self.base}{BASE}{path}", json=body, headers=sent
        ) as r:
            text = await r.text()
            return r.status, (json.loads(text) if text else None)


@pytest.fixture
async def callers(
    tmp_path: Path, mosquitto: Mosquitto
) -> AsyncIterator[tuple[DaemonProcess, Caller, Caller, Caller]]:
    daemon = DaemonProcess(tmp_path / "roles", broker_url=mosquitto.url, tokens=TOKENS)
    await daemon.start()
    async with aiohttp.ClientSession() as session:
        yield (
            daemon,
            Caller(session, daemon.api, "owner-secret-1"),
            Caller(session, daemon.api, "writer-secret-3"),
            Caller(session, daemon.api, "reader-secret-2"),
        )
    await daemon.close()


def http_body(cloud: FakeCloud) -> dict[str, Any]:
    return {
        "name": "roles",
        "connectorId": "actility-http-iot",
        "brand": "DATACAKE",
        "configuration": {
            "destinationURL": cloud.url("/dc"),
            "headers": {"Authorization": "Token very-secret"},
        },
    }


@pytest.mark.slow
async def test_each_role_does_what_it_may_and_events_say_who(
    callers: tuple[DaemonProcess, Caller, Caller, Caller], cloud: FakeCloud
) -> None:
    daemon, owner, writer, reader = callers
    assert await owner("GET", "/whoami") == (200, {"name": "token-1", "role": "owner"})
    assert await writer("GET", "/whoami") == (200, {"name": "ci", "role": "writer"})
    assert await reader("GET", "/whoami") == (200, {"name": "grafana", "role": "reader"})

    # A reader reads, and changes nothing: 403 in the error shape, naming its role.
    status, denied = await reader("POST", "/connections", http_body(cloud))
    assert status == 403
    assert denied["code"] == "forbidden"
    assert "grafana" in denied["message"]
    assert "reader" in denied["message"]
    assert denied["details"] == []
    status, listed = await reader("GET", "/connections")
    assert (status, listed) == (200, [])

    status, created = await writer("POST", "/connections", http_body(cloud))
    assert status == 201, created
    cid = created["id"]
    for path, body in (
        (f"/devices/{DEV}", {"connections": [cid]}),
        (f"/connections/{cid}", http_body(cloud)),
    ):
        assert (await reader("PUT", path, body))[0] == 403
    assert (await reader("DELETE", f"/connections/{cid}"))[0] == 403
    assert (await reader("DELETE", f"/devices/{DEV}"))[0] == 403
    assert (await reader("POST", "/flows", {"name": "f"}))[0] == 403
    # Secrets are masked for a reader as for everyone.
    status, seen = await reader("GET", f"/connections/{cid}")
    assert status == 200
    assert seen["configuration"]["headers"]["Authorization"] == "*****"
    # Trying a driver changes nothing: a reader may (404: no such driver, not 403).
    assert (await reader("POST", "/drivers/a:b:1/decode", {"payload_hex": "00"}))[0] == 404

    # The writer binds (any spelling), edits and makes a flow; every change says "ci".
    status, _ = await writer("PUT", "/devices/0018b200-0000-3001", {"connections": [cid]})
    assert status == 200
    edited = {**http_body(cloud), "name": "renamed"}
    edited["configuration"]["headers"]["Authorization"] = "*****"
    assert (await writer("PUT", f"/connections/{cid}", edited))[0] == 200
    flow = {
        "name": "f",
        "matchers": [{"type": "key", "key": "lora:0018b20000003002"}],
        "connectors": [{"id": "actility-http-iot", "connectionId": cid}],
    }
    status, made = await writer("POST", "/flows", flow)
    assert status == 201, made
    assert (await owner("DELETE", f"/devices/{DEV}"))[0] == 204

    # Dead letters: a writer re-sends, only an owner purges or replays.
    window = {"from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z"}
    resend = await writer("POST", f"/connections/{cid}/deadLetters/resend", {"all": True})
    assert resend == (202, {"resent": 0})
    assert (await reader("POST", f"/connections/{cid}/deadLetters/resend", {"all": True}))[0] == 403
    for caller in (reader, writer):
        assert (await caller("DELETE", f"/connections/{cid}/deadLetters"))[0] == 403
        assert (await caller("POST", f"/connections/{cid}/replay", window))[0] == 403
        assert (await caller("GET", f"/connections/{cid}/deadLetters"))[0] == 200
    assert (await owner("DELETE", f"/connections/{cid}/deadLetters"))[0] == 204
    status, started = await owner("POST", f"/connections/{cid}/replay", window)
    assert status == 202, started
    assert (await writer("DELETE", f"/replays/{started['id']}"))[0] == 403
    assert (await reader("GET", f"/replays/{started['id']}"))[0] == 200
    status, cancelled = await owner("DELETE", f"/replays/{started['id']}")
    assert status == 200, cancelled

    async def events() -> list[dict[str, Any]]:
        status, found = await reader("GET", f"/connections/{cid}/events?perPage=100")
        assert status == 200
        return list(found)

    # Events are written in the background (iotflow.events), with nothing to await: poll.
    deadline = asyncio.get_running_loop().time() + 30
    found = await events()
    last = "replay_cancelled" if cancelled["state"] == "cancelled" else "replay_ended"
    while last not in [e["type"] for e in found]:
        assert asyncio.get_running_loop().time() < deadline, found
        await asyncio.sleep(0.05)
        found = await events()
    by_type = {e["type"]: e["details"] for e in found}
    assert by_type["connection_created"] == {"by": "ci"}
    assert by_type["configuration_changed"]["by"] == "ci"
    assert by_type["device_bound"] == {"by": "ci", "devEUI": DEV}
    assert by_type["flow_created"] == {"by": "ci", "flow": made["id"]}
    assert by_type["device_unbound"] == {"by": "token-1", "devEUI": DEV}
    assert by_type["replay_started"]["by"] == "token-1"
    if cancelled["state"] == "cancelled":
        assert by_type["replay_cancelled"] == {"by": "token-1", "replay": started["id"]}
    # No token anywhere: not in events, not in the logs.
    text = json.dumps(found) + "\n".join(daemon.output)
    for secret in SECRETS:
        assert secret not in text

    # The writer deletes; the log line says who, with the name only.
    assert (await writer("DELETE", f"/flows/{made['id']}"))[0] == 204
    assert (await writer("DELETE", f"/connections/{cid}"))[0] == 204
    (deleted,) = await daemon.wait_log(lambda e: e.get("event") == "Connection deleted")
    assert deleted["by"] == "ci"


@pytest.mark.slow
async def test_hostile_tokens_are_refused(
    callers: tuple[DaemonProcess, Caller, Caller, Caller],
) -> None:
    _, owner, _, _ = callers
    for headers in (
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic owner-secret-1"},
        {"Authorization": "Bearer OWNER-SECRET-1"},
        {"Authorization": "Bearer owner-secret-1x"},
        {"Authorization": "Bearer owner-secret-"},
        {"Authorization": "Bearer grafana"},  # a name is not a token
        {"Authorization": "Bearer token-1"},
        {"Authorization": "Bearer owner-secret-1 reader-secret-2"},
        {"Authorization": "Bearer \u00e9t\u00e9"},
    ):
        status, body = await owner("GET", "/whoami", headers=headers)
        assert status == 401, headers
        assert body["code"] == "unauthorized"
    # An unknown route or method under the prefix still wants a token first.
    assert (await owner("GET", "/nothing-here", headers={}))[0] == 401
    assert (await owner("GET", "/nothing-here"))[0] == 404
    assert (await owner("PATCH", "/connections"))[0] == 405


def test_every_bearer_route_has_a_least_role_and_documents_403() -> None:
    document = openapi_document()
    bearer_routes = [r for r in TABLE if r.auth is Auth.BEARER]
    assert bearer_routes
    for route in bearer_routes:
        operation = document["paths"][route.path][route.method.lower()]
        assert operation["x-iotflow-role"] == route.least_role.value
        documented = "403" in operation["responses"]
        assert documented is (route.least_role is not Role.READER), (route.method, route.path)
        if route.role is None:
            expected = Role.READER if route.method == "GET" else Role.WRITER
            assert route.least_role is expected
    roles = TABLE.roles()
    assert roles[("GET", f"{BASE}/whoami")] is Role.READER
    assert roles[("POST", f"{BASE}/connections")] is Role.WRITER
    assert roles[("POST", f"{BASE}/drivers/{{id}}/decode")] is Role.READER
    # Routes that authenticate on their own take no role.
    assert not any(path.startswith(f"{BASE}/ingest") for _, path in roles)


def test_roles_are_ordered() -> None:
    assert Role.OWNER.allows(Role.WRITER)
    assert Role.OWNER.allows(Role.READER)
    assert Role.WRITER.allows(Role.READER)
    assert not Role.WRITER.allows(Role.OWNER)
    assert not Role.READER.allows(Role.WRITER)


def _load(tmp_path: Path, tokens: str) -> Any:
    path = tmp_path / "iotflow.toml"
    path.write_text(f"[api]\ntokens = {tokens}\n")
    return load_settings(path, env={"B": "env-secret"}).config.api


def _problems(tmp_path: Path, tokens: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, tokens)
    return {p.path: p.message for p in info.value.problems}


def test_tokens_in_the_config(tmp_path: Path) -> None:
    api = _load(
        tmp_path, '["a-secret", {name = "grafana", token = "${B}", role = "reader"}, "${X:-}"]'
    )
    assert [(t.name, t.role, t.token.get_secret_value()) for t in api.tokens] == [
        ("token-1", Role.OWNER, "a-secret"),
        ("grafana", Role.READER, "env-secret"),
    ]
    # No role: an owner, as a bare string.
    (only,) = _load(tmp_path, '[{name = "ops", token = "t"}]').tokens
    assert only.role is Role.OWNER


@pytest.mark.parametrize(
    ("tokens", "path"),
    [
        ('[{name = "x", token = "a-secret", role = "admin"}]', "api.tokens.0.role"),
        ('[{name = "x y", token = "a-secret"}]', "api.tokens.0.name"),
        ('[{name = "x", token = "a-secret", extra = 1}]', "api.tokens.0.extra"),
        ('[{token = "a-secret"}]', "api.tokens.0.name"),
        ('[{name = "x"}]', "api.tokens.0.token"),
        ("[3]", "api.tokens.0"),
        ('[{name = "x", token = "a-secret"}, {name = "x", token = "b-secret"}]', "api.tokens"),
        ('["a-secret", {name = "token-1", token = "b-secret"}]', "api.tokens"),
        ('["a-secret", {name = "x", token = "a-secret", role = "reader"}]', "api.tokens"),
    ],
)
def test_bad_tokens_are_refused_by_path_without_the_secret(
    tmp_path: Path, tokens: str, path: str
) -> None:
    found = _problems(tmp_path, tokens)
    assert path in found, found
    for secret in ("a-secret", "b-secret"):
        assert secret not in json.dumps(found)
