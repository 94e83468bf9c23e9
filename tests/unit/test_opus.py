"""Opus through the real libopus: round trip, bitrate, concealment, FEC, strict input checks."""

from __future__ import annotations

import random

import numpy as np
import numpy.typing as npt
import pytest

from punchline.errors import LocalError, RemoteError
from punchline.voice.codec import (
    FRAME_SAMPLES,
    CodecError,
    CorruptPacketError,
    OpusConfig,
    OpusDecoder,
    OpusEncoder,
)
from punchline.voice.quality import pesq_wb
from punchline.voice.wav import read_wav, speech_sample


@pytest.fixture(scope="module")
def speech() -> npt.NDArray[np.int16]:
    return read_wav(speech_sample())


def frames_of(samples: npt.NDArray[np.int16]) -> list[npt.NDArray[np.int16]]:
    whole = len(samples) // FRAME_SAMPLES * FRAME_SAMPLES
    return list(samples[:whole].reshape(-1, FRAME_SAMPLES))


@pytest.fixture(scope="module")
def packets(speech: npt.NDArray[np.int16]) -> list[bytes]:
    encoder = OpusEncoder(OpusConfig(expected_loss_pct=5))  # FEC planned, as under loss
    return [encoder.encode(frame) for frame in frames_of(speech)]


def test_round_trip_gives_one_frame_per_packet(
    speech: npt.NDArray[np.int16], packets: list[bytes]
) -> None:
    decoder = OpusDecoder()
    decoded = [decoder.decode(packet) for packet in packets]
    assert len(decoded) == len(speech) // FRAME_SAMPLES
    assert all(f.dtype == np.int16 and f.shape == (FRAME_SAMPLES,) for f in decoded)
    out = np.concatenate(decoded)
    # Same loudness, give or take: the codec neither mutes nor clips the talker.
    ratio = np.std(out.astype(float)) / np.std(speech[: len(out)].astype(float))
    assert 0.8 < ratio < 1.2


def test_packets_are_wideband_silk_or_celt_20ms(packets: list[bytes]) -> None:
    # RFC 6716 3.1: the TOC byte's config (top 5 bits) names mode, bandwidth and frame size.
    configs = {p[0] >> 3 for p in packets}
    assert configs <= {9, 23}, configs  # 9: SILK-only WB 20 ms; 23: CELT-only WB 20 ms
    assert all(p[0] & 0x04 == 0 for p in packets)  # mono
    assert all(p[0] & 0x03 == 0 for p in packets)  # one frame per packet


@pytest.mark.parametrize("bitrate", [16000, 24000, 32000])
def test_bitrate_roughly_as_configured(speech: npt.NDArray[np.int16], bitrate: int) -> None:
    encoder = OpusEncoder(OpusConfig(bitrate=bitrate))
    sizes = [len(encoder.encode(frame)) for frame in frames_of(speech)]
    measured = sum(sizes) * 8 / (len(sizes) * 0.020)
    # VBR spends less on pauses; it must still be in the neighbourhood of the target.
    assert 0.7 * bitrate < measured < 1.1 * bitrate, measured


def test_concealment_and_fec_give_full_frames(packets: list[bytes]) -> None:
    decoder = OpusDecoder()
    for packet in packets[:100]:
        decoder.decode(packet)
    concealed = decoder.decode(None)
    recovered = decoder.decode_fec(packets[101])
    after = decoder.decode(packets[101])
    for frame in (concealed, recovered, after):
        assert frame.dtype == np.int16
        assert frame.shape == (FRAME_SAMPLES,)


def test_fec_beats_concealment_under_loss(
    speech: npt.NDArray[np.int16], packets: list[bytes]
) -> None:
    rng = random.Random(7)
    lost = {i for i in range(len(packets)) if rng.random() < 0.10}

    def receive(use_fec: bool) -> npt.NDArray[np.int16]:
        decoder = OpusDecoder()
        out = []
        for i, packet in enumerate(packets):
            if i not in lost:
                out.append(decoder.decode(packet))
            elif use_fec and i + 1 < len(packets) and i + 1 not in lost:
                out.append(decoder.decode_fec(packets[i + 1]))
            else:
                out.append(decoder.decode(None))
        return np.concatenate(out)

    with_plc = pesq_wb(speech, receive(use_fec=False))
    with_fec = pesq_wb(speech, receive(use_fec=True))
    assert with_fec > with_plc + 0.4, (with_plc, with_fec)


