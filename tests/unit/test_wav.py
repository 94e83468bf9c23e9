"""WAV in and out: every PCM flavour becomes 16 kHz mono int16; bad files say what they are."""

from __future__ import annotations

import struct
import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from punchline.voice.wav import (
    FRAME_SAMPLES,
    SilenceSource,
    WavFormatError,
    WavSink,
    WavSource,
    read_wav,
    speech_sample,
    write_wav,
)

PCM, FLOAT, EXTENSIBLE = 1, 3, 0xFFFE


def riff(chunks: list[tuple[bytes, bytes]]) -> bytes:
    body = b"WAVE"
    for chunk_id, data in chunks:
        body += chunk_id + struct.pack("<I", len(data)) + data + (b"\x00" if len(data) % 2 else b"")
    return b"RIFF" + struct.pack("<I", len(body)) + body


def fmt_chunk(tag: int, channels: int, rate: int, bits: int, extensible_tag: int = 0) -> bytes:
    align = channels * bits // 8
    data = struct.pack("<HHIIHH", tag, channels, rate, rate * align, align, bits)
    if tag == EXTENSIBLE:
        guid = (
            struct.pack("<H", extensible_tag)
            + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        )
        data += struct.pack("<HHI", 22, bits, 0) + guid
    return data


def encode(x: npt.NDArray[np.float64], tag: int, bits: int) -> bytes:
    """Interleaved float samples in [-1, 1] -> little-endian sample bytes."""
    if tag == FLOAT:
        return x.astype("<f4" if bits == 32 else "<f8").tobytes()
    if bits == 8:
        return np.clip(np.round(x * 127 + 128), 0, 255).astype(np.uint8).tobytes()
    if bits == 24:
        ints = np.round(x * 8388607).astype("<i4")
        return ints.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    dtype = "<i2" if bits == 16 else "<i4"
    data: bytes = np.round(x * (2 ** (bits - 1) - 1)).astype(dtype).tobytes()
    return data


def make_wav(
    path: Path,
    x: npt.NDArray[np.float64],
    rate: int,
    *,
    tag: int = PCM,
    bits: int = 16,
    extensible_tag: int = 0,
) -> Path:
    channels = 1 if x.ndim == 1 else x.shape[1]
    real_tag = extensible_tag if tag == EXTENSIBLE else tag
    data = encode(x.reshape(-1), real_tag, bits)
    path.write_bytes(
        riff([(b"fmt ", fmt_chunk(tag, channels, rate, bits, extensible_tag)), (b"data", data)])
    )
    return path


def sine(freq: float, rate: int, seconds: float = 1.0, amp: float = 0.5) -> npt.NDArray[np.float64]:
    t = np.arange(int(rate * seconds)) / rate
    return amp * np.sin(2 * np.pi * freq * t)


def peak_hz(x: npt.NDArray[np.int16], rate: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)])


# --- round trip and conversions -----------------------------------------------------------------


def test_write_read_round_trip_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    samples = rng.integers(-32768, 32767, 16000, dtype=np.int16, endpoint=True)
    write_wav(tmp_path / "a.wav", samples)
    assert np.array_equal(read_wav(tmp_path / "a.wav"), samples)
    with wave.open(str(tmp_path / "a.wav")) as w:  # a plain 16-bit mono WAV others can read
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "out.wav"
    write_wav(target, np.zeros(10, dtype=np.int16))
    write_wav(target, np.ones(20, dtype=np.int16))
    assert len(read_wav(target)) == 20
    assert [p.name for p in tmp_path.iterdir()] == ["out.wav"]


@pytest.mark.parametrize(
    ("tag", "bits"),
    [(PCM, 8), (PCM, 16), (PCM, 24), (PCM, 32), (FLOAT, 32), (FLOAT, 64)],
)
@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_formats_and_rates_keep_a_sine(tmp_path: Path, tag: int, bits: int, rate: int) -> None:
    path = make_wav(tmp_path / "s.wav", sine(1000.0, rate), rate, tag=tag, bits=bits)
    out = read_wav(path)
    assert out.dtype == np.int16
    assert abs(len(out) - 16000) <= 1
    assert abs(peak_hz(out) - 1000.0) <= 2.0
    # Level preserved: amplitude 0.5 of full scale.
    assert 0.45 * 32768 < np.max(np.abs(out[100:-100])) < 0.55 * 32768


def test_24_bit_negative_values_sign_extend(tmp_path: Path) -> None:
    x = np.array([-1.0, -0.5, 0.0, 0.5, 1.0] * 100)
    out = read_wav(make_wav(tmp_path / "s.wav", x, 16000, bits=24))
    assert list(out[:5]) == [-32768, -16384, 0, 16384, 32767]


def test_stereo_becomes_the_mean_of_channels(tmp_path: Path) -> None:
    left, right = sine(440.0, 48000), sine(2500.0, 48000)
    out = read_wav(make_wav(tmp_path / "s.wav", np.stack([left, right], axis=1), 48000))
    spectrum = np.abs(np.fft.rfft(out.astype(np.float64)))
    freqs = np.fft.rfftfreq(len(out), 1 / 16000)
    top_two = sorted(freqs[np.argsort(spectrum)[-2:]])
    assert top_two == pytest.approx([440.0, 2500.0], abs=2.0)


