"""Alignment and wideband PESQ on the shipped speech sample, clean, through Opus, and noisy."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from punchline.voice.codec import FRAME_SAMPLES, OpusConfig, OpusDecoder, OpusEncoder
from punchline.voice.quality import QualityError, align, pesq_wb
from punchline.voice.wav import read_wav, speech_sample


@pytest.fixture(scope="module")
def speech() -> npt.NDArray[np.int16]:
    return read_wav(speech_sample())


def opus_round_trip(samples: npt.NDArray[np.int16], config: OpusConfig) -> npt.NDArray[np.int16]:
    encoder, decoder = OpusEncoder(config), OpusDecoder()
    padded = np.concatenate([samples, np.zeros(-len(samples) % FRAME_SAMPLES, np.int16)])
    frames = padded.reshape(-1, FRAME_SAMPLES)
    return np.concatenate([decoder.decode(encoder.encode(f)) for f in frames])


@pytest.mark.parametrize("lag", [0, 1, 104, 3210, -250, -16000])
def test_align_finds_a_known_lag(speech: npt.NDArray[np.int16], lag: int) -> None:
    degraded = np.concatenate([np.zeros(lag, np.int16), speech]) if lag >= 0 else speech[-lag:]
    found, ref, deg = align(speech, degraded)
    assert found == lag
    assert len(ref) == len(deg)
    assert np.array_equal(ref, deg)
    assert ref.dtype == np.int16


def test_align_with_noise_and_gain(speech: npt.NDArray[np.int16]) -> None:
    rng = np.random.default_rng(5)
    degraded = 0.3 * np.concatenate([np.zeros(777), speech.astype(np.float64)])
    degraded += rng.normal(0, 300, len(degraded))
    found, ref, deg = align(speech, degraded)
    assert found == 777
    assert len(ref) == len(deg) == len(speech)
    assert deg.dtype == np.float64


def test_align_ignores_lags_beyond_the_limit(speech: npt.NDArray[np.int16]) -> None:
    degraded = np.concatenate([np.zeros(16000 * 3, np.int16), speech])
    found, _ref, _deg = align(speech, degraded, max_lag_s=2.0)
    assert abs(found) <= 32000


def test_align_of_silence_is_zero_lag() -> None:
    found, ref, deg = align(np.zeros(1000, np.int16), np.zeros(800, np.int16))
    assert found == 0
    assert len(ref) == len(deg) == 800


def test_pesq_of_the_sample_against_itself(speech: npt.NDArray[np.int16]) -> None:
    assert pesq_wb(speech, speech) > 4.4


def test_pesq_survives_an_unknown_delay(speech: npt.NDArray[np.int16]) -> None:
    delayed = np.concatenate([np.zeros(4321, np.int16), speech])
    assert pesq_wb(speech, delayed) > 4.4


def test_pesq_through_opus_32k_without_fec(speech: npt.NDArray[np.int16]) -> None:
    score = pesq_wb(speech, opus_round_trip(speech, OpusConfig(bitrate=32000, fec=False)))
    # Measured 4.15 on this sample with Debian 12's libopus 1.3.1.
    assert score >= 3.8, score


def test_pesq_through_opus_32k_default_config(speech: npt.NDArray[np.int16]) -> None:
    score = pesq_wb(speech, opus_round_trip(speech, OpusConfig()))
    # Measured 4.19: the default plans no FEC until the receiver reports loss.
    assert score >= 4.0, score


def test_pesq_through_opus_32k_with_fec_planned(speech: npt.NDArray[np.int16]) -> None:
    score = pesq_wb(speech, opus_round_trip(speech, OpusConfig(expected_loss_pct=5)))
    # Measured 3.55: in-band FEC planned for 5 % loss takes its bits from the primary
    # encoding. It buys ~+1.0 PESQ at 10 % random loss (see test_opus).
    assert score >= 3.4, score


def test_pesq_through_opus_24k_without_fec(speech: npt.NDArray[np.int16]) -> None:
    score = pesq_wb(speech, opus_round_trip(speech, OpusConfig(bitrate=24000, fec=False)))
    assert score >= 3.6, score  # measured 3.87


def test_pesq_of_heavy_noise_is_clearly_lower(speech: npt.NDArray[np.int16]) -> None:
    rng = np.random.default_rng(11)
    signal_power = np.mean(speech.astype(np.float64) ** 2)
    noise = rng.normal(0.0, np.sqrt(signal_power), len(speech))  # 0 dB SNR
    noisy = np.clip(speech + noise, -32768, 32767).astype(np.int16)
    assert pesq_wb(speech, noisy) < 2.0


def test_pesq_at_another_rate(speech: npt.NDArray[np.int16]) -> None:
    import soxr  # type: ignore[import-untyped]

    at_48k = np.round(soxr.resample(speech.astype(np.float64), 16000, 48000))
    assert pesq_wb(at_48k, at_48k, rate=48000) > 4.4


@pytest.mark.parametrize(
    ("reference", "degraded", "message"),
    [
        (np.zeros(16000), np.zeros(16000), "silence"),
        (np.ones(100), np.ones(100), "overlap"),
        (np.zeros((100, 2)), np.zeros(100), "1-D"),
        (np.zeros(0), np.zeros(100), "empty"),
        (np.array(["a"] * 100), np.zeros(100), "real numbers"),
        (np.full(16000, np.nan), np.zeros(16000), "NaN"),
    ],
)
def test_pesq_refuses_what_it_cannot_score(
    reference: np.ndarray, degraded: np.ndarray, message: str
) -> None:
    with pytest.raises(QualityError, match=message):
        pesq_wb(reference, degraded)


def test_pesq_of_noise_only_reference_is_a_quality_error() -> None:
    rng = np.random.default_rng(2)
    hum = (1000 * np.sin(np.arange(16000) * 0.01)).astype(np.int16)
    noise = rng.normal(0, 1, 16000)
    try:
        score = pesq_wb(hum, noise)
    except QualityError:
        return
    assert 0.5 < score < 5.0
