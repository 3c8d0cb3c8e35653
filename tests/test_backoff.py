"""The one backoff policy: growth, cap, jitter bounds, reset."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotflow.backoff import Backoff, ceiling


def test_grows_by_the_factor_up_to_the_cap() -> None:
    backoff = Backoff(0.5, 4.0, jitter="none")
    assert [backoff.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_reset_starts_again_from_initial() -> None:
    backoff = Backoff(1.0, 60.0, jitter="none")
    backoff.next()
    backoff.next()
    backoff.reset()
    assert backoff.next() == 1.0


@given(
    initial=st.floats(0.001, 10.0),
    cap=st.floats(10.0, 1e6),
    attempt=st.integers(1, 100_000),
    jitter=st.sampled_from(["full", "equal"]),
)
def test_jittered_waits_stay_within_their_bounds(
    initial: float, cap: float, attempt: int, jitter: str
) -> None:
    top = ceiling(initial, cap, attempt)
    assert initial <= top <= cap or top == pytest.approx(cap)
    backoff = Backoff(initial, cap, jitter=jitter, rng=random.Random(attempt))  # type: ignore[arg-type]
    backoff.attempt = attempt - 1
    wait = backoff.next()
    assert (0.0 if jitter == "full" else top / 2) <= wait <= top


def test_a_huge_attempt_number_is_the_cap_not_an_overflow() -> None:
    assert ceiling(1.0, 300.0, 10**9) == 300.0


def test_nonsense_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(5.0, 1.0)
