"""Fleets in the registry: instances and their statistics, the fleet's sums, and a rolling
upgrade (an instance of the previous version on a registry the new one migrated)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from iotflow import __version__
from iotflow.api.server import openapi_document
from iotflow.connectors.connection import parse_connection
from iotflow.errors import RegistryError
from iotflow.fleet import Fleet, default_api_url, sum_statistics
from iotflow.registry import AlarmState, Instance, Store
from iotflow.registry import db as registry_db
from iotflow.registry.db import Migration, load_migrations
from support.clouds import FakeCloud
from support.ports import free_port
from support.postgres import Postgres
from test_registry import Backend, postgres_backend

FLEET_STEP = 5  # the first migration written under the one-step compatibility rule


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        target = Backend("sqlite", f"sqlite:///{tmp_path}/registry.db")
        yield target
        for store in target.stores:
            await store.close()
        return
    postgres: Postgres = request.getfixturevalue("postgres")
    async with postgres_backend(postgres) as target:
        yield target


def connection(cid: str) -> Any:
    return parse_connection(
        {
            "id": cid,
            "name": cid,
            "connectorId": "actility-http-iot",
            "configuration": {"destinationURL": "https://example.com/up"},
        }
    )


def stats(delivered: int, **more: Any) -> dict[str, Any]:
    return {
        "received": delivered,
        "delivered": delivered,
        "retried": 0,
        "expired": 0,
        "failed": 0,
        "dropped": 0,
        "filtered": 0,
        "pending": 0,
        "lastError": None,
        "lastDeliveryTime": None,
        **more,
    }


# -- instances in the registry -------------------------------------------------------------


async def test_instances_publish_list_and_leave(backend: Backend) -> None:
    store = backend.open()
    await store.migrate()
    t0 = datetime(2026, 12, 1, tzinfo=UTC)
    a = Instance("a", "http://a:8080", "1.0", 5, t0, t0)
    b = Instance("b", None, "1.1", 6, t0, t0 + timedelta(seconds=1))
    await store.publish_instance(a, {"c1": stats(3), "c2": stats(1)})
    await store.publish_instance(b, {"c1": stats(4)})
    assert await store.list_instances() == [a, b]
    assert await store.instance_statistics() == {
        "c1": {"a": stats(3), "b": stats(4)},
        "c2": {"a": stats(1)},
    }
    # A heartbeat replaces the instance's row and all its statistics.
    a2 = Instance("a", "http://a:8080", "1.0", 5, t0, t0 + timedelta(seconds=5))
    await store.publish_instance(a2, {"c1": stats(7)})
    assert (await store.list_instances())[0] == a2
    assert await store.instance_statistics() == {"c1": {"a": stats(7), "b": stats(4)}}
    # Removal only when older than asked, then for good, with its statistics.
    assert not await store.remove_instance("a", seen_before=t0)
    assert await store.remove_instance("a", seen_before=t0 + timedelta(seconds=6))
    assert [i.id for i in await store.list_instances()] == ["b"]
    assert await store.instance_statistics() == {"c1": {"b": stats(4)}}
    assert not await store.remove_instance("a")


def test_the_fleet_sums_counters_and_keeps_the_newest_of_the_rest() -> None:
    total = sum_statistics(
        {
            "a": stats(3, lastDeliveryTime="2026-12-01T10:00:00.000+00:00", lastError="old"),
            "b": stats(4, pending=2, lastDeliveryTime="2026-12-01T11:00:00.000+00:00"),
            "c": stats(0, lastError="timeout"),
        }
    )
    assert total["delivered"] == 7
    assert total["pending"] == 2
    assert total["lastDeliveryTime"] == "2026-12-01T11:00:00.000+00:00"
    assert total["lastError"] == "old"  # of the instance that delivered (or tried) last
    assert sum_statistics({}) == stats(0)


def test_a_wildcard_listen_address_is_advertised_by_host_name() -> None:
    assert default_api_url("127.0.0.1", 8080) == "http://127.0.0.1:8080"
    assert default_api_url("::1", 8080) == "http://[::1]:8080"
    assert not default_api_url("0.0.0.0", 8080).startswith("http://0.0.0.0")


@pytest.fixture
async def pg_backend(postgres: Postgres) -> AsyncIterator[Backend]:
    """A fleet shares a PostgreSQL registry."""
    async with postgres_backend(postgres) as target:
        yield target


async def test_a_fleet_sees_live_peers_and_sums_their_statistics(pg_backend: Backend) -> None:
    store = pg_backend.open()
    await store.migrate()
    await store.create_connection(connection("c1"))
    mine = {"c1": stats(2)}
    fleet = Fleet(
        store,
        instance_id="me",
        api_url="http://me:1",
        schema_version=5,
        shared=True,
        heartbeat=0.2,
        statistics=lambda: mine,
    )
    await fleet.start()
    now = datetime.now(UTC)
    await store.publish_instance(
        Instance("peer", "http://p:1", "0.9", 5, now, now), {"c1": stats(5)}
    )
    old = now - timedelta(seconds=10)
    await store.publish_instance(
        Instance("gone", "http://g:1", "0.9", 5, old, old), {"c1": stats(9)}
    )
    try:
        listed = await fleet.instances()
        assert [i.id for i in listed] == ["gone", "me", "peer"]
        assert [fleet.alive(i) for i in listed] == [False, True, True]
        assert [p.id for p in await fleet.peers()] == ["peer"]
        # A dead instance's share is left out; this instance's is live, not as published.
        mine["c1"] = stats(3)
        assert await fleet.statistics() == {"c1": {"me": stats(3), "peer": stats(5)}}
        me = next(i for i in await store.list_instances() if i.id == "me")
        assert me.version == __version__
    finally:
        await fleet.close()
    assert "me" not in [i.id for i in await store.list_instances()]


async def test_alone_nothing_is_published(backend: Backend) -> None:
    store = backend.open()
    await store.migrate()
    fleet = Fleet(
        store,
        instance_id="me",
        api_url=None,
        schema_version=5,
        shared=False,
        heartbeat=0.2,
        statistics=lambda: {"c1": stats(1)},
    )
    await fleet.start()
    assert [i.id for i in await fleet.instances()] == ["me"]
    assert await fleet.statistics() == {"c1": {"me": stats(1)}}
    assert await fleet.peers() == []
    await fleet.close()
    assert await store.list_instances() == []


# -- rolling upgrades ----------------------------------------------------------------------

_ADDITIVE = re.compile(
    r"^(CREATE TABLE|CREATE INDEX|CREATE UNIQUE INDEX|ALTER TABLE \w+ ADD COLUMN)\b", re.I
)


def test_migrations_of_the_fleet_era_only_add() -> None:
    """From 0005 on, a migration keeps the previous version working on what it makes: it
    says so (`-- compatible-with: N-1`) and only creates tables and indexes or adds columns
    that can be left out (null or with a default). Renames and drops wait for the next step."""
    for dialect in ("sqlite", "postgresql"):
        for migration in load_migrations(dialect):
            if migration.version < FLEET_STEP:
                assert migration.oldest_reader == migration.version
                continue
            assert migration.oldest_reader == migration.version - 1, migration.name
            for statement in migration.statements():
                code = "\n".join(
                    line for line in statement.splitlines() if not line.strip().startswith("--")
                ).strip()
                assert _ADDITIVE.match(code), f"{migration.name}: not additive: {code[:80]}"
                if code.upper().startswith("ALTER TABLE"):
                    assert "NOT NULL" not in code.upper() or "DEFAULT" in code.upper(), code


def previous_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """This code as the previous version: it knows every migration but the newest."""
    current = registry_db.load_migrations

    def known(dialect: registry_db.Dialect) -> list[Migration]:
        return current(dialect)[:-1]

    monkeypatch.setattr("iotflow.registry.sql.load_migrations", known)


async def test_the_previous_version_works_on_a_registry_the_new_one_migrated(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    latest = len(load_migrations("sqlite"))
    new = backend.open()
    assert await new.migrate() == latest
    await new.create_connection(connection("c1"))
    previous_version(monkeypatch)
    old: Store = backend.open()
    with capture_logs() as logs:
        assert await old.migrate() == latest - 1
    (warning,) = [e for e in logs if e["event"].startswith("Registry schema is newer")]
    assert (warning["schema_version"], warning["known"]) == (latest, latest - 1)
    # Everything the previous version does goes on: connections, bindings, events, alarms.
    await old.create_connection(connection("c2"))
    await old.set_device("0018B20000000B01", ["c1", "c2"])
    assert await new.bindings() == {"0018B20000000B01": ["c1", "c2"]}
    await old.add_event("c2", "connection_created", {"by": "api"})
    assert (await new.list_events("c2"))[1] == 1
    since = datetime(2026, 12, 1, tzinfo=UTC)
    assert await old.set_alarm_state(
        AlarmState("c2", 0, "fp", True, since, 1.0), expect_active=False
    )
    await old.add_uplink_counts({("c1", 100): 2})
    assert await new.uplink_count("c1", 100, 100) == 2
    # And the new version's own tables are untouched by it.
    assert await new.list_instances() == []


async def test_a_newer_schema_is_used_only_when_it_says_so(backend: Backend) -> None:
    store = backend.open()
    await store.migrate()
    latest = len(load_migrations("sqlite"))
    # A future migration that says the previous version no longer works on it.
    await backend.raw(
        "INSERT INTO schema_migrations (version, name, applied_at)"
        f" VALUES ({latest + 1}, 'future', '2030-01-01T00:00:00+00:00')"
    )
    await backend.raw(
        "INSERT INTO schema_compatibility (version, oldest_reader)"
        f" VALUES ({latest + 1}, {latest + 1})"
    )
    with pytest.raises(RegistryError, match="newer"):
        await backend.open().migrate()
    await backend.raw(
        f"UPDATE schema_compatibility SET oldest_reader = {latest} WHERE version = {latest + 1}"
    )
    assert await backend.open().migrate() == latest


# -- asking peers ----------------------------------------------------------------------------


async def test_a_peer_is_asked_with_the_callers_token_and_one_that_is_down_says_so(
    pg_backend: Backend, cloud: FakeCloud
) -> None:
    store = pg_backend.open()
    await store.migrate()
    fleet = Fleet(
        store,
        instance_id="me",
        api_url="http://me:1",
        schema_version=5,
        shared=True,
        heartbeat=5,
        statistics=dict,
    )
    now = datetime.now(UTC)
    up = Instance("up", cloud.url("/").rstrip("/"), "0.1", 5, now, now)
    down = Instance("down", f"http://127.0.0.1:{free_port()}", "0.1", 5, now, now)
    for peer in (up, down):
        await store.publish_instance(peer, {})
    cloud.respond(200, body=[{"id": 1}], headers={"X-Total": "7"})
    try:
        with capture_logs() as logs:
            answers = {a.instance: a for a in await fleet.ask_all("GET", "/x?a=1", token="s3cret")}
    finally:
        await fleet.close()
    assert answers["up"].status == 200
    assert answers["up"].body == [{"id": 1}]
    assert answers["up"].total == 7
    (request,) = cloud.requests_to("/x")
    assert request.headers["Authorization"] == "Bearer s3cret"
    assert request.headers["X-Iotflow-Fleet"] == "local"  # answered there, not fanned out
    assert answers["down"].status is None
    assert answers["down"].error
    (warning,) = [e for e in logs if e["event"] == "Peer did not answer"]
    assert warning["instance"] == "down"
    assert "s3cret" not in repr(logs)


def test_the_document_describes_the_fleet_routes() -> None:
    paths = openapi_document()["paths"]
    listed = paths["/iot-flow/v1/instances"]["get"]
    assert listed["responses"]["200"]
    letters = paths["/iot-flow/v1/connections/{id}/deadLetters"]["get"]
    assert "instance" in [p["name"] for p in letters["parameters"]]
    assert "502" in letters["responses"]
    replay = paths["/iot-flow/v1/replays/{id}"]["get"]
    assert "instance" in [p["name"] for p in replay["parameters"]]
