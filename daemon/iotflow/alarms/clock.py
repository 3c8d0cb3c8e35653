"""Wall-clock time for the alarm evaluator, which tests may run faster."""

from __future__ import annotations

import asyncio
import os
import time

SPEED_VARIABLE = "IOTFLOW_TEST_CLOCK_SPEED"


class Clock:
    """Epoch seconds that advance `speed` times faster than real time, from now on.

    Only for tests of behaviour measured in hours (alarm windows): the daemon reads
    `IOTFLOW_TEST_CLOCK_SPEED` (default 1) and gives this clock to the alarm evaluator
    alone; deliveries and uplink validity always use real time.
    """

    def __init__(self, speed: float = 1.0) -> None:
        if speed <= 0:
            raise ValueError("the clock's speed must be positive")
        self.speed = speed
        self._origin = time.time()
        self._monotonic = time.monotonic()

    @classmethod
    def from_environment(cls) -> Clock:
        return cls(float(os.environ.get(SPEED_VARIABLE) or 1))

    def now(self) -> float:
        return self._origin + (time.monotonic() - self._monotonic) * self.speed

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds) / self.speed)
