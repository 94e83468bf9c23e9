"""Two media sessions back to back in memory: frames flow, RTCP reports, FEC follows loss."""

from __future__ import annotations

import random

import numpy as np

from punchline.call.media import MediaSession, fec_plan
from punchline.crypto.handshake import SessionKeys
from punchline.voice import wav

KEYS_A = SessionKeys(send=b"a" * 32, receive=b"b" * 32, session_id=b"s" * 8)
KEYS_B = SessionKeys(send=b"b" * 32, receive=b"a" * 32, session_id=b"s" * 8)


class Collect:
    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []

    def write(self, frame: np.ndarray) -> None:
        self.frames.append(frame)


def run(
    seconds: float, loss: float = 0.0, seed: int = 1
) -> tuple[MediaSession, MediaSession, Collect]:
    rng = random.Random(seed)
    sink = Collect()
    a = MediaSession(KEYS_A, wav.WavSource(wav.speech_sample()), None, 0.0)
    b = MediaSession(KEYS_B, wav.SilenceSource(), sink, 0.0)
    now = 0.0
    while now < seconds:
        for sender, receiver in ((a, b), (b, a)):
            sender.tick(now)
            for data in sender.datagrams():
                if rng.random() >= loss:
                    receiver.receive_untrusted(data, now + 0.005)
        now += 0.02
    return a, b, sink


def test_audio_flows() -> None:
    a, b, sink = run(3.0)
    assert b.first_audio_at is not None
    assert len(sink.frames) > 100
    assert b.stats.max_gap < 0.03
    assert a.stats.rtt_ms is not None  # RTCP round trip measured
    assert a.loss == 0.0


def test_fec_is_planned_only_when_the_peer_reports_loss() -> None:
    clean, _, _ = run(5.0)
    assert clean._encoder.expected_loss_pct == 0
    lossy, _, _ = run(10.0, loss=0.08)  # five reports: some get through
    assert lossy.stats.peer_loss > 0.0
    assert lossy._encoder.expected_loss_pct == fec_plan(lossy.stats.peer_loss) > 0


def test_fec_plan() -> None:
    assert fec_plan(0.0) == 0
    assert fec_plan(0.001) == 2
    assert fec_plan(0.10) == 15
    assert fec_plan(0.9) == 25


def test_media_from_strangers_is_rejected() -> None:
    _, b, _ = run(0.5)
    stranger = MediaSession(SessionKeys(b"x" * 32, b"y" * 32, b"t" * 8), wav.SilenceSource(),
                            None, 0.0)  # fmt: skip
    stranger.tick(1.0)
    for data in stranger.datagrams():
        assert b.receive_untrusted(data, 1.0) is False
    assert b.stats.rejected >= 1


def test_a_packet_arriving_by_two_paths_is_played_once_and_counted() -> None:
    a = MediaSession(KEYS_A, wav.WavSource(wav.speech_sample()), None, 0.0)
    b = MediaSession(KEYS_B, wav.SilenceSource(), None, 0.0)
    a.tick(0.0)
    (data,) = a.datagrams()
    assert b.receive_untrusted(data, 0.01) is True
    assert b.receive_untrusted(data, 0.03) is False  # the same packet by the other path
    assert (b.stats.packets_received, b.stats.duplicates) == (1, 1)
