"""The connection event log, written in the background so that delivery never waits on it."""

from __future__ import annotations

import asyncio
from typing import Any

from iotflow.registry import Store
from iotflow.telemetry.logging import get_logger

log = get_logger("iotflow.events")

_BATCH = 500  # events written in one transaction at most


class EventLog:
    """Queues events and writes them to the registry; a flood is bounded, and said so."""

    def __init__(self, store: Store, *, capacity: int = 10_000) -> None:
        self._store = store
        self._queue: asyncio.Queue[tuple[str, str, dict[str, Any]]] = asyncio.Queue(capacity)
        self._task: asyncio.Task[None] | None = None
        self.lost = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="events")

    def __call__(self, connection_id: str, kind: str, data: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait((connection_id, kind, data))
        except asyncio.QueueFull:
            self.lost += 1
            if self.lost == 1 or self.lost % 1000 == 0:
                log.warning("Event log overflowing; events lost", lost=self.lost)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < _BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._write(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _write(self, batch: list[tuple[str, str, dict[str, Any]]]) -> None:
        """What is queued, in one transaction: 1,000 connections starting queue 2,000
        events, which were 2,000 transactions of four statements each on the registry's
        one connection, beside the start's own reads (issue #16)."""
        if len(batch) > 1:
            try:
                await self._store.add_events(batch)
            except Exception:
                pass  # refused whole (a connection deleted meanwhile): each alone, below
            else:
                return
        # One at a time: a refused event is said, and the others are kept.
        for connection_id, kind, data in batch:
            try:
                await self._store.add_event(connection_id, kind, data)
            except Exception as exc:
                log.warning(
                    "Event not recorded", connection=connection_id, kind=kind, error=str(exc)
                )

    async def close(self, grace: float = 5.0) -> None:
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), grace)
        except TimeoutError:
            log.warning("Event log closed with events unwritten", count=self._queue.qsize())
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
