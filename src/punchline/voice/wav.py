"""WAV files in and out of punchline's one voice format, and frame sources and sinks over them.

`read_wav` accepts what people actually have lying around (any PCM WAV: 8/16/24/32-bit
integer or 32/64-bit float, any channel count, any sample rate, WAVE_FORMAT_EXTENSIBLE too) and
returns 16 kHz mono int16, so nothing past this module ever sees another format. The RIFF
parser is our own rather than the standard `wave` module because on Python 3.11 `wave` refuses
float and WAVE_FORMAT_EXTENSIBLE files, and because every way a file can be wrong must end in a
`WavFormatError` that says what was found and what is accepted, never a stray struct.error.
Resampling uses libsoxr (the `soxr` package): a proper band-limited resampler, so a 48 kHz
recording does not alias into the 0-8 kHz band.

`write_wav` writes 16-bit mono PCM atomically (temporary file, fsync, rename) so a reader never
sees half a file. `WavSource`/`SilenceSource` hand out 20 ms frames the way a microphone would;
`WavSink` collects frames the way a loudspeaker would and saves them on `close()`.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import struct
import wave
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Protocol, Self

import numpy as np
import numpy.typing as npt
import soxr  # type: ignore[import-untyped]

from punchline.errors import LocalError
from punchline.util.files import atomic_write
from punchline.voice.codec import FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE

SPEECH_SAMPLE = "speech-16k.wav"

_FORMAT_PCM = 0x0001
_FORMAT_FLOAT = 0x0003
_FORMAT_EXTENSIBLE = 0xFFFE
# The 14 bytes after the 2-byte format tag in a WAVE_FORMAT_EXTENSIBLE sub-format GUID
# (KSDATAFORMAT_SUBTYPE_*: {0000xxxx-0000-0010-8000-00aa00389b71}).
_GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
_ACCEPTED = "accepted: PCM WAV with 8/16/24/32-bit integer or 32/64-bit float samples"
_COMPRESSED_NAMES = {
    0x0002: "Microsoft ADPCM",
    0x0006: "A-law",
    0x0007: "mu-law",
    0x0011: "IMA ADPCM",
    0x0031: "GSM 6.10",
    0x0050: "MPEG",
    0x0055: "MP3",
    0x0161: "WMA",
    0x1610: "AAC",
    0x704F: "Opus",
}
_OTHER_CONTAINERS = {
    b"OggS": "an Ogg file (Vorbis/Opus)",
    b"fLaC": "a FLAC file",
    b"ID3": "an MP3 file",
    b"\xff\xfb": "an MP3 file",
    b"\xff\xf3": "an MP3 file",
    b"FORM": "an AIFF file",
    b"RIFX": "a big-endian WAV (RIFX)",
    b"RF64": "an RF64 WAV (over 4 GiB)",
    b"\x1aE\xdf\xa3": "a Matroska/WebM file",
}
_MAX_RATE = 1_000_000
_MAX_CHANNELS = 256


class WavFormatError(LocalError):
    """A file is not a WAV we can read, or samples cannot be written as one."""


def read_wav(path: Path, rate: int = SAMPLE_RATE) -> npt.NDArray[np.int16]:
    """Read any PCM WAV and return it as mono int16 at `rate` Hz.

    Channels are averaged (a stereo call recording becomes both talkers at once, which is what
    a mono listener would hear); the sample rate is converted with libsoxr.
    """
    _check_rate(rate)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise WavFormatError(f"cannot read {path}: {exc.strerror or exc}") from exc
    samples, file_rate = _decode_untrusted(data, str(path))
    if file_rate != rate:
        samples = soxr.resample(samples, file_rate, rate, quality="HQ")
    return _to_int16(samples)


def write_wav(path: Path, samples: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    """Write int16 mono samples as a 16-bit PCM WAV, atomically (old file or new, never half)."""
    _check_rate(rate)
    pcm = _check_samples(samples, "samples to write")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.astype("<i2", copy=False).tobytes())
    try:
        atomic_write(Path(path), buffer.getvalue(), mode=0o644)
    except OSError as exc:
        raise WavFormatError(f"cannot write {path}: {exc.strerror or exc}") from exc


_asset_files = contextlib.ExitStack()
atexit.register(_asset_files.close)


def speech_sample() -> Path:
    """The ~10 s English speech sample punchline ships (16 kHz mono 16-bit), as a file path."""
    resource = resources.files("punchline.assets").joinpath(SPEECH_SAMPLE)
    if isinstance(resource, Path):
        return resource
    # Installed inside a zip: extract once, keep it until the interpreter exits.
    return _asset_files.enter_context(resources.as_file(resource))


class FrameSource(Protocol):
    """Anything that hands out 20 ms frames like a microphone: `read()` once per tick."""

    @property
    def exhausted(self) -> bool:
        """True once the source has nothing more to say (a microphone never is)."""
        ...

    def read(self) -> npt.NDArray[np.int16]:
        """The next frame: int16, shape (320,); silence once exhausted."""
        ...


class WavSource:
    """A WAV file played as 20 ms frames, the last one zero-padded, then silence.

    Iterating yields the file's frames and stops; `read()` keeps returning silence after the
    end, so a call pipeline can treat a file like a microphone that went quiet.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._samples = read_wav(self.path, SAMPLE_RATE)
        self._pos = 0

    @classmethod
    def from_samples(cls, samples: np.ndarray) -> WavSource:
        """A source over samples already in memory (int16 mono 16 kHz), e.g. in tests."""
        source = cls.__new__(cls)
        source.path = Path("<memory>")
        source._samples = _check_samples(samples, "source samples").copy()
        source._pos = 0
        return source

    @property
    def exhausted(self) -> bool:
        return self._pos >= len(self._samples)

    @property
    def frames_total(self) -> int:
        """How many frames the file yields, the padded last one included."""
        return -(-len(self._samples) // FRAME_SAMPLES)

    def read(self) -> npt.NDArray[np.int16]:
        frame = np.zeros(FRAME_SAMPLES, dtype=np.int16)
        chunk = self._samples[self._pos : self._pos + FRAME_SAMPLES]
        frame[: len(chunk)] = chunk
        self._pos += FRAME_SAMPLES
        return frame

    def __iter__(self) -> Iterator[npt.NDArray[np.int16]]:
        while not self.exhausted:
            yield self.read()


class SilenceSource:
    """Digital silence, forever or for `frames` frames: a muted microphone, a test's idle side."""

    def __init__(self, frames: int | None = None) -> None:
        if frames is not None and frames < 0:
            raise WavFormatError(f"a silence source needs frames >= 0, got {frames}")
        self._left = frames

    @property
    def exhausted(self) -> bool:
        return self._left is not None and self._left <= 0

    def read(self) -> npt.NDArray[np.int16]:
        if self._left is not None and self._left > 0:
            self._left -= 1
        return np.zeros(FRAME_SAMPLES, dtype=np.int16)

    def __iter__(self) -> Iterator[npt.NDArray[np.int16]]:
        while not self.exhausted:
            yield self.read()


class WavSink:
    """Collects played-out frames in memory and writes them as one WAV on `close()`.

    Frames are written in the order they are given: the sink is a loudspeaker, not a
    reorderer; lateness and loss are the jitter buffer's business upstream.
    """

    def __init__(self, path: Path, rate: int = SAMPLE_RATE) -> None:
        _check_rate(rate)
        self.path = Path(path)
        self.rate = rate
        self._frames: list[npt.NDArray[np.int16]] = []
        self._closed = False

    @property
    def frames_written(self) -> int:
        return len(self._frames)

    @property
    def samples(self) -> npt.NDArray[np.int16]:
        """Everything written so far, concatenated."""
        if not self._frames:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate(self._frames)

    def write(self, frame: np.ndarray) -> None:
        """Append one frame (int16 mono; normally 320 samples, any length is kept as given)."""
        if self._closed:
            raise WavFormatError(f"{self.path}: write() after close()")
        self._frames.append(_check_samples(frame, "a frame").copy())

    def close(self) -> None:
        """Write the file (once; later calls do nothing)."""
        if self._closed:
            return
        self._closed = True
        write_wav(self.path, self.samples, self.rate)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- parsing ----------------------------------------------------------------------------------


def _decode_untrusted(data: bytes, name: str) -> tuple[npt.NDArray[np.float64], int]:
    """Parse a RIFF/WAVE file into mono float samples in [-1, 1] and its sample rate."""
    if not data:
        raise WavFormatError(f"{name} is empty (0 bytes); expected a RIFF/WAVE file. {_ACCEPTED}")
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        found = next((v for k, v in _OTHER_CONTAINERS.items() if data.startswith(k)), None)
        what = found or f"a file starting with {data[:12]!r}"
        raise WavFormatError(f"{name} is not a WAV file: it is {what}. {_ACCEPTED}")
    fmt: tuple[int, int, int, int, int] | None = None
    pos = 12
    while pos + 8 <= len(data):
        chunk_id, size = struct.unpack_from("<4sI", data, pos)
        body_start = pos + 8
        body = data[body_start : body_start + size]
        if chunk_id == b"fmt ":
            fmt = _parse_fmt(body, name)
        elif chunk_id == b"data":
            if fmt is None:
                raise WavFormatError(f"{name}: the data chunk comes before any fmt chunk")
            # Streaming writers leave the size at 0 or 0xFFFFFFFF, and cut files end early:
            # take what is there, whole sample frames only.
            if size == 0 or body_start + size > len(data):
                body = data[body_start:]
            return _decode_samples(body, fmt, name), fmt[1]
        pos = body_start + size + (size & 1)
    if fmt is None:
        raise WavFormatError(f"{name}: a RIFF/WAVE file with no fmt chunk (truncated?)")
    raise WavFormatError(f"{name}: a RIFF/WAVE file with no data chunk (truncated?)")


def _parse_fmt(body: bytes, name: str) -> tuple[int, int, int, int, int]:
    """(format tag, rate, channels, bits per sample, block align), checked."""
    if len(body) < 16:
        raise WavFormatError(f"{name}: fmt chunk of {len(body)} bytes, need at least 16")
    tag, channels, rate, _byte_rate, block_align, bits = struct.unpack_from("<HHIIHH", body)
    if tag == _FORMAT_EXTENSIBLE:
        if len(body) < 40 or body[26:40] != _GUID_TAIL:
            raise WavFormatError(
                f"{name}: WAVE_FORMAT_EXTENSIBLE with an unknown sub-format. {_ACCEPTED}"
            )
        (tag,) = struct.unpack_from("<H", body, 24)
    if tag not in (_FORMAT_PCM, _FORMAT_FLOAT):
        label = _COMPRESSED_NAMES.get(tag, "an unknown encoding")
        raise WavFormatError(
            f"{name}: WAV format tag 0x{tag:04x} ({label}) is not plain PCM; {_ACCEPTED}"
        )
    accepted_bits = (8, 16, 24, 32) if tag == _FORMAT_PCM else (32, 64)
    kind = "integer PCM" if tag == _FORMAT_PCM else "float"
    if bits not in accepted_bits:
        raise WavFormatError(f"{name}: {bits}-bit {kind} samples are not supported; {_ACCEPTED}")
    if not 1 <= channels <= _MAX_CHANNELS:
        raise WavFormatError(f"{name}: {channels} channels; expected 1..{_MAX_CHANNELS}")
    if not 1 <= rate <= _MAX_RATE:
        raise WavFormatError(f"{name}: sample rate {rate} Hz; expected 1..{_MAX_RATE} Hz")
    if block_align != channels * bits // 8:
        raise WavFormatError(
            f"{name}: block align {block_align} does not match {channels} channels of "
            f"{bits}-bit samples ({channels * bits // 8} bytes)"
        )
    return tag, rate, channels, bits, block_align


def _decode_samples(
    body: bytes, fmt: tuple[int, int, int, int, int], name: str
) -> npt.NDArray[np.float64]:
    tag, _rate, channels, bits, block_align = fmt
    frames = len(body) // block_align
    if frames == 0:
        raise WavFormatError(f"{name}: a WAV file with no audio samples in it")
    raw = body[: frames * block_align]
    x: npt.NDArray[np.float64]
    if tag == _FORMAT_FLOAT:
        floats = np.frombuffer(raw, dtype="<f4" if bits == 32 else "<f8").astype(np.float64)
        x = np.clip(np.nan_to_num(floats, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
    elif bits == 8:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0
    elif bits == 16:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float64) / 32768.0
    elif bits == 24:
        triplets = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        packed = triplets[:, 0] | (triplets[:, 1] << 8) | (triplets[:, 2] << 16)
        x = ((packed << 8) >> 8).astype(np.float64) / 8388608.0  # sign-extend 24 -> 32 bits
    else:
        x = np.frombuffer(raw, dtype="<i4").astype(np.float64) / 2147483648.0
    mono: npt.NDArray[np.float64] = x.reshape(frames, channels).mean(axis=1)
    return mono


def _to_int16(x: npt.NDArray[np.float64]) -> npt.NDArray[np.int16]:
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


def _check_rate(rate: int) -> None:
    if not isinstance(rate, int) or not 1 <= rate <= _MAX_RATE:
        raise WavFormatError(f"sample rate must be an integer 1..{_MAX_RATE} Hz, got {rate!r}")


def _check_samples(samples: object, what: str) -> npt.NDArray[np.int16]:
    if not isinstance(samples, np.ndarray) or samples.dtype != np.int16 or samples.ndim != 1:
        found = (
            f"dtype {samples.dtype}, shape {samples.shape}"
            if isinstance(samples, np.ndarray)
            else type(samples).__name__
        )
        raise WavFormatError(f"{what} must be a 1-D int16 numpy array, got {found}")
    return samples


__all__ = [
    "FRAME_MS",
    "FRAME_SAMPLES",
    "SAMPLE_RATE",
    "FrameSource",
    "SilenceSource",
    "WavFormatError",
    "WavSink",
    "WavSource",
    "read_wav",
    "speech_sample",
    "write_wav",
]