def test_high_frequencies_do_not_alias_when_downsampling(tmp_path: Path) -> None:
    # 12 kHz is above the 8 kHz Nyquist of the output: a real resampler removes it instead of
    # folding it to 4 kHz.
    out = read_wav(make_wav(tmp_path / "s.wav", sine(12000.0, 48000), 48000))
    assert np.max(np.abs(out[200:-200])) < 0.01 * 32768


def test_extensible_pcm_and_float(tmp_path: Path) -> None:
    for sub, bits in ((PCM, 24), (FLOAT, 32)):
        path = make_wav(
            tmp_path / "e.wav",
            sine(700.0, 44100),
            44100,
            tag=EXTENSIBLE,
            bits=bits,
            extensible_tag=sub,
        )
        assert abs(peak_hz(read_wav(path)) - 700.0) <= 2.0


def test_other_chunks_and_odd_sizes_are_skipped(tmp_path: Path) -> None:
    samples = (np.arange(100) * 100).astype("<i2")
    data = riff(
        [
            (b"LIST", b"INFOabc"),  # odd length: padded
            (b"fmt ", fmt_chunk(PCM, 1, 16000, 16)),
            (b"junk", b"x" * 10),
            (b"data", samples.tobytes()),
        ]
    )
    (tmp_path / "c.wav").write_bytes(data)
    assert np.array_equal(read_wav(tmp_path / "c.wav"), samples)


def test_streaming_writer_sizes_are_tolerated(tmp_path: Path) -> None:
    samples = (np.arange(100) * 100).astype("<i2")
    good = riff([(b"fmt ", fmt_chunk(PCM, 1, 16000, 16)), (b"data", samples.tobytes())])
    streamed = bytearray(good)
    streamed[4:8] = b"\xff\xff\xff\xff"
    size_at = good.index(b"data") + 4
    streamed[size_at : size_at + 4] = b"\xff\xff\xff\xff"  # the data chunk's size field
    (tmp_path / "s.wav").write_bytes(bytes(streamed) + b"\x01")  # and a partial frame
    assert np.array_equal(read_wav(tmp_path / "s.wav"), samples)


def test_read_at_another_rate(tmp_path: Path) -> None:
    path = make_wav(tmp_path / "s.wav", sine(1000.0, 16000), 16000)
    out = read_wav(path, rate=8000)
    assert len(out) == 8000
    assert abs(peak_hz(out, 8000) - 1000.0) <= 2.0


# --- malformed files ------------------------------------------------------------------------------


def malformed() -> list[tuple[str, bytes, str]]:
    fmt16 = fmt_chunk(PCM, 1, 16000, 16)
    return [
        ("empty", b"", "empty"),
        ("text", b"hello, this is not audio at all", "not a WAV"),
        ("ogg", b"OggS\x00\x02" + b"\x00" * 40, "Ogg"),
        ("mp3", b"ID3\x04\x00" + b"\x00" * 40, "MP3"),
        ("flac", b"fLaC" + b"\x00" * 40, "FLAC"),
        ("riff-avi", b"RIFF\x10\x00\x00\x00AVI LIST", "not a WAV"),
        ("header-only", b"RIFF\x04\x00\x00\x00WAVE", "no fmt chunk"),
        ("no-data", riff([(b"fmt ", fmt16)]), "no data chunk"),
        ("data-first", riff([(b"data", b"\x00\x00"), (b"fmt ", fmt16)]), "before any fmt"),
        ("short-fmt", riff([(b"fmt ", fmt16[:10]), (b"data", b"\x00\x00")]), "fmt chunk of 10"),
        ("alaw", riff([(b"fmt ", fmt_chunk(6, 1, 8000, 8)), (b"data", b"\x00")]), "A-law"),
        ("mulaw", riff([(b"fmt ", fmt_chunk(7, 1, 8000, 8)), (b"data", b"\x00")]), "mu-law"),
        ("adpcm", riff([(b"fmt ", fmt_chunk(2, 1, 8000, 4)), (b"data", b"\x00")]), "ADPCM"),
        ("mp3-in-wav", riff([(b"fmt ", fmt_chunk(0x55, 1, 8000, 0)), (b"data", b"\x00")]), "MP3"),
        ("12-bit", riff([(b"fmt ", fmt_chunk(PCM, 1, 8000, 12)), (b"data", b"\x00")]), "12-bit"),
        (
            "float16",
            riff([(b"fmt ", fmt_chunk(FLOAT, 1, 8000, 16)), (b"data", b"\x00")]),
            "16-bit float",
        ),
        (
            "no-channels",
            riff([(b"fmt ", fmt_chunk(PCM, 0, 8000, 16)), (b"data", b"\x00")]),
            "0 channels",
        ),
        (
            "zero-rate",
            riff([(b"fmt ", fmt_chunk(PCM, 1, 0, 16)), (b"data", b"\x00\x00")]),
            "sample rate 0",
        ),
        ("no-samples", riff([(b"fmt ", fmt16), (b"data", b"")]), "no audio samples"),
        ("half-sample", riff([(b"fmt ", fmt16), (b"data", b"\x01")]), "no audio samples"),
        (
            "bad-align",
            riff([(b"fmt ", fmt16[:12] + struct.pack("<HH", 3, 16)), (b"data", b"\x00" * 6)]),
            "block align",
        ),
        (
            "ext-unknown",
            riff(
                [
                    (b"fmt ", fmt_chunk(EXTENSIBLE, 1, 8000, 16, 1)[:-1] + b"\x00"),
                    (b"data", b"\x00\x00"),
                ]
            ),
            "EXTENSIBLE",
        ),
    ]


