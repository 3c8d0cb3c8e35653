"""This daemon as one instance of a fleet: several daemons sharing one PostgreSQL registry
(docs/scale-out.md).

Each instance publishes a heartbeat to the registry every `[registry] heartbeat` (its id, the
URL of its API, its version) with the statistics of its connection workers, and forgets
itself when it stops. Any instance then answers for the fleet: the instances it sees, each
connection's statistics summed over the live instances with a per-instance breakdown, and
what lives on one instance only (dead letters, replays) by asking its peers' APIs.

A SQLite registry is one instance by definition: nothing is published, nothing is asked,
and the answers are this instance's own (`shared` is False).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson

from iotflow import __version__
from iotflow.errors import RegistryError
from iotflow.registry import Instance, Store
from iotflow.telemetry.logging import get_logger

__all__ = ["ALIVE_BEATS", "Fleet", "PeerAnswer", "sum_statistics"]

log = get_logger("iotflow.fleet")

ALIVE_BEATS = 3  # heartbeats missed before an instance is shown as not alive
FORGET_AFTER = timedelta(days=1)  # an instance silent this long is removed (crashed for good)
PEER_TIMEOUT = 5.0  # seconds for a peer's API to answer

# Counters that add up over instances; the other fields are the newest of them.
_COUNTERS = (
    "received",
    "delivered",
    "retried",
    "expired",
    "failed",
    "dropped",
    "filtered",
    "pending",
)

Statistics = Callable[[], Mapping[str, Mapping[str, Any]]]


@dataclass(frozen=True, slots=True)
class PeerAnswer:
    """What one peer answered (`status` and `body`), or why it did not (`error`)."""

    instance: str
    status: int | None
    body: Any = None
    error: str | None = None
    total: int | None = None  # a page's X-Total header, when it has one


def default_api_url(listen_host: str, port: int) -> str:
    """The URL peers use when `[api] url` is not set: a wildcard address is no address to
    reach, the host name is."""
    host = listen_host
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def sum_statistics(documents: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The fleet's statistics of one connection from each instance's (by instance id):
    counters summed, the newest delivery time, and the last error of the instance that
    delivered (or tried) most recently."""
    total: dict[str, Any] = dict.fromkeys(_COUNTERS, 0)
    total["lastError"] = None
    total["lastDeliveryTime"] = None
    newest = ""
    for document in documents.values():
        for key in _COUNTERS:
            total[key] += int(document.get(key) or 0)
        when = document.get("lastDeliveryTime") or ""
        if total["lastError"] is None or when >= newest:
            total["lastError"] = document.get("lastError") or total["lastError"]
        if when > newest:  # ISO times of one format sort as they happened
            newest = when
            total["lastDeliveryTime"] = when
    return total


class Fleet:
    """This instance and, with a shared (PostgreSQL) registry, the others."""

    def __init__(
        self,
        store: Store,
        *,
        instance_id: str,
        api_url: str | None,
        schema_version: int,
        shared: bool,
        heartbeat: float,
        statistics: Statistics,
    ) -> None:
        self._store = store
        self.shared = shared
        self.heartbeat = heartbeat
        self._statistics = statistics
        now = datetime.now(UTC)
        self.me = Instance(instance_id, api_url, __version__, schema_version, now, now)
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def id(self) -> str:
        return self.me.id

    async def start(self) -> None:
        """Publish a first heartbeat (the fleet sees us at once), then one every interval."""
        if not self.shared:
            return
        await self._publish()
        self._task = asyncio.create_task(self._beat(), name="fleet-heartbeat")
        log.info("Joined the fleet", instance=self.id, api_url=self.me.api_url)

    async def close(self) -> None:
        """Stop beating and leave the fleet: a stopped instance is not a missing one."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
            with contextlib.suppress(RegistryError):
                await self._store.remove_instance(self.id)
            log.info("Left the fleet", instance=self.id)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            try:
                await self._publish()
                await self._forget_the_long_gone()
            except RegistryError as exc:
                # The registry is down: readiness says so; beat again when it is back.
                log.warning("Fleet heartbeat failed", error=str(exc))

    async def _publish(self) -> None:
        self.me = replace(self.me, seen_at=datetime.now(UTC))
        await self._store.publish_instance(self.me, self._statistics())

    async def _forget_the_long_gone(self) -> None:
        limit = datetime.now(UTC) - FORGET_AFTER
        for instance in await self._store.list_instances():
            gone = instance.seen_at < limit and instance.id != self.id
            if gone and await self._store.remove_instance(instance.id, seen_before=limit):
                log.info("Forgot an instance gone for long", instance=instance.id)

    # -- what the API asks

    def alive(self, instance: Instance) -> bool:
        if instance.id == self.id:
            return True
        age = (datetime.now(UTC) - instance.seen_at).total_seconds()
        return age <= ALIVE_BEATS * self.heartbeat

    async def instances(self) -> list[Instance]:
        """Every instance the registry knows, this one as of now; only this one alone."""
        me = replace(self.me, seen_at=datetime.now(UTC))
        if not self.shared:
            return [me]
        others = [i for i in await self._store.list_instances() if i.id != self.id]
        return sorted([me, *others], key=lambda i: i.id)

    async def statistics(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Per connection id, the statistics of each live instance (this one's live)."""
        own = {cid: dict(doc) for cid, doc in self._statistics().items()}
        if not self.shared:
            return {cid: {self.id: doc} for cid, doc in own.items()}
        alive = {i.id for i in await self.instances() if self.alive(i)}
        published = await self._store.instance_statistics()
        result: dict[str, dict[str, dict[str, Any]]] = {}
        for cid, by_instance in published.items():
            for instance_id, document in by_instance.items():
                if instance_id in alive and instance_id != self.id:
                    result.setdefault(cid, {})[instance_id] = document
        for cid, document in own.items():
            result.setdefault(cid, {})[self.id] = document
        return result

    async def peers(self) -> list[Instance]:
        """The other live instances that can be reached through their API."""
        return [
            i for i in await self.instances() if i.id != self.id and i.api_url and self.alive(i)
        ]

    async def ask(
        self,
        instance: Instance,
        method: str,
        path: str,
        *,
        token: str | None,
        json: Any = None,
    ) -> PeerAnswer:
        """Call a peer's API with the caller's bearer token (never logged). A peer that does
        not answer is an answer too: the caller says which part of the fleet is missing."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PEER_TIMEOUT))
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        headers["X-Iotflow-Fleet"] = "local"  # the peer answers for itself, no fan-out again
        started = time.monotonic()
        try:
            async with self._session.request(
                method, f"{instance.api_url}{path}", headers=headers, json=json
            ) as response:
                raw = await response.read()
                body = orjson.loads(raw) if raw else None
                total = response.headers.get("X-Total")
                count = int(total) if total is not None and total.isdigit() else None
                return PeerAnswer(instance.id, response.status, body, total=count)
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            log.warning(
                "Peer did not answer",
                instance=instance.id,
                path=path,
                error=str(exc) or type(exc).__name__,
                seconds=round(time.monotonic() - started, 3),
            )
            return PeerAnswer(instance.id, None, error=str(exc) or type(exc).__name__)

    async def ask_all(
        self, method: str, path: str, *, token: str | None, json: Any = None
    ) -> list[PeerAnswer]:
        """`ask` every peer at once."""
        peers = await self.peers()
        return list(
            await asyncio.gather(
                *(self.ask(p, method, path, token=token, json=json) for p in peers)
            )
        )
