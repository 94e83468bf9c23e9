"""The impairment model alone: delay, jitter, loss and a rate-limited queue, seeded."""

from __future__ import annotations

import random

import pytest

from punchline.lab.impair import Direction, Impairment


def test_delay_and_jitter_bounds() -> None:
    direction = Direction(Impairment(delay_ms=25, jitter_ms=5), random.Random(1))
    leaves = [direction.departure(100, 10.0) for _ in range(1000)]
    assert all(x is not None and 10.025 <= x <= 10.030 for x in leaves)
    assert len({round(x or 0, 6) for x in leaves}) > 100  # jitter varies, so frames reorder


def test_loss_rate_is_close_to_the_setting() -> None:
    direction = Direction(Impairment(loss=0.1), random.Random(2))
    dropped = sum(direction.departure(100, 0.0) is None for _ in range(10_000))
    assert dropped == direction.dropped
    assert 900 < dropped < 1100


def test_rate_limit_spaces_frames_and_tail_drops_a_full_queue() -> None:
    direction = Direction(Impairment(rate_kbit=800, queue_ms=100), random.Random(3))
    # 1000-byte frames at 800 kbit/s take 10 ms each; all sent at t=0
    leaves = [direction.departure(1000, 0.0) for _ in range(20)]
    sent = [x for x in leaves if x is not None]
    assert sent[:3] == pytest.approx([0.0, 0.010, 0.020])
    assert len(sent) == 11  # 0..100 ms of queue, then tail drop
    assert direction.dropped == 9
