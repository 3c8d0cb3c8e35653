"""The circuit of one connection: after repeated failures, only probe deliveries go out."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable

from iotflow.backoff import Backoff, jittered


class Expired(Exception):
    """The delivery's validity ran out while it waited."""


class Circuit:
    """Closed-for-business after `threshold` consecutive failures (state CLOSED).

    While open, one probe at a time is let through, spaced by an exponential backoff with
    full jitter capped by the connection's reconnectStrategy; the first success closes it.
    """

    def __init__(
        self,
        *,
        threshold: int,
        initial: float,
        cap: float,
        clock: Callable[[], float],
        on_change: Callable[[bool], None],
        rng: random.Random | None = None,
    ) -> None:
        self.threshold = threshold
        # Its `attempt` counts the failed probes since the circuit opened: each one doubles
        # the ceiling that the next probe's time is drawn under (full jitter).
        self._backoff = Backoff(initial, max(initial, cap), jitter="full", rng=rng)
        self._clock = clock
        self._on_change = on_change
        self._failures = 0
        self.healthy = True
        self._next_probe = 0.0
        self._probing = False
        self._changed = asyncio.Condition()

    async def acquire(self, deadline: float) -> bool:
        """Wait for the right to send; True when the caller is the probe. Raises Expired."""
        if self.healthy:
            return False  # the common case, without the condition's lock (issue #16)
        async with self._changed:
            while True:
                if self.healthy:
                    return False
                now = self._clock()
                if not self._probing and now >= self._next_probe:
                    self._probing = True
                    return True
                if now >= deadline:
                    raise Expired
                until = deadline if self._probing else min(deadline, self._next_probe)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=max(0.0, until - now))

    @property
    def quiet(self) -> bool:
        """Healthy, with no failure counted: a success that is not a probe changes nothing."""
        return self.healthy and self._failures == 0

    async def success(self, probe: bool) -> None:
        if not probe and self.quiet:
            return  # nothing changes, and nobody waits on a healthy circuit
        async with self._changed:
            self._failures = 0
            if probe:
                self._probing = False
            if not self.healthy:
                self.healthy = True
                self._backoff.reset()
                self._on_change(True)
            self._changed.notify_all()

    async def failure(self, probe: bool) -> None:
        async with self._changed:
            self._failures += 1
            if probe:
                self._probing = False
                self._backoff.attempt += 1
            if self.healthy and self._failures >= self.threshold:
                self.healthy = False
                self._backoff.reset()
                self._on_change(False)
            if not self.healthy:
                # Any failure while open (a probe, or a send that was on the wire when it
                # opened) puts the next probe off, under the ceiling reached so far.
                wait = jittered(self._backoff.current, "full", self._backoff.rng)
                self._next_probe = self._clock() + wait
            self._changed.notify_all()

    async def release(self, probe: bool) -> None:
        """A probe that ended without an answer (expired, cancelled) frees its slot."""
        if probe:
            async with self._changed:
                self._probing = False
                self._changed.notify_all()
