"""Wall-clock time for the alarm evaluator, which tests may run faster."""

from __future__ import annotations

import asyncio
import os
import time

SPEED_VARIABLE = "IOTFLOW_TEST_CLOCK_SPEED"
# The epoch second at which the accelerated clock reads real time: instances of one fleet
# under test share it, so that they agree on the minute (default: the process's start).
ORIGIN_VARIABLE = "IOTFLOW_TEST_CLOCK_ORIGIN"


class Clock:
    """Epoch seconds that advance `speed` times faster than real time, from now on.

    Only for tests of behaviour measured in hours (alarm windows): the daemon reads
    `IOTFLOW_TEST_CLOCK_SPEED` (default 1) and gives this clock to the alarm evaluator
    alone; deliveries and uplink validity always use real time.
    """

    def __init__(self, speed: float = 1.0, origin: float | None = None) -> None:
        if speed <= 0:
            raise ValueError("the clock's speed must be positive")
        self.speed = speed
        now = time.time()
        # Virtual time at this process's start: `origin` plus the real time since, sped up.
        self._origin = now if origin is None else origin + (now - origin) * speed
        self._monotonic = time.monotonic()

    @classmethod
    def from_environment(cls) -> Clock:
        origin = os.environ.get(ORIGIN_VARIABLE)
        return cls(float(os.environ.get(SPEED_VARIABLE) or 1), float(origin) if origin else None)

    def now(self) -> float:
        return self._origin + (time.monotonic() - self._monotonic) * self.speed

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds) / self.speed)
