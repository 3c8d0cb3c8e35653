"""`Deadlines`: the one timer that ends a sink's overlong sends (iotflow.sinks.webapi).

The whole sinks' timeouts, against clouds that do not answer, are in test_sink_contract.py
("timeout"); this is the timer's own bookkeeping: which send it ends, and which it leaves.
"""

from __future__ import annotations

import asyncio

import pytest

from iotflow.sinks.webapi import Deadlines


async def _send(deadlines: Deadlines, answer: asyncio.Event) -> str:
    with deadlines:
        await answer.wait()
    return "answered"


async def _timed_out(send: asyncio.Task[str]) -> bool:
    """Whether `send` ended with the TimeoutError of its deadline (waited for, at most 5 s)."""
    await asyncio.wait({send}, timeout=5)
    return send.done() and isinstance(send.exception(), TimeoutError)


async def test_a_send_past_its_deadline_times_out_and_the_others_go_on() -> None:
    deadlines = Deadlines(0.05)
    stuck, answered = asyncio.Event(), asyncio.Event()
    slow = asyncio.create_task(_send(deadlines, stuck))
    quick = asyncio.create_task(_send(deadlines, answered))
    await asyncio.sleep(0)  # both under way: the timer is set for the first
    answered.set()
    assert await quick == "answered"
    assert await _timed_out(slow)
    assert slow.cancelling() == 0  # our cancellation was taken back
    assert not deadlines._running
    assert not deadlines._overrun
    deadlines.close()


async def test_the_timer_moves_on_to_the_next_oldest_send() -> None:
    # The first send ends in time; the second, begun later, still gets its deadline.
    deadlines = Deadlines(0.2)
    first, second = asyncio.Event(), asyncio.Event()
    done = asyncio.create_task(_send(deadlines, first))
    await asyncio.sleep(0)
    timer = deadlines._timer
    assert timer is not None
    late = asyncio.create_task(_send(deadlines, second))
    await asyncio.sleep(0)
    assert deadlines._timer is timer  # one timer, set for the oldest
    first.set()
    assert await done == "answered"
    assert await _timed_out(late)
    deadlines.close()


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    # A stopping worker cancels its sends: that is not a timeout, even past the deadline.
    deadlines = Deadlines(0.05)
    never = asyncio.Event()
    send = asyncio.create_task(_send(deadlines, never))
    await asyncio.sleep(0)
    send.cancel()
    with pytest.raises(asyncio.CancelledError):
        await send
    assert send.cancelled()

    overran = asyncio.create_task(_send(deadlines, never))
    await asyncio.sleep(0)
    deadlines._running[overran] = (0.0, 0)  # its deadline past: the timer ends it...
    deadlines._expire(asyncio.get_running_loop())
    assert overran in deadlines._overrun
    overran.cancel()  # ... and the worker stops it too, before it runs again
    with pytest.raises(asyncio.CancelledError):
        await overran
    assert not deadlines._running
    assert not deadlines._overrun
    deadlines.close()