def test_decode_fec_without_fec_data_still_gives_a_frame(speech: npt.NDArray[np.int16]) -> None:
    encoder = OpusEncoder(OpusConfig(fec=False))
    packets = [encoder.encode(frame) for frame in frames_of(speech)[:20]]
    decoder = OpusDecoder()
    decoder.decode(packets[0])
    assert decoder.decode_fec(packets[2]).shape == (FRAME_SAMPLES,)


@pytest.mark.parametrize(
    "frame",
    [
        np.zeros(FRAME_SAMPLES, dtype=np.float32),
        np.zeros(FRAME_SAMPLES, dtype=np.int32),
        np.zeros(FRAME_SAMPLES - 1, dtype=np.int16),
        np.zeros(2 * FRAME_SAMPLES, dtype=np.int16),
        np.zeros((FRAME_SAMPLES, 2), dtype=np.int16),
        [0] * FRAME_SAMPLES,
        b"\x00" * 2 * FRAME_SAMPLES,
    ],
    ids=["float32", "int32", "short", "long", "stereo", "list", "bytes"],
)
def test_encoder_rejects_wrong_frames(frame: object) -> None:
    with pytest.raises(CodecError, match="frame must be"):
        OpusEncoder().encode(frame)  # type: ignore[arg-type]


def test_encoder_accepts_non_contiguous_frames() -> None:
    stereo = np.zeros((FRAME_SAMPLES, 2), dtype=np.int16)
    assert OpusEncoder().encode(stereo[:, 0])


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        b"\xff",  # code-3 TOC with no frame count byte
        b"\x0b\xff\xff",  # code-3, frame count byte says 63 frames: far too long
        b"\x4b\x00\x00",  # code 3 with zero frames
        b"\x01" + b"\xff" * 3,  # code 1 (two equal frames) with an odd payload length
        b"\x00" * 2000,  # longer than any Opus packet
        b"\x48",  # SILK WB 20 ms TOC, no payload: valid (decodes to a concealed frame)
    ],
)
def test_decoder_never_crashes_on_bad_packets(packet: bytes) -> None:
    decoder = OpusDecoder()
    try:
        frame = decoder.decode(packet)
    except CorruptPacketError:
        return
    assert frame.shape == (FRAME_SAMPLES,)


def test_corrupt_packet_is_a_codec_error_and_a_remote_error() -> None:
    with pytest.raises(CodecError) as info:
        OpusDecoder().decode(b"\xff")
    assert isinstance(info.value, RemoteError)
    assert isinstance(info.value, LocalError)


def test_packet_of_the_wrong_duration_is_refused() -> None:
    # TOC config 10 = SILK-only WB 40 ms: decodes to 640 samples, not our 320.
    encoder_48k_style = bytes([10 << 3]) + b"\x00" * 10
    with pytest.raises(CorruptPacketError, match="20 ms"):
        OpusDecoder().decode(encoder_48k_style)


def test_random_bytes_only_ever_raise_codec_error() -> None:
    rng = random.Random(1)
    decoder = OpusDecoder()
    for _ in range(2000):
        packet = rng.randbytes(rng.randint(1, 80))
        try:
            frame = decoder.decode(packet)
            assert frame.shape == (FRAME_SAMPLES,)
            decoder.decode_fec(packet)
        except CorruptPacketError:
            pass


def test_decoder_rejects_non_bytes() -> None:
    with pytest.raises(CodecError, match="must be bytes"):
        OpusDecoder().decode("hello")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "config",
    [
        {"bitrate": 100},
        {"bitrate": 1_000_000},
        {"complexity": 11},
        {"complexity": -1},
        {"expected_loss_pct": 101},
    ],
)
def test_bad_config_is_refused_at_construction(config: dict[str, int]) -> None:
    with pytest.raises(CodecError):
        OpusConfig(**config)  # type: ignore[arg-type]


def test_dtx_shrinks_silence_to_tiny_packets() -> None:
    encoder = OpusEncoder(OpusConfig(dtx=True))
    silence = np.zeros(FRAME_SAMPLES, dtype=np.int16)
    sizes = [len(encoder.encode(silence)) for _ in range(50)]
    assert min(sizes[10:]) <= 2
