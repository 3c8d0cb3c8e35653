"""One backoff policy for everything that waits before trying again.

Exponential growth from `initial` by `factor` up to `cap`, with jitter so that many
clients that failed together do not come back together (AWS Architecture Blog,
"Exponential Backoff And Jitter"): `full` waits uniformly in [0, ceiling], `equal` in
[ceiling / 2, ceiling] (for loops that must not retry at once), `none` exactly the ceiling
(for a spacing that tests or an operator must be able to predict).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

Jitter = Literal["full", "equal", "none"]


def ceiling(initial: float, cap: float, attempt: int, factor: float = 2.0) -> float:
    """The un-jittered wait before retry number `attempt` (1 for the first retry)."""
    if attempt <= 1:
        return min(initial, cap)
    # Capped before the power can overflow: 2 ** 2000 is past float's range.
    exponent = min(attempt - 1, 1000)
    try:
        grown = initial * factor**exponent
    except OverflowError:
        return cap
    return min(grown, cap)


def jittered(value: float, jitter: Jitter, rng: random.Random | None = None) -> float:
    uniform = (rng or random).uniform
    if jitter == "full":
        return uniform(0.0, value)
    if jitter == "equal":
        return uniform(value / 2, value)
    return value


@dataclass(slots=True)
class Backoff:
    """The state of one retry loop: `next()` gives the wait before the next try and grows
    the ceiling; `reset()` after a success starts again from `initial`."""

    initial: float
    cap: float
    factor: float = 2.0
    jitter: Jitter = "full"
    rng: random.Random | None = None
    attempt: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.initial < 0 or self.cap < self.initial or self.factor < 1:
            raise ValueError("backoff needs 0 <= initial <= cap and factor >= 1")

    @property
    def current(self) -> float:
        """The ceiling the next wait is drawn under."""
        return ceiling(self.initial, self.cap, self.attempt + 1, self.factor)

    def next(self) -> float:
        wait = jittered(self.current, self.jitter, self.rng)
        self.attempt += 1
        return wait

    def reset(self) -> None:
        self.attempt = 0
