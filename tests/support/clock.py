"""Time a test controls: `ManualClock` for the delivery worker's `clock=` and `sleep=`, and
`SteppedSleep` for a retry or ping loop's `sleep=` that the test steps one wait at a time."""

from __future__ import annotations

import asyncio
import time


class ManualClock:
    """Epoch seconds that advance only when the code under test sleeps through `sleep`.

    A retry that waits a minute (a cloud's `Retry-After`, a slow credentials retry) then
    takes no real time, and the test reads every wait asked for in `sleeps`.
    """

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)  # still a point where other tasks run, as a real sleep is


class SteppedSleep:
    """A `sleep=` that returns only when the test lets it: a retry loop then waits exactly
    as often as the test steps it, and `waits` holds every wait it asked for.

    `await until(n)` returns once the code under test is in its n-th sleep (counting from
    1); `step()` ends the current one.
    """

    def __init__(self) -> None:
        self.waits: list[float] = []
        self._changed = asyncio.Condition()
        self._released = 0

    async def __call__(self, seconds: float) -> None:
        async with self._changed:
            self.waits.append(seconds)
            number = len(self.waits)
            self._changed.notify_all()
            await self._changed.wait_for(lambda: self._released >= number)

    async def until(self, count: int, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.waits) >= count)

    async def step(self) -> None:
        async with self._changed:
            self._released += 1
            self._changed.notify_all()
