"""How good does a call sound: time alignment and PESQ (ITU-T P.862.2, wideband).

A call path delays audio (codec look-ahead, jitter buffer, network) by an amount nobody knows
in advance, and PESQ's own alignment only searches a limited window, so `align` first finds the
lag by cross-correlation over up to `max_lag_s` and cuts both signals to their overlap.
`pesq_wb` then scores the degraded signal against the reference on the MOS-LQO scale
(about 1.0 = bad to 4.64 = identical). The PESQ implementation is the `pesq` package, a wrapper
around the ITU reference C code; scores are comparable with published figures.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import soxr  # type: ignore[import-untyped]
from pesq import PesqError, pesq  # type: ignore[import-untyped]
from scipy import signal  # type: ignore[import-untyped]

from punchline.errors import LocalError

PESQ_RATE = 16000  # P.862.2 wideband is defined at 16 kHz
# P.862 needs at least a quarter second of audio to find utterances in.
_MIN_PESQ_SECONDS = 0.25

_R = TypeVar("_R", bound=np.generic)
_D = TypeVar("_D", bound=np.generic)


class QualityError(LocalError):
    """Signals that cannot be aligned or scored (empty, silent, too short, wrong shape)."""


def align(
    reference: npt.NDArray[_R],
    degraded: npt.NDArray[_D],
    rate: int = 16000,
    max_lag_s: float = 2.0,
) -> tuple[int, npt.NDArray[_R], npt.NDArray[_D]]:
    """Find how late `degraded` is and return (lag, reference part, degraded part).

    `lag` is in samples: positive when `degraded` lags behind `reference`, i.e.
    ``degraded[n + lag] ~ reference[n]``. The two returned slices of the inputs (dtypes kept)
    are the overlapping stretch, of equal length. The lag is the peak of the FFT
    cross-correlation within +-`max_lag_s`; with no correlation at all (e.g. silence) it is 0.
    """
    _check_signal(reference, "reference")
    _check_signal(degraded, "degraded")
    if rate <= 0 or max_lag_s < 0:
        raise QualityError(f"need rate > 0 and max_lag_s >= 0, got {rate} and {max_lag_s}")
    ref = reference.astype(np.float64)
    deg = degraded.astype(np.float64)
    corr = signal.correlate(deg - deg.mean(), ref - ref.mean(), mode="full", method="fft")
    lags = signal.correlation_lags(len(deg), len(ref), mode="full")
    max_lag = round(max_lag_s * rate)
    window = np.abs(lags) <= max_lag
    lag = int(lags[window][np.argmax(corr[window])]) if np.any(corr[window] > 0) else 0
    if lag >= 0:
        ref_part, deg_part = reference, degraded[lag:]
    else:
        ref_part, deg_part = reference[-lag:], degraded
    n = min(len(ref_part), len(deg_part))
    return lag, ref_part[:n], deg_part[:n]


def pesq_wb(reference: np.ndarray, degraded: np.ndarray, rate: int = 16000) -> float:
    """Wideband PESQ (MOS-LQO) of `degraded` against `reference`, after `align`.

    Signals at another `rate` are resampled to 16 kHz first, since P.862.2 is defined there.
    """
    _check_signal(reference, "reference")
    _check_signal(degraded, "degraded")
    ref = reference.astype(np.float64)
    deg = degraded.astype(np.float64)
    if rate != PESQ_RATE:
        if rate <= 0:
            raise QualityError(f"sample rate must be positive, got {rate}")
        ref = soxr.resample(ref, rate, PESQ_RATE)
        deg = soxr.resample(deg, rate, PESQ_RATE)
    _lag, ref, deg = align(ref, deg, PESQ_RATE)
    if len(ref) < _MIN_PESQ_SECONDS * PESQ_RATE:
        raise QualityError(
            f"only {len(ref) / PESQ_RATE:.2f} s of the two signals overlap; PESQ needs at "
            f"least {_MIN_PESQ_SECONDS} s"
        )
    if not np.any(ref) or not np.any(deg):
        raise QualityError("PESQ cannot score silence: one of the signals is all zeros")
    try:
        score: Any = pesq(PESQ_RATE, ref, deg, "wb")
    except PesqError as exc:  # e.g. NoUtterancesError: nothing speech-like in the reference
        raise QualityError(f"PESQ could not score these signals: {exc!r}") from exc
    return float(score)


def _check_signal(x: object, name: str) -> None:
    if not isinstance(x, np.ndarray) or x.ndim != 1:
        found = f"shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise QualityError(f"{name} must be a 1-D numpy array, got {found}")
    if x.size == 0:
        raise QualityError(f"{name} is empty")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise QualityError(f"{name} must hold real numbers, got dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise QualityError(f"{name} holds NaN or infinite values")
