"""Exponential back-off after repeated failures."""

from __future__ import annotations

import pytest

from punchline.auth.throttle import Throttle, ThrottlePolicy

POLICY = ThrottlePolicy(
    free_failures=3, base_delay=2.0, max_delay=60.0, forget_after=1000.0, max_keys=100
)


def failed(throttle: Throttle, key: str, times: int, now: float) -> Throttle:
    for _ in range(times):
        throttle.failure(key, now)
    return throttle


def test_unknown_key_may_go() -> None:
    assert Throttle(POLICY).retry_after("alice", 0.0) == 0.0


@pytest.mark.parametrize("failures", range(POLICY.free_failures))
def test_no_delay_before_free_failures(failures: int) -> None:
    throttle = failed(Throttle(POLICY), "alice", failures, 100.0)
    assert throttle.retry_after("alice", 100.0) == 0.0


@pytest.mark.parametrize(
    ("failures", "delay"),
    [(3, 2.0), (4, 4.0), (5, 8.0), (6, 16.0), (7, 32.0), (8, 60.0), (9, 60.0), (500, 60.0)],
)
def test_exponential_then_capped(failures: int, delay: float) -> None:
    throttle = failed(Throttle(POLICY), "alice", failures, 100.0)
    assert throttle.retry_after("alice", 100.0) == delay


def test_delay_counts_down_from_last_failure() -> None:
    throttle = failed(Throttle(POLICY), "alice", 4, 100.0)  # 4 s
    assert throttle.retry_after("alice", 101.0) == 3.0
    assert throttle.retry_after("alice", 103.5) == 0.5
    assert throttle.retry_after("alice", 104.0) == 0.0
    assert throttle.retry_after("alice", 200.0) == 0.0


def test_keys_are_independent() -> None:
    throttle = failed(Throttle(POLICY), "alice", 5, 100.0)
    assert throttle.retry_after("alice", 100.0) > 0
    assert throttle.retry_after("bob", 100.0) == 0.0


def test_success_resets() -> None:
    throttle = failed(Throttle(POLICY), "alice", 5, 100.0)
    throttle.success("alice")
    assert throttle.retry_after("alice", 100.0) == 0.0
    assert len(throttle) == 0
    throttle.failure("alice", 101.0)
    assert throttle.retry_after("alice", 101.0) == 0.0  # counting starts over
    throttle.success("never-seen")  # no error


def test_forget_after_forgets_on_lookup() -> None:
    policy = ThrottlePolicy(free_failures=0, base_delay=1000.0, max_delay=1000.0, forget_after=100)
    throttle = failed(Throttle(policy), "alice", 1, 0.0)
    assert throttle.retry_after("alice", 100.0) == 900.0  # exactly forget_after: remembered
    assert len(throttle) == 1
    assert throttle.retry_after("alice", 100.5) == 0.0
    assert len(throttle) == 0


def test_forget_after_restarts_the_count_on_failure() -> None:
    throttle = failed(Throttle(POLICY), "alice", 50, 0.0)
    now = POLICY.forget_after + 1
    throttle.failure("alice", now)
    assert throttle.retry_after("alice", now) == 0.0  # one failure, still free
    failed(throttle, "alice", 2, now)
    assert throttle.retry_after("alice", now) == POLICY.base_delay


def test_failures_within_forget_after_accumulate() -> None:
    throttle = Throttle(POLICY)
    for i in range(3):
        throttle.failure("alice", i * (POLICY.forget_after - 1))
    last = 2 * (POLICY.forget_after - 1)
    assert throttle.retry_after("alice", last) == POLICY.base_delay


def test_max_keys_evicts_least_recently_failed() -> None:
    policy = ThrottlePolicy(free_failures=0, base_delay=10.0, max_delay=10.0, max_keys=3)
    throttle = Throttle(policy)
    throttle.failure("a", 1.0)
    throttle.failure("b", 2.0)
    throttle.failure("c", 3.0)
    throttle.failure("a", 4.0)  # a is now the freshest
    assert throttle.retry_after("b", 4.0) > 0  # a lookup does not make b fresher
    throttle.failure("d", 5.0)
    assert len(throttle) == 3
    assert throttle.retry_after("b", 5.0) == 0.0  # evicted
    for key in ("a", "c", "d"):
        assert throttle.retry_after(key, 5.0) > 0, key


def test_max_keys_bound_holds_under_many_keys() -> None:
    policy = ThrottlePolicy(max_keys=10)
    throttle = Throttle(policy)
    for i in range(100):
        throttle.failure(f"k{i}", float(i))
    assert len(throttle) == 10
    for i in range(90, 100):
        throttle.failure(f"k{i}", 100.0)
    assert len(throttle) == 10