@pytest.mark.parametrize(
    ("data", "message"), [(d, m) for _n, d, m in malformed()], ids=[n for n, _d, _m in malformed()]
)
def test_malformed_files_raise_wav_format_error(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "bad.wav"
    path.write_bytes(data)
    with pytest.raises(WavFormatError, match=message) as info:
        read_wav(path)
    assert "bad.wav" in str(info.value)


def test_unreadable_paths(tmp_path: Path) -> None:
    with pytest.raises(WavFormatError, match="cannot read"):
        read_wav(tmp_path / "missing.wav")
    with pytest.raises(WavFormatError, match="cannot read"):
        read_wav(tmp_path)  # a directory


def test_truncations_and_bit_flips_only_raise_wav_format_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    good = riff(
        [
            (b"fmt ", fmt_chunk(EXTENSIBLE, 2, 44100, 24, PCM)),
            (b"data", encode(sine(300.0, 44100, 0.05), PCM, 24) * 2),
        ]
    )
    path = tmp_path / "fuzz.wav"
    for i in range(300):
        data = bytearray(good[: int(rng.integers(0, len(good)))] if i % 2 else good)
        for _ in range(int(rng.integers(1, 4))):
            if data:
                data[int(rng.integers(0, min(len(data), 90)))] = int(rng.integers(0, 256))
        path.write_bytes(bytes(data))
        try:
            out = read_wav(path)
        except WavFormatError:
            continue
        assert out.dtype == np.int16


@pytest.mark.parametrize(
    "samples",
    [np.zeros(10, dtype=np.float32), np.zeros((10, 2), dtype=np.int16), [0, 1, 2]],
    ids=["float", "2-D", "list"],
)
def test_write_refuses_other_than_mono_int16(tmp_path: Path, samples: object) -> None:
    with pytest.raises(WavFormatError, match="1-D int16"):
        write_wav(tmp_path / "x.wav", samples)  # type: ignore[arg-type]


def test_write_to_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(WavFormatError, match="cannot write"):
        write_wav(tmp_path / "nope" / "x.wav", np.zeros(10, dtype=np.int16))


# --- sources and sinks --------------------------------------------------------------------------


def test_wav_source_yields_padded_frames_then_silence(tmp_path: Path) -> None:
    samples = np.arange(1, 2 * FRAME_SAMPLES + 11, dtype=np.int16)
    write_wav(tmp_path / "s.wav", samples)
    source = WavSource(tmp_path / "s.wav")
    assert source.frames_total == 3
    exhausted_at_start = source.exhausted
    assert not exhausted_at_start
    frames = list(source)
    assert len(frames) == 3
    assert source.exhausted
    assert all(f.shape == (FRAME_SAMPLES,) and f.dtype == np.int16 for f in frames)
    assert np.array_equal(np.concatenate(frames)[: len(samples)], samples)
    assert not np.any(frames[-1][10:])  # zero-padded
    assert not np.any(source.read())  # silence after the end


def test_silence_source() -> None:
    endless = SilenceSource()
    assert not np.any(endless.read())
    assert endless.exhausted is False
    three = SilenceSource(frames=3)
    assert len(list(three)) == 3
    assert three.exhausted
    assert three.read().shape == (FRAME_SAMPLES,)


def test_sink_writes_frames_in_order_on_close(tmp_path: Path) -> None:
    frames = [np.full(FRAME_SAMPLES, i, dtype=np.int16) for i in range(5)]
    with WavSink(tmp_path / "out.wav") as sink:
        for frame in frames:
            sink.write(frame)
        assert not (tmp_path / "out.wav").exists()  # nothing until close
    assert sink.frames_written == 5
    assert np.array_equal(read_wav(tmp_path / "out.wav"), np.concatenate(frames))
    with pytest.raises(WavFormatError, match="after close"):
        sink.write(frames[0])


def test_source_to_sink_is_lossless(tmp_path: Path) -> None:
    source = WavSource(speech_sample())
    sink = WavSink(tmp_path / "copy.wav")
    for frame in source:
        sink.write(frame)
    sink.close()
    original = read_wav(speech_sample())
    assert np.array_equal(read_wav(tmp_path / "copy.wav")[: len(original)], original)


def test_speech_sample_is_shipped_as_16k_mono() -> None:
    path = speech_sample()
    assert path.is_file()
    assert path.stat().st_size < 400_000
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
        assert 6.0 <= w.getnframes() / 16000 <= 10.0
