"""Exponential back-off after repeated failures, keyed by account or source address.

A sans-I/O core: the caller passes `now`. After `free_failures` failures under one key, each
further attempt must wait `base_delay * 2**k` seconds (capped at `max_delay`) after the last
failure. A success resets the key. Back-off rather than a hard lock-out, so that an attacker who
hammers someone's account slows guessing to a crawl without locking the real user out for long.
Memory is bounded: past `max_keys` the stalest keys are forgotten first.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class ThrottlePolicy:
    free_failures: int = 5
    base_delay: float = 1.0
    max_delay: float = 900.0
    forget_after: float = 3600.0
    max_keys: int = 100_000


@dataclass
class _Record:
    failures: int
    last: float


class Throttle:
    def __init__(self, policy: ThrottlePolicy) -> None:
        self.policy = policy
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def _delay(self, failures: int) -> float:
        extra = failures - self.policy.free_failures
        if extra < 0:
            return 0.0
        return min(self.policy.max_delay, self.policy.base_delay * math.pow(2, min(extra, 60)))

    def retry_after(self, key: str, now: float) -> float:
        """Seconds the caller must still wait before an attempt under `key`; 0 means go."""
        record = self._records.get(key)
        if record is None:
            return 0.0
        if now - record.last > self.policy.forget_after:
            del self._records[key]
            return 0.0
        return max(0.0, record.last + self._delay(record.failures) - now)

    def failure(self, key: str, now: float) -> None:
        record = self._records.pop(key, None)
        if record is None or now - record.last > self.policy.forget_after:
            record = _Record(0, now)
        record.failures += 1
        record.last = now
        self._records[key] = record
        while len(self._records) > self.policy.max_keys:
            self._records.popitem(last=False)

    def success(self, key: str) -> None:
        self._records.pop(key, None)

    def __len__(self) -> int:
        return len(self._records)
