"""A clock a test moves by hand: the delivery worker's `clock=` and `sleep=`."""

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
