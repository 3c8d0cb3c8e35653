"""Publish pacing, for clouds that throttle a client going faster than a rate."""

from __future__ import annotations

import asyncio
import math


class Pacer:
    """At most `rate` publishes a second, spaced evenly: a token bucket one token deep.

    Each publish waits until `1/rate` seconds after the previous one went, in call order
    (asyncio.Lock is first come, first served). Spacing is measured from when the previous
    publish actually went, not from a schedule, so a stalled event loop is not followed by
    a burst of overdue publishes: no second ever sees more than `rate` of them.
    """

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self._lock = asyncio.Lock()
        self._last = -math.inf  # loop time of the previous publish

    async def wait(self) -> None:
        async with self._lock:
            loop = asyncio.get_running_loop()
            delay = self._last + self.interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self._last = loop.time()
