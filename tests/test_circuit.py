"""The circuit of one connection on a clock the test moves: when it opens, how its probes
are spaced (the one backoff policy: full jitter, doubling, capped by reconnectStrategy),
one probe at a time, and what closes it again.

Every wait here is decided without real time: `acquire` returns or raises at once when the
clock says a probe is due or the deadline has passed.
"""

from __future__ import annotations

import random

import pytest

from iotflow.delivery.circuit import Circuit, Expired
from support.clock import ManualClock

START = 1_700_000_000.0


class Ceiling(random.Random):
    """Full jitter at its upper bound: each probe is put off by exactly the ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


def make(
    clock: ManualClock,
    changes: list[bool],
    *,
    threshold: int = 3,
    initial: float = 1.0,
    cap: float = 5.0,
    rng: random.Random | None = None,
) -> Circuit:
    return Circuit(
        threshold=threshold,
        initial=initial,
        cap=cap,
        clock=clock.time,
        on_change=changes.append,
        rng=rng or Ceiling(),
    )


async def probe_due_in(circuit: Circuit, clock: ManualClock, seconds: float) -> None:
    """The next probe goes out exactly `seconds` from now: not a moment before."""
    due = clock.now + seconds
    clock.now = due - 1e-3
    with pytest.raises(Expired):
        await circuit.acquire(deadline=clock.now)  # not due yet, and no time left to wait
    clock.now = due
    assert await circuit.acquire(deadline=due + 3600) is True  # the probe


async def test_opens_after_threshold_consecutive_failures() -> None:
    clock, changes = ManualClock(START), list[bool]()
    circuit = make(clock, changes)
    await circuit.failure(probe=False)
    await circuit.failure(probe=False)
    await circuit.success(probe=False)  # a success in between starts the count again
    await circuit.failure(probe=False)
    await circuit.failure(probe=False)
    assert circuit.healthy
    assert await circuit.acquire(deadline=START + 60) is False  # sends go out as usual
    await circuit.failure(probe=False)
    assert not circuit.healthy
    assert changes == [False]


async def test_probes_back_off_doubling_up_to_the_cap_and_a_success_closes_it() -> None:
    clock, changes = ManualClock(START), list[bool]()
    circuit = make(clock, changes, threshold=1, initial=1.0, cap=5.0)
    await circuit.failure(probe=False)  # opens: the first probe within `initial`
    await probe_due_in(circuit, clock, 1.0)
    for ceiling in (2.0, 4.0, 5.0, 5.0):
        await circuit.failure(probe=True)
        await probe_due_in(circuit, clock, ceiling)
    await circuit.success(probe=True)
    assert circuit.healthy
    assert changes == [False, True]
    assert await circuit.acquire(deadline=clock.now + 60) is False
    # Opened again: the spacing starts over from `initial`.
    await circuit.failure(probe=False)
    await probe_due_in(circuit, clock, 1.0)


async def test_one_probe_at_a_time_and_a_probe_without_answer_frees_its_slot() -> None:
    clock, changes = ManualClock(START), list[bool]()
    circuit = make(clock, changes, threshold=1)
    await circuit.failure(probe=False)
    clock.now += 10  # well past the probe's time
    assert await circuit.acquire(deadline=clock.now + 3600) is True
    with pytest.raises(Expired):
        # Another send waits for the probe's answer; here its deadline has come already.
        await circuit.acquire(deadline=clock.now)
    await circuit.release(probe=True)  # cancelled, or an error of ours: no answer
    assert await circuit.acquire(deadline=clock.now + 3600) is True
    assert changes == [False]


async def test_a_late_failure_puts_the_probe_off_without_growing_the_spacing() -> None:
    """A send that was on the wire when the circuit opened fails later: the next probe is
    drawn again under the ceiling reached so far, which only a failed probe doubles."""
    clock, changes = ManualClock(START), list[bool]()
    circuit = make(clock, changes, threshold=1, initial=1.0, cap=8.0)
    await circuit.failure(probe=False)
    await probe_due_in(circuit, clock, 1.0)
    await circuit.failure(probe=True)  # ceiling 2
    clock.now += 0.5
    await circuit.failure(probe=False)  # the late one
    await probe_due_in(circuit, clock, 2.0)


async def test_full_jitter_stays_under_the_ceiling() -> None:
    clock, changes = ManualClock(START), list[bool]()
    circuit = make(clock, changes, threshold=1, initial=4.0, cap=4.0, rng=random.Random(12))
    offsets: list[float] = []
    for _ in range(200):
        await circuit.failure(probe=False)
        # The earliest moment a probe is let through, found on the controlled clock.
        low, high = clock.now, clock.now + 4.0
        opened = clock.now
        while high - low > 1e-6:
            middle = (low + high) / 2
            clock.now = middle
            try:
                await circuit.acquire(deadline=middle)
            except Expired:
                low = middle
            else:
                await circuit.release(probe=True)
                high = middle
        offsets.append(high - opened)
        clock.now = opened
    assert all(0 <= offset <= 4.0 + 1e-6 for offset in offsets)
    # Spread over the whole interval, not bunched at one end (equal jitter never goes
    # under 2, no jitter is always 4).
    assert min(offsets) < 0.5
    assert max(offsets) > 3.5
