"""Ingest first: whether taking uplinks in is falling behind, for the workers to give way.

A connection whose cloud was down for an hour has millions of deliveries in the spool. When
the cloud is back, its worker sends them as fast as the cloud answers, and with a local
cloud that is as fast as the event loop goes: the source then got what was left, new
uplinks waited minutes unacknowledged at the broker (past a broker's own queue limit they
would be lost), and the other connections' latency went with them (issue #16,
`tests/bench/bench_backlog.py`). What is in the spool is safe; what is at the broker is not
yet. So a worker catching up on a backlog read back from the spool holds each send while
the source has 50 uplinks (or half its in-flight bound) taken and not acknowledged, for at
most `HOLD_SECONDS`: the drain slows to a trickle, never stops (a spool that cannot commit
keeps the source's count high, and a drain is what frees its disk). Only a backlog larger
than the worker's memory is held (its lane "spilled"); live deliveries never are.
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["HOLD_SECONDS", "IngestPressure"]

HOLD_SECONDS = 1.0  # a held send waits at most this long, then goes


class IngestPressure:
    """Set by the source (`high` while it falls behind), read by the workers."""

    def __init__(self) -> None:
        self._relieved = asyncio.Event()
        self._relieved.set()

    @property
    def high(self) -> bool:
        return not self._relieved.is_set()

    def set(self, high: bool) -> None:
        if high:
            self._relieved.clear()
        else:
            self._relieved.set()

    async def give_way(self, within: float | None = None) -> None:
        """Wait while the pressure is high, for at most `within` (HOLD_SECONDS) seconds."""
        if self._relieved.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(HOLD_SECONDS if within is None else within):
                await self._relieved.wait()
