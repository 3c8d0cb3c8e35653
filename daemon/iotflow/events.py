"""The connection event log, written in the background so that delivery never waits on it."""

from __future__ import annotations

import asyncio
from typing import Any

from iotflow.registry import Store
from iotflow.telemetry.logging import get_logger

log = get_logger("iotflow.events")


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
            connection_id, kind, data = await self._queue.get()
            try:
                await self._store.add_event(connection_id, kind, data)
            except Exception as exc:
                log.warning(
                    "Event not recorded", connection=connection_id, kind=kind, error=str(exc)
                )
            finally:
                self._queue.task_done()

    async def close(self, grace: float = 5.0) -> None:
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), grace)
        except TimeoutError:
            log.warning("Event log closed with events unwritten", count=self._queue.qsize())
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
