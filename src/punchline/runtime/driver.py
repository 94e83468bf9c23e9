"""Runs a sans-I/O core on the asyncio loop: wakes it at its timer, flushes what it produced.

The core decides everything; the driver only owns the clock and the one timer handle.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Protocol


class TimedCore(Protocol):
    def next_timer(self) -> float: ...

    def handle_timer(self, now: float) -> None: ...


class Driver:
    def __init__(self, core: TimedCore, flush: Callable[[float], None]) -> None:
        self.core = core
        self._flush = flush
        self._handle: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    @staticmethod
    def now() -> float:
        return time.time()

    def poke(self) -> None:
        """Call after feeding the core anything: sends its output and re-arms the timer."""
        self._flush(self.now())
        self._arm()

    def _arm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        due = self.core.next_timer()
        if math.isinf(due):
            self._handle = None
            return
        delay = max(0.0, due - self.now())
        self._handle = self._loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self.core.handle_timer(self.now())
        self.poke()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
