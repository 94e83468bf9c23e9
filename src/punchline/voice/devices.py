"""The sound card, through PortAudio (`sounddevice`), as a frame source and sink.

The audio callbacks run on PortAudio's own thread: they only move 20 ms frames through
bounded queues, so the event loop never blocks on the device and the device never waits on
the event loop. A full queue drops the oldest audio rather than growing the delay.
Machines without a sound card (servers, CI) get `DeviceUnavailable` with the reason, and the
daemon carries on with silence rather than refusing to start.
"""

from __future__ import annotations

import contextlib
import queue
from typing import Any

import numpy as np
import numpy.typing as npt

from punchline.errors import LocalError
from punchline.voice.codec import FRAME_SAMPLES, SAMPLE_RATE

QUEUE_FRAMES = 10  # 200 ms: beyond this the device side is stalled, drop rather than lag


class DeviceUnavailable(LocalError):
    """No usable sound card (or PortAudio is missing)."""


def _sounddevice() -> Any:
    try:
        import sounddevice  # type: ignore[import-untyped]
    except (ImportError, OSError) as exc:
        raise DeviceUnavailable(
            f"the sound card cannot be used: {exc}. Install Debian's libportaudio2, "
            "or use --play/--record with WAV files"
        ) from exc
    return sounddevice


def _open(kind: str, callback: Any) -> Any:
    sd = _sounddevice()
    stream_class = sd.InputStream if kind == "input" else sd.OutputStream
    try:
        stream = stream_class(samplerate=SAMPLE_RATE, channels=1, dtype="int16",
                              blocksize=FRAME_SAMPLES, callback=callback)  # fmt: skip
        stream.start()
    except Exception as exc:  # PortAudioError and friends: no device, busy device
        raise DeviceUnavailable(f"no usable sound {kind} device: {exc}") from exc
    return stream


def _put_latest(frames: queue.Queue[npt.NDArray[np.int16]], frame: npt.NDArray[np.int16]) -> None:
    while True:
        try:
            frames.put_nowait(frame)
            return
        except queue.Full:
            with contextlib.suppress(queue.Empty):
                frames.get_nowait()


class MicrophoneSource:
    """20 ms frames from the default input device; silence when none is ready yet."""

    exhausted = False

    def __init__(self) -> None:
        self._frames: queue.Queue[npt.NDArray[np.int16]] = queue.Queue(QUEUE_FRAMES)
        self._stream = _open("input", self._callback)

    def _callback(self, indata: Any, _frames: int, _time: Any, _status: Any) -> None:
        _put_latest(self._frames, np.array(indata[:, 0], dtype=np.int16))

    def read(self) -> npt.NDArray[np.int16]:
        try:
            return self._frames.get_nowait()
        except queue.Empty:
            return np.zeros(FRAME_SAMPLES, dtype=np.int16)

    def close(self) -> None:
        self._stream.close()


class SpeakerSink:
    """Plays 20 ms frames on the default output device."""

    def __init__(self) -> None:
        self._frames: queue.Queue[npt.NDArray[np.int16]] = queue.Queue(QUEUE_FRAMES)
        self._stream = _open("output", self._callback)

    def _callback(self, outdata: Any, _frames: int, _time: Any, _status: Any) -> None:
        try:
            outdata[:, 0] = self._frames.get_nowait()
        except queue.Empty:
            outdata.fill(0)

    def write(self, frame: np.ndarray) -> None:
        _put_latest(self._frames, np.asarray(frame, dtype=np.int16))

    def close(self) -> None:
        self._stream.close()
