"""Custody: the re-put schedule that keeps documents alive past OpenDHT's 10-minute expiry, the
rendezvous choice of custodians, and the runner over an in-process overlay."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter

from punchline.overlay.custody import Custody, CustodySchedule, custodians
from punchline.overlay.index import MemoryIndex

T0 = 1_700_000_000.0
DHT_EXPIRY = 600.0


def doc(n: int) -> dict[str, str]:
    return {"payload": str(n), "signature": "s"}


def test_a_kept_document_is_re_put_early_then_well_inside_the_expiry_until_its_own() -> None:
    schedule = CustodySchedule(refresh=240.0, first_refresh=30.0)
    assert schedule.keep("presence/alice", 1, doc(1), T0 + 3 * 3600, T0) is True
    puts = [T0]  # the caller's own put
    now = T0
    while now < T0 + 4 * 3600:
        now = schedule.next_time()
        if now == float("inf"):
            break
        puts += [now for _ in schedule.due(now)]
    gaps = [b - a for a, b in itertools.pairwise(puts)]
    assert 30.0 <= gaps[0] <= 36.0  # early re-put: start-up puts can land nowhere
    assert max(gaps) < DHT_EXPIRY / 2  # one lost re-put still leaves the value alive
    assert min(gaps[1:]) >= 200.0  # but not wastefully often
    assert puts[-1] < T0 + 3 * 3600 <= puts[-1] + DHT_EXPIRY  # alive until its own expiry
    assert len(schedule) == 0  # and then forgotten


def test_keeping_the_same_document_again_needs_no_put_but_a_new_one_does() -> None:
    schedule = CustodySchedule()
    assert schedule.keep("k", 1, doc(1), T0 + 100, T0)
    assert not schedule.keep("k", 1, doc(1), T0 + 200, T0 + 5)
    kept = schedule.get("k", 1)
    assert kept is not None
    assert kept.until == T0 + 200
    assert schedule.keep("k", 1, doc(2), T0 + 200, T0 + 6)  # replaces: one per value id
    assert len(schedule) == 1
    assert schedule.keep("k", 2, doc(2), T0 + 200, T0 + 6)
    assert len(schedule) == 2
    assert not schedule.keep("k", 3, doc(3), T0, T0 + 1)  # already expired: nothing to put


def test_released_documents_are_not_re_put() -> None:
    schedule = CustodySchedule(refresh=10.0, first_refresh=1.0)
    schedule.keep("k", 1, doc(1), T0 + 100, T0)
    schedule.release("k", 1)
    assert schedule.due(T0 + 50) == []
    assert schedule.next_time() == float("inf")


def test_re_puts_of_many_documents_are_spread_out() -> None:
    schedule = CustodySchedule(refresh=240.0, first_refresh=30.0)
    for n in range(1000):
        schedule.keep(f"presence/user{n}", 1, doc(n), T0 + 3600, T0)
    times = sorted(k.next_put for k in schedule._kept.values())
    assert times[-1] - times[0] > 5.0
    per_second = Counter(int(t) for t in times)
    assert max(per_second.values()) < 250


def test_custodians_are_deterministic_distinct_and_move_little_on_churn() -> None:
    nodes = [f"node{n}" for n in range(20)]
    chosen = custodians("presence/alice", nodes, 2)
    assert len(set(chosen)) == 2
    assert set(chosen) <= set(nodes)
    assert custodians("presence/alice", list(reversed(nodes)), 2) == chosen
    assert custodians("presence/alice", nodes[:1], 2) == nodes[:1]
    assert custodians("presence/alice", [], 2) == []
    # a node that is not a custodian leaving changes nothing; a custodian leaving moves one
    others = [n for n in nodes if n not in chosen]
    assert custodians("presence/alice", [n for n in nodes if n != others[0]], 2) == chosen
    after = custodians("presence/alice", [n for n in nodes if n != chosen[0]], 2)
    assert chosen[1] in after
    # keys spread over all nodes
    load = Counter(n for k in range(2000) for n in custodians(f"presence/u{k}", nodes, 2))
    assert set(load) == set(nodes)
    assert max(load.values()) < 2 * (4000 / 20)


def test_the_runner_puts_at_once_re_puts_on_schedule_and_stops_at_expiry() -> None:
    async def main() -> None:
        overlay = MemoryIndex()
        loop = asyncio.get_running_loop()
        start = loop.time()
        custody = Custody(overlay, CustodySchedule(refresh=0.1, first_refresh=0.05),
                          clock=loop.time)  # fmt: skip
        runner = asyncio.ensure_future(custody.run())
        custody.keep("presence/alice", 1, doc(1), start + 0.5)
        custody.keep("presence/bob", 1, doc(2), start + 0.5, put_now=False)
        await asyncio.sleep(0.02)
        assert await overlay.get("presence/alice") == [doc(1)]
        assert await overlay.get("presence/bob") == []
        await asyncio.sleep(0.15)
        assert await overlay.get("presence/bob") == [doc(2)]  # the first re-put
        overlay.drop("presence/alice")  # churn lost every copy
        await asyncio.sleep(0.15)
        assert await overlay.get("presence/alice") == [doc(1)]  # re-put repaired it
        await asyncio.sleep(0.4)
        status = custody.status()
        assert status["held"] == 0
        reputs = status["reputs"]
        assert 4 <= reputs <= 12
        await asyncio.sleep(0.2)
        assert custody.status()["reputs"] == reputs  # nothing after expiry
        runner.cancel()
        custody.close()

    asyncio.run(main())
