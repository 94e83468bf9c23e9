"""The pure helpers of bench/index.py (the bench itself is run by hand, not by the suite)."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "index.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_index", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_index"] = module
    spec.loader.exec_module(module)
    return module


def test_percentile_is_nearest_rank(bench: ModuleType) -> None:
    values = [float(v) for v in range(1, 101)]
    assert bench.percentile(values, 50) == 50.0
    assert bench.percentile(values, 95) == 95.0
    assert bench.percentile(values, 99) == 99.0
    assert bench.percentile(values, 100) == 100.0
    assert bench.percentile([7.0], 99) == 7.0
    assert bench.percentile([], 50) is None
    assert bench.percentile([3.0, 1.0, 2.0], 0) == 1.0


def test_nodes_per_process_reaches_300_dht_nodes(bench: ModuleType) -> None:
    assert bench.nodes_per_process(20, 0) == 15
    assert bench.nodes_per_process(100, 0) == 3
    assert bench.nodes_per_process(7, 0) * 7 >= 300
    assert bench.nodes_per_process(500, 0) == 1
    assert bench.nodes_per_process(20, 4) == 4


def test_victims_are_30_percent_never_all(bench: ModuleType) -> None:
    victims = bench.choose_victims(20, 0.3, random.Random(1))
    assert len(victims) == 6 == len(set(victims))
    assert all(0 <= v < 20 for v in victims)
    assert len(bench.choose_victims(100, 0.3, random.Random(2))) == 30
    assert len(bench.choose_victims(2, 0.3, random.Random(3))) == 1
    assert len(bench.choose_victims(3, 1.0, random.Random(4))) == 2


def test_rehome_spreads_orphans_over_survivors(bench: ModuleType) -> None:
    moved = bench.rehome(range(100), [2, 5, 9, 11])
    assert sorted(moved) == [2, 5, 9, 11]
    assert sorted(u for users in moved.values() for u in users) == list(range(100))
    assert {len(users) for users in moved.values()} == {25}


def test_repair_time_is_the_end_of_the_first_lasting_complete_round(bench: ModuleType) -> None:
    def row(end: float, found: int) -> dict[str, float]:
        return {"end_s": end, "found": found, "probed": 10}

    rounds = [row(3, 7), row(6, 10), row(9, 9), row(12, 10), row(15, 10)]
    assert bench.repair_time(rounds) == 12.0
    assert bench.repair_time(rounds[:3]) is None
    assert bench.repair_time([row(2, 10)]) == 2.0
    assert bench.success_by(rounds, 10) == 0.9
    assert bench.success_by(rounds, 1) is None


def test_pacer_spreads_work_at_the_rate(bench: ModuleType) -> None:
    now = [100.0]
    pacer = bench.Pacer(50.0, clock=lambda: now[0])
    assert pacer.reserve(50) == 0.0  # the first second's worth starts at once
    assert pacer.reserve(50) == 1.0  # the next waits its turn
    now[0] = 105.0  # idle for a while: no credit piles up beyond "now"
    assert pacer.reserve(25) == 0.0
    assert pacer.reserve(25) == 0.5
    assert bench.Pacer(0.0, clock=lambda: now[0]).reserve(10**6) == 0.0
