"""A sans-I/O adaptive jitter buffer: packets arrive whenever, frames leave once per tick.

The network delivers voice packets late, early, out of order, twice or never; the loudspeaker
wants exactly one 20 ms frame every 20 ms. The buffer sits between them:

- `push(index, payload, now)` when a packet arrives (`index` = extended RTP sequence number,
  RFC 3550 appendix A.1, one per frame);
- `pop(now)` once per frame tick, which says what to play: the frame (`"frame"`), the frame
  rebuilt from the next packet's in-band FEC (`"fec"`), a concealed frame (`"lost"`), or
  nothing at all (`"idle"`, before the stream starts or after it stops).

Policy. Each packet's transit is its arrival time minus its place in the sender's timeline
(index * frame); the unknown clock offset cancels out of every difference. The *base* is the
smallest transit seen over the last `base_window_frames` packets: the path's delay without
jitter. Frame n is due at ``n * frame + base + target``, so `target` is how long the fastest
packets wait in the buffer. The target follows interarrival jitter J, measured exactly as
RFC 3550 section 6.4.1 / appendix A.8 does (J += (|D| - J) / 16): ``jitter_multiplier * J``,
clamped to [`min_delay_ms`, `max_delay_ms`]. It rises at once when J does and falls back
slowly (`shrink_gain`), because a late frame costs more than 20 ms of extra delay.

The buffer moves playout towards that target one frame at a time: running more than half a
frame early, it inserts one concealment frame (`"lost"` with `index=None`, counted as
`stretched`, not as lost); running more than a frame late with a later packet waiting, it
drops one frame (`skipped`). The playout clock is the caller's tick, so the same mechanism
absorbs clock drift between the two ends. When nothing has arrived for `idle_after_frames`
ticks the stream is taken to have paused; playout goes idle and re-anchors (base and timeline)
on the next packet, which also handles a path whose delay jumped.

Assumes one packet per frame tick (no DTX, no multi-frame packets). Nothing here reads a
clock, sleeps or does I/O: `now` (seconds, any monotonic origin) is always passed in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

from punchline.errors import LocalError

PlayoutKind = Literal["frame", "fec", "lost", "idle"]

# RFC 3550 A.8: the jitter estimate's gain is 1/16, "a good noise reduction ratio while
# maintaining a reasonable rate of convergence".
_RFC3550_GAIN = 1.0 / 16.0


class JitterConfigError(LocalError):
    """A `JitterConfig` with values that cannot work together."""


@dataclass(frozen=True)
class JitterConfig:
    """Tunables of the jitter buffer (all delays in milliseconds).

    frame_ms: audio per packet; the sender's timeline advances this much per index.
    min_delay_ms: the buffer never aims lower, even on a perfect path: it is the margin for
        scheduling noise in the sender's and our own frame ticks.
    max_delay_ms: the buffer never aims higher: past ~300 ms one-way, conversation breaks
        down (ITU-T G.114), so losing a few late frames is the better deal.
    initial_delay_ms: the target before any jitter has been measured.
    jitter_multiplier: target = this * J. For uniform jitter of spread X, J ~ X/3, so 3 J
        covers the whole spread; for Gaussian jitter J ~ 1.13 sigma and 3 J ~ 3.4 sigma.
    shrink_gain: per packet, the target moves this fraction of the way down towards a lower
        wanted value (1/128: about 2.5 s to halve the excess at 50 packets/s).
    base_window_frames: how many recent packets the base (fastest transit) is the minimum of:
        long enough to contain a fast packet, short enough to follow clock drift.
    idle_after_frames: after this many consecutive frames concealed with nothing buffered the
        stream is taken to have paused: the buffer goes idle and re-anchors on the next packet.
    resync_frames: a packet this many frames ahead of playout means the sender restarted or
        jumped; the buffer drops its state and starts over from that packet.
    skip_after_frames: playout must run more than a frame late for this many consecutive
        ticks before a frame is dropped to catch up. Dropping 20 ms of speech is audible
        (about -0.4 PESQ); a burst after a sender's scheduling hiccup passes on its own.
    """

    frame_ms: int = 20
    min_delay_ms: int = 40
    max_delay_ms: int = 300
    initial_delay_ms: int = 60
    jitter_multiplier: float = 3.0
    shrink_gain: float = 1.0 / 128.0
    base_window_frames: int = 100
    idle_after_frames: int = 5
    resync_frames: int = 250
    skip_after_frames: int = 25

    def __post_init__(self) -> None:
        if self.frame_ms <= 0:
            raise JitterConfigError(f"frame_ms must be positive, got {self.frame_ms}")
        if not 0 <= self.min_delay_ms <= self.max_delay_ms:
            raise JitterConfigError(
                f"need 0 <= min_delay_ms <= max_delay_ms, got {self.min_delay_ms} and "
                f"{self.max_delay_ms}"
            )
        if not self.min_delay_ms <= self.initial_delay_ms <= self.max_delay_ms:
            raise JitterConfigError(
                f"initial_delay_ms {self.initial_delay_ms} is outside "
                f"[{self.min_delay_ms}, {self.max_delay_ms}]"
            )
        if self.jitter_multiplier <= 0 or not 0 < self.shrink_gain <= 1:
            raise JitterConfigError("need jitter_multiplier > 0 and 0 < shrink_gain <= 1")
        if self.base_window_frames < 1 or self.idle_after_frames < 1 or self.resync_frames < 2:
            raise JitterConfigError(
                "need base_window_frames >= 1, idle_after_frames >= 1 and resync_frames >= 2"
            )


@dataclass(frozen=True)
class Playout:
    """What to play for one frame tick.

    kind "frame": decode `payload`, the packet for frame `index`.
    kind "fec": frame `index` is missing but the next packet is here: decode frame `index`
        from `payload` (that next packet) with FEC; the next tick plays `payload` itself.
    kind "lost": conceal frame `index` (decoder PLC). `index` is None when the buffer inserts
        a frame to grow its delay; conceal it all the same.
    kind "idle": nothing is due (not started, or the stream paused): play silence.
    """

    kind: PlayoutKind
    payload: bytes | None = None
    index: int | None = None


IDLE = Playout("idle")
_STRETCH = Playout("lost")


@dataclass(frozen=True)
class JitterStats:
    """Counters since the buffer was made, and its present delay.

    received: every push, duplicates and late ones included.
    played: frames played from their own packet ("frame").
    recovered: frames rebuilt from the next packet's FEC ("fec").
    lost: frames that never arrived in time: concealed, or passed over while re-anchoring.
    late: packets that arrived after their frame was played or given up.
    duplicate: packets whose index had already arrived.
    skipped: frames dropped on purpose to shrink the delay.
    stretched: concealment frames inserted on purpose to grow the delay.
    resyncs: times the buffer started over because the sender jumped far ahead.
    current_delay_ms: how long after the base (fastest) arrival time the last frame played.
    target_delay_ms: where the buffer is steering that delay.
    jitter_ms: the RFC 3550 interarrival jitter estimate.
    """

    received: int
    played: int
    recovered: int
    lost: int
    late: int
    duplicate: int
    skipped: int
    stretched: int
    resyncs: int
    current_delay_ms: float
    target_delay_ms: float
    jitter_ms: float


class JitterBuffer:
    """One receiving stream's jitter buffer. See the module docstring for the policy."""

    def __init__(self, config: JitterConfig | None = None) -> None:
        self.config = config or JitterConfig()
        self._frame = self.config.frame_ms / 1000.0
        self._min_delay = self.config.min_delay_ms / 1000.0
        self._max_delay = self.config.max_delay_ms / 1000.0
        self._buffer: dict[int, tuple[bytes, float]] = {}  # index -> (payload, transit)
        self._seen: set[int] = set()  # indices that arrived lately, to tell duplicates
        self._next: int | None = None  # the next index to play
        self._playing = False
        self._underrun = 0
        self._late_ticks = 0
        # Start J where the target equals initial_delay_ms; measurements then move it.
        self._jitter = self.config.initial_delay_ms / 1000.0 / self.config.jitter_multiplier
        self._target = self.config.initial_delay_ms / 1000.0
        self._last_transit: float | None = None
        self._arrivals = 0
        self._window: deque[tuple[int, float]] = deque()  # (arrival no., transit), ascending
        self._current_delay = 0.0
        self._received = self._played = self._recovered = self._lost = 0
        self._late = self._duplicate = self._skipped = self._stretched = self._resyncs = 0

    # --- input --------------------------------------------------------------------------------

    def push(self, index: int, payload: bytes, now: float) -> None:
        """A packet arrived at `now`: keep it for playout, or count it as duplicate or late."""
        self._received += 1
        if index in self._buffer or index in self._seen:
            self._duplicate += 1
            return
        transit = now - index * self._frame
        if self._next is not None and index - self._next > self.config.resync_frames:
            self._resync()
        self._seen.add(index)
        self._measure(transit)
        if self._next is not None and index < self._next:
            self._late += 1
            return
        self._buffer[index] = (payload, transit)

    def _measure(self, transit: float) -> None:
        cfg = self.config
        if self._last_transit is not None:
            # RFC 3550 A.8: J += (|D(i-1, i)| - J) / 16
            self._jitter += (abs(transit - self._last_transit) - self._jitter) * _RFC3550_GAIN
        self._last_transit = transit
        wanted = min(max(cfg.jitter_multiplier * self._jitter, self._min_delay), self._max_delay)
        if wanted > self._target:
            self._target = wanted  # more jitter: protect the call at once
        else:
            self._target += (wanted - self._target) * cfg.shrink_gain
        self._track_base(transit)

    def _track_base(self, transit: float) -> None:
        """Sliding-window minimum of transit (a monotonic deque: O(1) amortised)."""
        self._arrivals += 1
        while self._window and self._window[-1][1] >= transit:
            self._window.pop()
        self._window.append((self._arrivals, transit))
        while self._window[0][0] <= self._arrivals - self.config.base_window_frames:
            self._window.popleft()

    def _resync(self) -> None:
        self._resyncs += 1
        self._buffer.clear()
        self._seen = set()
        self._next = None
        self._playing = False
        self._underrun = 0
        self._last_transit = None
        self._window.clear()

    # --- output -------------------------------------------------------------------------------

    def pop(self, now: float) -> Playout:
        """What to play for the frame tick at `now`. Call exactly once per tick."""
        if not self._playing:
            if not self._buffer:
                return IDLE
            first = min(self._buffer)
            # (Re-)anchor on what is buffered now: its fastest packet sets the base.
            base = min(transit for _payload, transit in self._buffer.values())
            if now < first * self._frame + base + self._target - self._frame / 2:
                return IDLE
            if self._next is not None:  # resuming: count the frames that never came
                self._lost += first - self._next
            self._window.clear()
            self._track_base(base)
            self._next = first
            self._playing = True
        else:
            assert self._next is not None
            lateness = now - (self._next * self._frame + self._window[0][1] + self._target)
            if lateness < -self._frame / 2:
                self._stretched += 1
                return _STRETCH
            running_late = (
                lateness > self._frame and self._buffer and max(self._buffer) > self._next
            )
            self._late_ticks = self._late_ticks + 1 if running_late else 0
            if running_late and self._late_ticks >= self.config.skip_after_frames:
                self._late_ticks = 0
                if self._buffer.pop(self._next, None) is not None:
                    self._skipped += 1
                else:
                    self._lost += 1
                self._next += 1
        return self._play(now)

    def _play(self, now: float) -> Playout:
        assert self._next is not None
        index = self._next
        self._next += 1
        self._current_delay = now - (index * self._frame + self._window[0][1])
        self._prune_seen()
        entry = self._buffer.pop(index, None)
        if entry is not None:
            self._played += 1
            self._underrun = 0
            return Playout("frame", entry[0], index)
        following = self._buffer.get(index + 1)
        if following is not None:
            self._recovered += 1
            self._underrun = 0
            return Playout("fec", following[0], index)
        self._lost += 1
        self._underrun = 0 if self._buffer else self._underrun + 1
        if self._underrun >= self.config.idle_after_frames:
            # The stream paused, or a long gap began: stop concealing, and take those frames
            # back from `lost` and from the timeline. If the stream resumes, re-anchoring
            # counts every frame that never came; if it ended, nothing was lost.
            self._lost -= self._underrun
            self._next -= self._underrun
            self._playing = False
            self._underrun = 0
        return Playout("lost", None, index)

    def _prune_seen(self) -> None:
        assert self._next is not None
        if len(self._seen) > 4 * self.config.resync_frames:
            horizon = self._next - self.config.resync_frames
            self._seen = {i for i in self._seen if i >= horizon}

    @property
    def stats(self) -> JitterStats:
        return JitterStats(
            received=self._received,
            played=self._played,
            recovered=self._recovered,
            lost=self._lost,
            late=self._late,
            duplicate=self._duplicate,
            skipped=self._skipped,
            stretched=self._stretched,
            resyncs=self._resyncs,
            current_delay_ms=self._current_delay * 1000.0,
            target_delay_ms=self._target * 1000.0,
            jitter_ms=self._jitter * 1000.0,
        )

    @property
    def buffered(self) -> int:
        """Packets waiting for playout."""
        return len(self._buffer)
