"""Live first: a backlog read back from the spool gives way while live uplinks would wait.

A connection whose cloud was down for an hour has millions of deliveries in the spool. When
the cloud is back, its worker sends them as fast as the cloud answers, and with a local
cloud that is as fast as the event loop goes. Two things then wait behind the drain (issue
#16, `tests/bench/bench_backlog.py`):

- **ingest**: new uplinks waited minutes unacknowledged at the broker (past a broker's own
  queue limit they would be lost). What is in the spool is safe; what is at the broker is
  not yet. The source says when it falls behind: 50 uplinks (or half its in-flight bound)
  taken and not acknowledged.
- **the other connections' deliveries**: each live uplink takes a handful of turns of the
  event loop (read, commit, acknowledge, send, answer), and a loop kept busy by a drain
  makes each turn late: live latency went from 5 to 50 ms at its median. So the loop's
  lateness is watched while a drain runs: a timer due every `TICK` seconds that runs more
  than `LAG_LIMIT` late, while the loop's thread was on the CPU for at least `BUSY_SHARE`
  of the time, says the loop is saturated by our own work. (Late while off the CPU is a
  machine short of cores: holding the drain would not give the loop its turns back.)

While either holds, a worker catching up on a backlog holds each send, for at most
`HOLD_SECONDS`: the drain slows down to what leaves the loop on time, and never stops (a
spool that cannot commit keeps the source's count high, and a drain is what frees its
disk). Only a backlog larger than the worker's memory is held (its lane "spilled"); live
deliveries never are. The timer runs only while a drain asks, so an idle daemon on a
gateway is not woken by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

__all__ = ["BUSY_SHARE", "HOLD_SECONDS", "LAG_LIMIT", "TICK", "IngestPressure"]

HOLD_SECONDS = 1.0  # a held send waits at most this long, then goes
TICK = 0.01  # the loop's lateness is sampled this often while a drain runs
LAG_LIMIT = 0.004  # a tick this late: the loop is saturated, a drain gives way
BUSY_SHARE = 0.5  # ... if the loop's thread ran at least this share of the time
IDLE_SECONDS = 1.0  # no drain asked for this long: the watch stops


class IngestPressure:
    """Set by the source (`high` while it falls behind) and by the loop watch; read by the
    workers draining a backlog."""

    def __init__(self) -> None:
        self._relieved = asyncio.Event()
        self._relieved.set()
        self._ingest_behind = False
        self._loop_late = False
        self._tick: asyncio.TimerHandle | None = None
        self._asked = 0.0  # loop time a drain last asked
        self._sampled = 0.0  # loop time and the loop thread's CPU time at the last sample
        self._cpu = 0.0

    @property
    def high(self) -> bool:
        return not self._relieved.is_set()

    @property
    def watching(self) -> bool:
        return self._tick is not None

    def set(self, high: bool) -> None:
        """The source: taking uplinks in falls behind (True), or keeps up again."""
        self._ingest_behind = high
        self._update()

    def _update(self) -> None:
        if self._ingest_behind or self._loop_late:
            self._relieved.clear()
        else:
            self._relieved.set()

    async def give_way(self, within: float | None = None) -> None:
        """For a send of a drain: wait while the pressure is high, for at most `within`
        (HOLD_SECONDS) seconds."""
        loop = asyncio.get_running_loop()
        self._asked = now = loop.time()
        if self._tick is None:
            self._sampled, self._cpu = now, time.thread_time()
            self._tick = loop.call_at(now + TICK, self._sample, loop, now + TICK)
        if self._relieved.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(HOLD_SECONDS if within is None else within):
                await self._relieved.wait()

    def _sample(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        now, cpu = loop.time(), time.thread_time()
        busy = cpu - self._cpu >= BUSY_SHARE * (now - self._sampled)
        self._sampled, self._cpu = now, cpu
        if now - self._asked > IDLE_SECONDS:
            self._tick, self._loop_late = None, False
        else:
            self._loop_late = busy and now - due > LAG_LIMIT
            self._tick = loop.call_at(now + TICK, self._sample, loop, now + TICK)
        self._update()

    def close(self) -> None:
        """Stop the watch (the daemon stops)."""
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
