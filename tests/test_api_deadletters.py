"""The dead-letter and replay routes in process (issue #14): answers, pagination and
hostile input against a real spool, without a daemon. End to end: test_e2e_deadletters.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from iotflow.api.control import CONTROL, ControlPlane
from iotflow.api.deadletters import recovery_routes
from iotflow.api.errors import error_middleware
from iotflow.config.model import DeadLetterSettings, JournalSettings
from iotflow.connectors import parse_connection
from iotflow.delivery.recovery import Recovery, route_of
from iotflow.errors import NotFoundError
from iotflow.routing import RoutingIndex
from iotflow.spool import DeadLetter, Delivery, Spool
from iotflow.telemetry.metrics import Metrics

BASE = "/iot-flow/v1"
DEV = "0018B20000000B20"


class Registry:
    async def get_connection(self, cid: str) -> Any:
        if cid != "c":
            raise NotFoundError(f"No connection {cid!r}.")
        return None


@dataclass
class Control:
    """The part of the ControlPlane these routes use."""

    recovery: Recovery | None
    registry: Registry


@dataclass
class Setup:
    client: TestClient[Any, Any]
    spool: Spool
    recovery: Recovery
    dispatched: list[Delivery]


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    spool = await Spool.open(tmp_path / "spool.db")
    connection = parse_connection(
        {
            "id": "c",
            "name": "c",
            "connectorId": "actility-http-iot",
            "configuration": {"destinationURL": "http://127.0.0.1:9/"},
        }
    )
    index = RoutingIndex([connection], {DEV: ["c"]})
    dispatched: list[Delivery] = []

    def record(connection_id: str, kind: str, data: dict[str, Any]) -> None:
        return None

    recovery = Recovery(
        spool=spool,
        dispatch=dispatched.extend,
        index=lambda: index,
        metrics=Metrics(),
        record=record,
        journal=JournalSettings(),
        letters=DeadLetterSettings(),
        window=lambda cid: 4,
    )
    await recovery.start(prune_every=3600)
    app = web.Application(middlewares=[error_middleware])
    app[CONTROL] = cast(ControlPlane, Control(recovery, Registry()))
    recovery_routes.add_to(app.router)
    client = TestClient(TestServer(app))
    await client.start_server()
    # Three letters: two failed, one expired, of two devices.
    for n, (dev, outcome) in enumerate(
        [(DEV, "failed"), ("0018B20000000B21", "failed"), (DEV, "expired")]
    ):
        (delivery,) = await spool.append(
            b'{"n": %d}' % n,
            dev_eui=dev,
            uplink_time=1000.0 + n,
            received_at=1000.0 + n,
            connection_ids=["c"],
            journal=route_of(frozenset(), None, None),
        )
        delivery.attempts = 1
        letter = DeadLetter(
            outcome, "refused", 400 if outcome == "failed" else None, "b", 2000.0 + n
        )
        spool.complete(delivery.id, final=delivery, outcome=outcome, letter=letter)
    await spool.flush()
    yield Setup(client, spool, recovery, dispatched)
    await client.close()
    await recovery.close()
    await spool.close()


async def call(setup: Setup, method: str, path: str, **kwargs: Any) -> tuple[int, Any, Any]:
    async with setup.client.request(method, BASE + path, **kwargs) as response:
        text = await response.text()
        body = await response.json() if text else None
        return response.status, body, response.headers


async def test_list_filters_pages_and_one(setup: Setup) -> None:
    status, page, headers = await call(setup, "GET", "/connections/c/deadLetters?perPage=2")
    assert status == 200
    assert (headers["X-Total"], headers["X-Total-Pages"], headers["X-Page"]) == ("3", "2", "1")
    assert [item["outcome"] for item in page] == ["expired", "failed"]  # newest first
    assert set(page[0]) == {
        "id",
        "devEUI",
        "uplinkTime",
        "outcome",
        "reason",
        "attempts",
        "firstAttemptTime",
        "lastAttemptTime",
        "time",
    }
    assert page[1]["status"] == 400
    status, page, headers = await call(
        setup, "GET", f"/connections/c/deadLetters?devEUI={DEV.lower()}&outcome=failed"
    )
    assert (status, headers["X-Total"], len(page)) == (200, "1", 1)
    status, one, _ = await call(setup, "GET", f"/connections/c/deadLetters/{page[0]['id']}")
    assert (status, one["document"]) == (200, {"n": 0})
    status, page, headers = await call(setup, "GET", "/connections/c/deadLetters?page=9")
    assert (status, page, headers["X-Page"]) == (200, [], "9")


@pytest.mark.parametrize(
    ("method", "path", "body", "expected"),
    [
        ("GET", "/connections/c/deadLetters?page=0", None, 400),
        ("GET", "/connections/c/deadLetters?perPage=101", None, 400),
        ("GET", "/connections/c/deadLetters?page=x", None, 400),
        ("GET", "/connections/c/deadLetters?outcome=delivered", None, 400),
        ("GET", "/connections/c/deadLetters?devEUI=12", None, 400),
        ("GET", "/connections/c/deadLetters?sort=id", None, 400),
        ("GET", "/connections/zz/deadLetters", None, 404),
        ("GET", "/connections/c/deadLetters/0", None, 404),
        ("GET", "/connections/c/deadLetters/1e3", None, 404),
        ("GET", "/connections/c/deadLetters/9223372036854775808", None, 404),
        ("POST", "/connections/c/deadLetters/resend", [], 400),
        ("POST", "/connections/c/deadLetters/resend", {"ids": []}, 202),
        ("POST", "/connections/c/deadLetters/resend", {"ids": [0]}, 422),
        ("POST", "/connections/c/deadLetters/resend", {"ids": [1.5]}, 422),
        ("POST", "/connections/c/deadLetters/resend", {"all": False}, 422),
        ("POST", "/connections/c/deadLetters/resend", {"all": True, "devEUI": "x"}, 422),
        ("POST", "/connections/c/deadLetters/resend", {"all": True, "extra": 1}, 422),
        ("POST", "/connections/c/replay", {"from": "2026-01-01", "to": "2026-01-02"}, 422),
        ("POST", "/connections/c/replay", {"from": 1, "to": 2}, 422),
        ("POST", "/connections/c/replay", {"from": "9999-99-99T00:00:00Z", "to": "x"}, 422),
        (
            "POST",
            "/connections/c/replay",
            {"from": "2026-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z", "devEUIs": "x"},
            422,
        ),
        ("GET", "/replays/x" * 40, None, 404),
        ("DELETE", "/replays/abc", None, 404),
    ],
)
async def test_hostile_input_is_a_clear_4xx(
    setup: Setup, method: str, path: str, body: Any, expected: int
) -> None:
    status, answer, _ = await call(setup, method, path, json=body)
    assert status == expected, answer
    if status >= 400:
        assert set(answer) == {"code", "message", "details"}
    status, _, headers = await call(setup, "GET", "/connections/c/deadLetters")
    assert headers["X-Total"] == "3"  # nothing changed
    assert setup.dispatched == []


async def test_resend_purge_and_a_replay_of_an_empty_window(setup: Setup) -> None:
    status, body, _ = await call(
        setup, "POST", "/connections/c/deadLetters/resend", json={"all": True, "outcome": "failed"}
    )
    assert (status, body) == (202, {"resent": 2})
    letters = [d.letter or 0 for d in setup.dispatched]
    assert letters == sorted(letters)  # oldest first
    status, _, _ = await call(setup, "DELETE", "/connections/c/deadLetters?outcome=expired")
    assert status == 204
    status, _, headers = await call(setup, "GET", "/connections/c/deadLetters")
    assert headers["X-Total"] == "2"  # the two being re-sent stay until delivered
    window = {"from": "2020-01-01T00:00:00+02:00", "to": "2020-01-02T00:00:00Z"}
    status, started, _ = await call(setup, "POST", "/connections/c/replay", json=window)
    assert (status, started["uplinks"]) == (202, 0)
    status, replay, _ = await call(setup, "GET", f"/replays/{started['id']}")
    assert status == 200
    assert replay["total"] == 0


async def test_a_spool_that_cannot_commit_is_a_503(setup: Setup) -> None:
    await setup.recovery.close()
    await setup.spool.close()
    status, answer, headers = await call(
        setup, "POST", "/connections/c/deadLetters/resend", json={"all": True}
    )
    assert (status, answer["code"], headers["Retry-After"]) == (503, "spool_unavailable", "10")
    status, answer, _ = await call(setup, "GET", "/connections/c/deadLetters")
    assert status == 503
