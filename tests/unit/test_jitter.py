"""The adaptive jitter buffer, driven by hand with a fake clock: no sleeping, fully repeatable."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

import pytest

from punchline.voice.jitter import JitterBuffer, JitterConfig, JitterConfigError, Playout

FRAME = 0.020
BASE = 0.050  # one-way delay of the path without jitter


def payload(index: int) -> bytes:
    return b"pkt%d" % index


def schedule(
    indices: Iterable[int], delay: Callable[[int], float] = lambda i: 0.0, start: int = 0
) -> list[tuple[float, int]]:
    """(arrival time, index) for packets sent every 20 ms, index `start` at t=0."""
    return sorted(((i - start) * FRAME + BASE + delay(i), i) for i in indices)


class Receiver:
    """A jitter buffer fed from a list of arrivals by a fake clock that ticks every 20 ms."""

    def __init__(self, jb: JitterBuffer, arrivals: list[tuple[float, int]], first_tick: float):
        self.jb = jb
        self.pending = sorted(arrivals, reverse=True)  # pop() takes the earliest
        self.now = first_tick

    def ticks(self, count: int) -> list[Playout]:
        """Push what has arrived by each tick, then pop once; return what each tick played."""
        out = []
        for _ in range(count):
            while self.pending and self.pending[-1][0] <= self.now:
                at, index = self.pending.pop()
                self.jb.push(index, payload(index), at)
            out.append(self.jb.pop(self.now))
            self.now += FRAME
        return out


def run(
    jb: JitterBuffer, arrivals: list[tuple[float, int]], ticks: int, first_tick: float = 0.005
) -> list[Playout]:
    return Receiver(jb, arrivals, first_tick).ticks(ticks)


def played_indices(playouts: list[Playout]) -> list[int]:
    return [p.index for p in playouts if p.kind == "frame" and p.index is not None]


def test_idle_before_anything_arrives() -> None:
    jb = JitterBuffer()
    assert jb.pop(0.0) == Playout("idle")
    assert jb.pop(1.0).kind == "idle"


def test_in_order_stream_plays_every_frame_after_the_initial_delay() -> None:
    jb = JitterBuffer()
    out = run(jb, schedule(range(100)), 120)
    assert played_indices(out) == list(range(100))
    first = next(n for n, p in enumerate(out) if p.kind == "frame")
    # First packet at 50 ms, initial target 60 ms: playout starts within half a frame of 110 ms.
    assert abs(0.005 + first * FRAME - (BASE + 0.060)) <= FRAME / 2
    assert all(
        p.payload == payload(p.index) for p in out if p.kind == "frame" and p.index is not None
    )
    stats = jb.stats
    assert (stats.received, stats.played, stats.lost, stats.late, stats.duplicate) == (
        100,
        100,
        0,
        0,
        0,
    )


def test_no_jitter_settles_at_the_minimum_delay() -> None:
    jb = JitterBuffer()
    run(jb, schedule(range(500)), 500)
    assert jb.stats.jitter_ms < 1.0
    assert jb.stats.target_delay_ms == pytest.approx(40.0, abs=1.0)
    # Playout is steered to within [-half a frame, +one frame] of the target.
    assert 30.0 <= jb.stats.current_delay_ms <= 60.0


def test_reordered_packets_play_in_order() -> None:
    def swap_pairs(i: int) -> float:
        return 0.025 if i % 2 == 0 else 0.0  # every even packet overtaken by the odd one after it

    jb = JitterBuffer()
    out = run(jb, schedule(range(200), swap_pairs), 230)
    assert played_indices(out) == list(range(200))
    assert jb.stats.lost == 0
    assert jb.stats.late == 0


def test_duplicates_are_dropped_and_counted() -> None:
    arrivals = schedule(range(50)) + [(t + 0.003, i) for t, i in schedule(range(50))]
    arrivals += [(2.0, 3)]  # a copy long after frame 3 played: a duplicate, not a late packet
    jb = JitterBuffer()
    out = run(jb, arrivals, 110)
    assert played_indices(out) == list(range(50))
    assert jb.stats.duplicate == 51
    assert jb.stats.late == 0
    assert jb.stats.received == 101


def test_single_loss_is_recovered_from_the_next_packets_fec() -> None:
    jb = JitterBuffer()
    out = run(jb, schedule(i for i in range(40) if i != 10), 60)
    by_index = {p.index: p for p in out if p.index is not None}
    assert by_index[10] == Playout("fec", payload(11), 10)
    assert by_index[11] == Playout("frame", payload(11), 11)
    assert jb.stats.recovered == 1
    assert jb.stats.lost == 0


def test_burst_loss_conceals_then_uses_fec_for_the_last_one() -> None:
    jb = JitterBuffer()
    out = run(jb, schedule(i for i in range(40) if i not in (10, 11, 12)), 60)
    by_index = {p.index: p for p in out if p.index is not None}
    assert [by_index[i].kind for i in (9, 10, 11, 12, 13)] == [
        "frame",
        "lost",
        "lost",
        "fec",
        "frame",
    ]
    assert by_index[10].payload is None
    assert jb.stats.lost == 2
    assert jb.stats.recovered == 1


def test_late_packet_is_dropped_and_counted() -> None:
    jb = JitterBuffer(JitterConfig(initial_delay_ms=40))
    late = {20: 0.500}
    out = run(jb, schedule(range(60), lambda i: late.get(i, 0.0)), 80)
    by_index = {p.index: p for p in out if p.index is not None}
    assert by_index[20].kind == "fec"  # played (from 21's FEC) before 20 turned up
    assert 20 not in played_indices(out)
    assert jb.stats.late == 1
    assert jb.stats.recovered == 1
    assert played_indices(out) == [i for i in range(60) if i != 20]


def test_stream_end_goes_idle_without_counting_the_tail_as_lost() -> None:
    jb = JitterBuffer()
    out = run(jb, schedule(range(50)), 100)
    assert played_indices(out) == list(range(50))
    kinds = [p.kind for p in out]
    assert kinds.count("lost") == JitterConfig().idle_after_frames
    assert kinds[-10:] == ["idle"] * 10
    assert jb.stats.lost == 0


def test_stream_resumes_after_a_pause_and_counts_the_gap() -> None:
    jb = JitterBuffer()
    # Frames 0-49, then 100 frames never sent (sender muted), then 150-199 on the same timeline.
    out = run(jb, schedule([*range(50), *range(150, 200)]), 230)
    assert played_indices(out) == [*range(50), *range(150, 200)]
    assert jb.stats.lost == 100
    assert jb.stats.late == 0


def test_jump_far_ahead_resyncs() -> None:
    jb = JitterBuffer()
    first = schedule(range(50))
    # The sender restarts its sequence numbers 10 000 ahead, 1 s after its last packet.
    second = [(t + 50 * FRAME + 1.0, i + 10_000) for t, i in schedule(range(50))]
    out = run(jb, first + second, 200)
    assert played_indices(out) == [*range(50), *range(10_000, 10_050)]
    assert jb.stats.resyncs == 1
    assert jb.stats.late == 0


def jittery(spread: float, seed: int) -> Callable[[int], float]:
    rng = random.Random(seed)
    delays: dict[int, float] = {}

    def delay(i: int) -> float:
        if i not in delays:
            delays[i] = rng.uniform(0.0, spread)
        return delays[i]

    return delay


def test_delay_adapts_up_under_jitter_and_back_down() -> None:
    calm, onset, rough = 500, 100, 1400  # 10 s calm; 2 + 28 s of 0-100 ms jitter; 30 s calm
    noisy = jittery(0.100, seed=1)
    bumpy = range(calm, calm + onset + rough)
    arrivals = schedule(
        range(2 * calm + 2 * (onset + rough)), lambda i: noisy(i) if i in bumpy else 0
    )
    rx = Receiver(JitterBuffer(), arrivals, first_tick=0.005)
    rx.ticks(calm)
    assert rx.jb.stats.target_delay_ms < 45.0

    rx.ticks(onset)
    # Jitter that starts abruptly costs a few frames before the estimate has caught up...
    at_onset = rx.jb.stats
    assert at_onset.late + at_onset.lost <= 0.25 * onset
    rx.ticks(rough)
    up = rx.jb.stats
    assert up.jitter_ms > 25.0
    assert 90.0 <= up.target_delay_ms <= 300.0
    assert up.current_delay_ms >= 70.0
    # ...and then it is absorbed.
    assert (up.late + up.lost) - (at_onset.late + at_onset.lost) <= 0.005 * rough

    rx.ticks(calm + onset + rough)
    down = rx.jb.stats
    assert down.jitter_ms < 1.0
    assert down.target_delay_ms < 45.0
    assert down.current_delay_ms < 70.0
    assert down.skipped > 0  # it came down by dropping frames, one at a time
    assert down.late + down.lost == up.late + up.lost


def test_heavier_jitter_means_more_delay() -> None:
    targets = []
    for spread in (0.0, 0.040, 0.120, 0.400):
        jb = JitterBuffer()
        run(jb, schedule(range(1000), jittery(spread, seed=2)), 1000)
        targets.append(jb.stats.target_delay_ms)
    assert targets == sorted(targets)
    assert targets[0] == pytest.approx(40.0, abs=1.0)
    assert targets[-1] == pytest.approx(300.0)  # capped at max_delay_ms


def test_same_inputs_same_playout() -> None:
    def once() -> list[Playout]:
        return run(JitterBuffer(), schedule(range(400), jittery(0.080, seed=9)), 420)

    assert once() == once()


def test_slow_sender_clock_is_absorbed() -> None:
    # The sender's clock runs 0.5 % slow: its packets drift later and later.
    jb = JitterBuffer()
    out = run(jb, schedule(range(3000), lambda i: i * FRAME * 0.005), 3000)
    stats = jb.stats
    assert stats.stretched > 0
    assert stats.lost + stats.late == 0
    assert played_indices(out)[-1] > 2900


@pytest.mark.parametrize(
    "bad",
    [
        {"frame_ms": 0},
        {"min_delay_ms": 100, "max_delay_ms": 50},
        {"initial_delay_ms": 10},
        {"initial_delay_ms": 400},
        {"jitter_multiplier": 0.0},
        {"shrink_gain": 0.0},
        {"idle_after_frames": 0},
        {"resync_frames": 1},
        {"base_window_frames": 0},
    ],
)
def test_config_is_checked(bad: dict[str, float]) -> None:
    with pytest.raises(JitterConfigError):
        JitterConfig(**bad)  # type: ignore[arg-type]


def _run_with_gap(gap_frames: int, ticks: int, config: JitterConfig) -> JitterBuffer:
    """A steady 20 ms stream whose receiver sees frames `gap_frames` early for a while:
    the sender paused and then caught up, so packets pile up in the buffer at once."""
    buffer = JitterBuffer(config)
    frame = 0.02
    for index in range(40):
        buffer.push(index, b"x", index * frame)
        buffer.pop(index * frame)
    # the sender catches up: `gap_frames` extra packets arrive at the same moment
    start = 40
    for index in range(start, start + gap_frames + 1):
        buffer.push(index, b"x", start * frame)
    for tick in range(ticks):
        now = (start + tick) * frame
        following = start + gap_frames + 1 + tick
        buffer.push(following, b"x", now)
        buffer.pop(now)
    return buffer


def test_a_short_burst_does_not_cut_audio() -> None:
    buffer = _run_with_gap(3, 10, JitterConfig())  # 60 ms extra for 0.2 s
    assert buffer.stats.skipped == 0
    eager = _run_with_gap(3, 10, JitterConfig(skip_after_frames=1))
    assert eager.stats.skipped > 0  # without the hysteresis the same burst cuts frames


def test_a_sustained_excess_is_worked_off_by_skipping() -> None:
    buffer = _run_with_gap(3, 200, JitterConfig())  # 60 ms extra for 4 s
    assert buffer.stats.skipped >= 1
    assert buffer.stats.lost == 0
