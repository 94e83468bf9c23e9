"""The global index on OpenDHT at scale: lookups, live presence, churn, cost (issue 7).

N "supernodes" are N processes of bench/index_worker.py, each running K DHT nodes of punchline's
own `overlay.dht.DhtIndex` (K = ceil(300 / N) unless given, so there are always >= 300 DHT
nodes). R users are attached round-robin to the supernodes, which publish their real signed
presence records (`wire.presence.make`, certificates from a throw-away CA). Then:

- lookups: random users looked up from a supernode they are not attached to (a non-contact),
  verified like a supernode does; latency, success, and packets per lookup (loopback counters
  less the idle rate; OpenDHT's own per-node message counters deadlock from Python). On
  loopback latency is CPU, not network, so one more DHT node, the "far node", sits in its own
  namespace behind the lab's link of --delay ms each way: the time until its lookups hear
  their first value, over the 2 x delay round trip, is the number of round trips they needed.
- presence: contacts' supernodes listen on users' keys; the users change status and the time
  until each watcher has the new, verified record is the propagation time.
- churn: 30% of the supernode processes are SIGKILLed at once. Their users' clients re-attach
  to survivors, which republish them (a new sequence number naming the new supernode); probe
  rounds look up a fixed sample until every user is found at its current supernode.
- cost: RSS per supernode process, requests sent per DHT node, and bytes per node on the
  private loopback (the bench runs in its own network namespace when root, so every byte on
  its `lo` is the DHT's).

Two cores simulating 300 supernodes hold far fewer puts per second than 300 machines would, so
the bulk publish (--publish-rate) and the re-attaching clients (--rehome-rate) are paced, and
custody's re-put schedule can be stretched (--custody-first/--custody-refresh, defaults are
custody's own) to keep a 100,000-record run out of the overload where everything times out.
docs/performance.md holds the latest figures. Progress goes to stderr; a table (or one JSON
object with --json) to stdout.

    sudo .venv/bin/python bench/index.py [--supernodes 20,100] [--records 100000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import psutil

from punchline.identity import certs, keys
from punchline.overlay import custody

HERE = Path(__file__).resolve().parent
WORKER = HERE / "index_worker.py"
MIN_DHT_NODES = 300
NETNS_MARK = "PUNCHLINE_BENCH_INDEX_NETNS"
DHT_IP_ENV = "PUNCHLINE_BENCH_INDEX_DHT_IP"
FAR_ENV = "PUNCHLINE_BENCH_INDEX_FAR"  # "namespace,address" of the node behind the delay
NET_DEV = Path("/proc/self/net/dev")  # this process's namespace (/sys shows the mounter's)

Say = Callable[[str], None]


# ---------------------------------------------------------------------- pure helpers


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100): a value that was actually measured."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def nodes_per_process(supernodes: int, wanted: int | None) -> int:
    return wanted if wanted else max(1, math.ceil(MIN_DHT_NODES / supernodes))


def choose_victims(supernodes: int, fraction: float, rng: random.Random) -> list[int]:
    """The supernodes killed together: round(fraction x N) of them, at least one, never all."""
    count = min(supernodes - 1, max(1, round(fraction * supernodes)))
    return sorted(rng.sample(range(supernodes), count))


def rehome(users: Iterable[int], survivors: Sequence[int]) -> dict[int, list[int]]:
    """Where the clients of dead supernodes re-attach: spread evenly over the survivors."""
    moved: dict[int, list[int]] = {}
    for user in users:
        moved.setdefault(survivors[user % len(survivors)], []).append(user)
    return moved


def repair_time(rounds: Sequence[dict[str, Any]]) -> float | None:
    """Seconds from the kill to the end of the first probe round that found every user, if the
    rounds stayed complete from then on."""
    for i, row in enumerate(rounds):
        if all(r["found"] == r["probed"] for r in rounds[i:]):
            return float(row["end_s"])
    return None


def success_by(rounds: Sequence[dict[str, Any]], seconds: float) -> float | None:
    """Success of the last probe round that had ended `seconds` after the kill."""
    done = [r for r in rounds if r["end_s"] <= seconds]
    return done[-1]["found"] / max(1, done[-1]["probed"]) if done else None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


# ---------------------------------------------------------------------- processes


class Pacer:
    """Spreads work at `rate` items per second over everyone who takes from it (0: no limit)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.clock = clock
        self.next = clock()

    def reserve(self, count: int) -> float:
        """Seconds to wait before starting `count` items."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        start = max(now, self.next)
        self.next = start + count / self.rate
        return start - now

    async def take(self, count: int) -> None:
        await asyncio.sleep(self.reserve(count))


class WorkerProcess:
    """One supernode process and its JSON-lines conversation."""

    def __init__(self, index: int, proc: asyncio.subprocess.Process) -> None:
        self.index = index
        self.proc = proc
        self.ports: list[int] = []
        self.alive = True
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, index: int, nodes: int, material: Path, bootstrap: Sequence[str],
                    log_dir: Path, bind: str, custody_args: Sequence[str],
                    far_ns: str | None = None) -> WorkerProcess:  # fmt: skip
        """`far_ns`: the far node, in its own namespace behind the delayed link."""
        prefix = ["ip", "netns", "exec", far_ns] if far_ns else []
        extra = ["--probe", *custody_args] if far_ns else list(custody_args)
        with (log_dir / f"worker{index:03d}.log").open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *prefix, sys.executable, str(WORKER), "--worker", str(index), "--nodes",
                str(nodes), "--ca", str(material), "--bind", bind, *extra,
                "--bootstrap", *bootstrap,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, limit=1 << 24,
            )  # fmt: skip
        worker = cls(index, proc)
        ready = await asyncio.wait_for(worker._ready, 120)
        worker.ports = [int(p) for p in ready["ports"]]
        return worker

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            message = json.loads(line)
            if message.get("ready"):
                self._ready.set_result(message)
                continue
            future = self._waiting.pop(int(message["id"]), None)
            if future is not None and not future.done():
                future.set_result(message)
        self.alive = False
        failure = ConnectionError(f"supernode process {self.index} is gone")
        if not self._ready.done():
            self._ready.set_exception(failure)
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(failure)
        self._waiting.clear()

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        if not self.alive:
            raise ConnectionError(f"supernode process {self.index} is gone")
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"id": ident, "op": op, **fields}).encode() + b"\n")
        reply = await future
        if not reply.get("ok"):
            raise RuntimeError(f"supernode {self.index}: {op} failed: {reply.get('error')}")
        return reply

    def kill(self) -> None:
        self.alive = False
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        if self.proc.returncode is None and self.alive:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b'{"op":"quit"}\n')
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 15)
        self.kill()
        await self.proc.wait()
        self._reader.cancel()


def _rss(pid: int) -> int | None:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None


def _lo(counter: str) -> int:
    """A transmit counter ("bytes" or "packets") of this namespace's loopback."""
    for line in NET_DEV.read_text().splitlines():
        name, _, fields = line.partition(":")
        if name.strip() == "lo":
            values = fields.split()
            return int(values[8] if counter == "bytes" else values[9])
    raise RuntimeError("no loopback in /proc/self/net/dev")


# ---------------------------------------------------------------------- one network size


class Run:
    def __init__(self, args: argparse.Namespace, supernodes: int, say: Say, work: Path) -> None:
        self.args = args
        self.n = supernodes
        self.k = nodes_per_process(supernodes, args.nodes_per_process)
        self.say = say
        self.work = work
        self.rng = random.Random(args.seed * 1000 + supernodes)  # noqa: S311 - sampling
        self.workers: list[WorkerProcess] = []
        self.far: WorkerProcess | None = None
        self.host = os.environ.get(DHT_IP_ENV, "127.0.0.1")
        self.custody = ["--custody-refresh", str(args.custody_refresh),
                        "--custody-first", str(args.custody_first)]  # fmt: skip
        self.owner: dict[int, int] = {}
        self.seq: dict[int, int] = {}
        self.result: dict[str, Any] = {"supernodes": supernodes, "nodes_per_supernode": self.k,
                                       "dht_nodes": supernodes * self.k,
                                       "records": args.records}  # fmt: skip
        self.t0 = time.monotonic()

    def log(self, text: str) -> None:
        self.say(f"[N={self.n} {time.monotonic() - self.t0:6.1f}s] {text}")

    def crashed(self, worker: WorkerProcess) -> None:
        """A supernode process died on its own: say so (its log tail) and carry on without it."""
        self.result.setdefault("crashed", []).append(worker.index)
        log = self.work / f"worker{worker.index:03d}.log"
        tail = log.read_text(errors="replace")[-300:] if log.exists() else ""
        self.log(f"supernode process {worker.index} died by itself: {tail.strip()!r}")

    def alive(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.alive]

    def _counted(self) -> dict[str, Any]:
        """Loopback counters: in the private namespace every packet on `lo` is the DHT's."""
        if not self.args.netns:
            return {"bytes": None, "packets": None, "at": time.monotonic()}
        return {"bytes": _lo("bytes"), "packets": _lo("packets"), "at": time.monotonic()}

    def _per_node(self, before: dict[str, Any], what: str) -> float | None:
        """Per DHT node and second since `before` (every packet on lo is sent by one node)."""
        if before[what] is None:
            return None
        seconds = time.monotonic() - before["at"]
        return float((_lo(what) - before[what]) / (self.n * self.k) / seconds)

    async def stats(self) -> dict[str, int]:
        replies = await asyncio.gather(*(w.call("stats") for w in self.alive()))
        total: dict[str, int] = {}
        for reply in replies:
            for name, value in reply["counters"].items():
                total[name] = total.get(name, 0) + int(value)
            total["bad_records"] = total.get("bad_records", 0) + int(reply["bad_records"])
        return total

    # ------------------------------------------------------------------ phases

    async def start(self, material: Path) -> None:
        first = await WorkerProcess.start(0, self.k, material, [], self.work, self.host,
                                          self.custody)  # fmt: skip
        self.workers.append(first)
        known = [f"{self.host}:{p}" for p in first.ports]
        gate = asyncio.Semaphore(8)  # process start-up is CPU: a few at a time

        async def one(index: int) -> WorkerProcess:
            async with gate:
                peers = self.rng.sample(known, min(3, len(known)))
                worker = await WorkerProcess.start(index, self.k, material, peers, self.work,
                                                   self.host, self.custody)  # fmt: skip
                known.extend(f"{self.host}:{p}" for p in worker.ports)
                return worker

        self.workers += await asyncio.gather(*(one(i) for i in range(1, self.n)))
        # like supernodes reading the CA-signed list: everyone knows a few others to start with
        await asyncio.gather(*(w.call("bootstrap", peers=[
            (self.host, int(p.rsplit(":", 1)[1])) for p in self.rng.sample(known, 4)])
            for w in self.workers))  # fmt: skip
        far = os.environ.get(FAR_ENV)
        if far:
            far_ns, far_ip = far.split(",")
            self.far = await WorkerProcess.start(self.n, 1, material, self.rng.sample(known, 4),
                                                 self.work, far_ip, self.custody,
                                                 far_ns)  # fmt: skip
        self.log(f"{self.n} supernode processes up, {self.n * self.k} DHT nodes")
        await asyncio.sleep(self.args.warmup)

    async def publish(self) -> None:
        users: dict[int, list[int]] = {}
        for user in range(self.args.records):
            owner = user % self.n
            self.owner[user] = owner
            self.seq[user] = 1
            users.setdefault(owner, []).append(user)
        done = 0
        before = self._counted()
        stats_before = await self.stats()

        pacer = Pacer(self.args.publish_rate)

        async def feed(worker: WorkerProcess, mine: list[int]) -> None:
            nonlocal done
            for start in range(0, len(mine), self.args.chunk):
                chunk = mine[start : start + self.args.chunk]
                await pacer.take(len(chunk))
                try:
                    await worker.call("publish", users=chunk, seq=1,
                                      parallel=self.args.put_parallel)  # fmt: skip
                except ConnectionError:
                    self.crashed(worker)
                    return
                done += len(chunk)

        async def progress() -> None:
            while True:
                await asyncio.sleep(10)
                rate = done / (time.monotonic() - before["at"])
                self.log(f"published {done}/{self.args.records} ({rate:.0f}/s)")

        reporter = asyncio.create_task(progress())
        try:
            await asyncio.gather(*(feed(self.workers[o], u) for o, u in users.items()))
        finally:
            reporter.cancel()
        seconds = time.monotonic() - before["at"]
        stats = await self.stats()
        self.result["publish"] = {
            "seconds": seconds,
            "per_second": self.args.records / seconds,
            "puts": stats.get("puts", 0) - stats_before.get("puts", 0),
            "reputs_on_miss": stats.get("reputs_on_miss", 0)
            - stats_before.get("reputs_on_miss", 0),
            "put_failures": stats.get("put_failures", 0) - stats_before.get("put_failures", 0),
            "bytes_per_node_per_s": self._per_node(before, "bytes"),
        }
        self.log(f"published {self.args.records} records in {seconds:.0f} s")
        await asyncio.sleep(self.args.settle)

    async def lookups(self) -> None:
        gate = asyncio.Semaphore(self.args.parallel)
        rows: list[dict[str, Any]] = []

        async def one(user: int) -> None:
            others = [w for w in self.alive() if w.index != self.owner[user]]
            worker = self.rng.choice(others)
            async with gate:
                reply = await worker.call("lookup", user=user)
            reply["wanted"] = self.seq[user]
            reply["user"] = user
            rows.append(reply)

        users = self.rng.sample(range(self.args.records), min(self.args.lookups, self.args.records))
        before = self._counted()
        await asyncio.gather(*(one(u) for u in users))
        seconds = time.monotonic() - before["at"]
        ok = [r for r in rows if (r.get("seq") or 0) >= r["wanted"]]
        latency = [float(r["ms"]) for r in rows]
        packets = self._per_node(before, "packets")
        missed = [int(r["user"]) for r in rows if (r.get("seq") or 0) < r["wanted"]]
        again = [await self.workers[(self.owner[u] + 1) % self.n].call("lookup", user=u)
                 for u in missed]  # fmt: skip
        idle = self.result["cost"]["idle_packets_per_node_per_s"]
        out: dict[str, Any] = {
            "count": len(rows),
            "success": len(ok) / max(1, len(rows)),
            "missed": missed,
            "missed_ms": [r["ms"] for r in rows if (r.get("seq") or 0) < r["wanted"]],
            "missed_found_on_retry": sum(1 for r in again if r.get("seq")),
            "ms_p50": percentile(latency, 50),
            "ms_p95": percentile(latency, 95),
            "ms_p99": percentile(latency, 99),
            # every packet the lookups caused, requests and answers, upkeep subtracted
            "packets_per_lookup": None
            if packets is None or idle is None
            else (packets - idle) * self.n * self.k * seconds / max(1, len(rows)),
        }
        self.result["lookup"] = out
        self.log(f"lookups: {out['success']:.2%} found, p50 {_ms(out['ms_p50'])} ms, "
                 f"p99 {_ms(out['ms_p99'])} ms, "
                 f"{_ms(out['packets_per_lookup'])} packets each")  # fmt: skip

    async def far_lookups(self) -> None:
        """Lookups from the one node behind a link of --delay ms each way: round trips."""
        if self.far is None:
            return
        far = self.far
        warm = self.rng.sample(range(self.args.records), min(20, self.args.records))
        await asyncio.gather(*(far.call("lookup", user=u) for u in warm))  # fills its table
        gate = asyncio.Semaphore(self.args.parallel)
        rows: list[dict[str, Any]] = []

        async def one(user: int) -> None:
            async with gate:
                reply = await far.call("lookup", user=user)
            reply["wanted"] = self.seq[user]
            rows.append(reply)

        count = min(self.args.far_lookups, self.args.records)
        await asyncio.gather(*(one(u) for u in self.rng.sample(range(self.args.records), count)))
        rtt = 2 * self.args.delay
        ok = [r for r in rows if (r.get("seq") or 0) >= r["wanted"]]
        first = [float(r["first_ms"]) for r in ok if r.get("first_ms") is not None]
        done = [float(r["ms"]) for r in rows]
        out = {
            "count": len(rows),
            "delay_ms": self.args.delay,
            "success": len(ok) / max(1, len(rows)),
            "first_value_ms_p50": percentile(first, 50),
            "first_value_ms_p95": percentile(first, 95),
            "lookup_ms_p50": percentile(done, 50),
            "lookup_ms_p95": percentile(done, 95),
            "lookup_ms_p99": percentile(done, 99),
            "round_trips_p50": (percentile(first, 50) or 0) / rtt if first else None,
            "round_trips_p95": (percentile(first, 95) or 0) / rtt if first else None,
        }
        self.result["far"] = out
        self.log(f"lookups over a {self.args.delay:g} ms link: {out['success']:.2%} found, "
                 f"first value p50 {_ms(out['first_value_ms_p50'])} ms = "
                 f"{out['round_trips_p50'] or 0:.1f} round trips")  # fmt: skip

    async def presence(self) -> None:
        """Contacts' supernodes subscribe; the users change status; how soon does each see it.

        Most watchers are supernodes on the loopback; --far-watches of them are the far node,
        whose notifications cross the delayed link as they would between real supernodes.
        """
        count = min(self.args.watches, self.args.records)
        users = self.rng.sample(range(self.args.records), count)
        far_users = set(users[: self.args.far_watches]) if self.far is not None else set()
        watchers: dict[int, tuple[WorkerProcess, list[int]]] = {}
        for user in users:
            if user in far_users and self.far is not None:
                w = self.far
            else:
                w = self.rng.choice([w for w in self.alive() if w.index != self.owner[user]])
            watchers.setdefault(w.index, (w, []))[1].append(user)
        await asyncio.gather(*(w.call("watch", users=u) for w, u in watchers.values()))
        await asyncio.sleep(self.args.listen_settle)
        started: dict[int, float] = {}
        gate = asyncio.Semaphore(self.args.parallel)

        async def change(user: int) -> None:
            self.seq[user] += 1
            async with gate:
                reply = await self.workers[self.owner[user]].call(
                    "update", user=user, seq=self.seq[user], status="away")  # fmt: skip
            started[user] = float(reply["started"])

        await asyncio.gather(*(change(u) for u in users))
        await asyncio.sleep(self.args.propagation_wait)
        seen: dict[int, float] = {}
        for w, mine in watchers.values():
            wanted = {u: self.seq[u] for u in mine}
            for seq in set(wanted.values()):
                reply = await w.call("seen", users=[u for u in mine if wanted[u] == seq], seq=seq)
                seen.update({int(u): float(t) for u, t in reply["seen"].items()})

        def summary(group: list[int]) -> dict[str, Any]:
            delays = [(seen[u] - started[u]) * 1000 for u in group if u in seen and u in started]
            return {"watched": len(group), "seen": len(delays) / max(1, len(group)),
                    "ms_p50": percentile(delays, 50), "ms_p95": percentile(delays, 95),
                    "ms_max": max(delays, default=None)}  # fmt: skip

        out = summary([u for u in users if u not in far_users])
        out["far"] = summary(sorted(far_users)) if far_users else None
        self.result["presence"] = out
        self.log(f"presence: {out['seen']:.2%} of {out['watched']} changes seen, "
                 f"p50 {_ms(out['ms_p50'])} ms, p95 {_ms(out['ms_p95'])} ms")  # fmt: skip
        if out["far"]:
            self.log(
                f"presence at the far node: {out['far']['seen']:.2%} seen, "
                f"p50 {_ms(out['far']['ms_p50'])} ms, p95 {_ms(out['far']['ms_p95'])} ms"
            )

    async def cost(self) -> None:
        """A quiet window: what running the index costs when nothing happens but upkeep."""
        before = self._counted()
        await asyncio.sleep(self.args.idle)
        rss = [r for w in self.alive() if (r := _rss(w.proc.pid)) is not None]
        self.result["cost"] = {
            "rss_mb_p50": (percentile(rss, 50) or 0) / 2**20,
            "rss_mb_max": max(rss, default=0) / 2**20,
            "idle_packets_per_node_per_s": self._per_node(before, "packets"),
            "idle_bytes_per_node_per_s": self._per_node(before, "bytes"),
        }
        self.log(f"cost: RSS p50 {self.result['cost']['rss_mb_p50']:.0f} MB per supernode")

    async def churn(self) -> None:
        victims = choose_victims(self.n, self.args.kill, self.rng)
        probe = self.rng.sample(range(self.args.records), min(self.args.probe, self.args.records))
        killed_at = time.monotonic()
        for index in victims:
            self.workers[index].kill()
        self.log(f"killed {len(victims)} of {self.n} supernodes at once")
        dead = set(victims)
        orphans = [u for u, o in self.owner.items() if o in dead]
        survivors = [w.index for w in self.alive()]
        moves = rehome(orphans, survivors)
        for new_owner, users in moves.items():
            for user in users:
                self.owner[user] = new_owner
                self.seq[user] += 1
        rounds: list[dict[str, Any]] = []
        rehomed_at: float | None = None

        async def reattach() -> None:
            nonlocal rehomed_at
            await asyncio.sleep(self.args.reattach)

            # Real clients would all come back at once, each to a supernode with a CPU of its
            # own; here every supernode shares two cores, and an unpaced burst of puts to keys
            # whose storing nodes just died drives the whole simulated network into thrashing.
            pacer = Pacer(self.args.rehome_rate)
            sent: list[asyncio.Task[Any]] = []

            async def feed(index: int, users: list[int]) -> None:
                # each client's republish goes on its own: paced starts, no waiting for the
                # slow ones (puts to keys whose nodes just died wait on their timeouts)
                for start in range(0, len(users), self.args.chunk):
                    chunk = users[start : start + self.args.chunk]
                    await pacer.take(len(chunk))
                    for seq in sorted({self.seq[u] for u in chunk}):
                        call = self.workers[index].call(
                            "publish", users=[u for u in chunk if self.seq[u] == seq], seq=seq,
                            parallel=self.args.chunk)  # fmt: skip
                        sent.append(asyncio.ensure_future(call))

            await asyncio.gather(*(feed(i, u) for i, u in moves.items()))
            await asyncio.gather(*sent, return_exceptions=True)
            rehomed_at = time.monotonic() - killed_at
            self.log(f"{len(orphans)} users re-attached and republished by "
                     f"{rehomed_at:.1f} s after the kill")  # fmt: skip

        reattaching = asyncio.create_task(reattach())
        orphan_set = set(orphans)
        deadline = killed_at + self.args.repair_timeout
        while True:
            row = await self._probe_round(probe, killed_at, orphan_set)
            rounds.append(row)
            self.log(f"after kill +{row['end_s']:5.1f} s: {row['found']}/{row['probed']} found "
                     f"({row['orphans_found']}/{row['orphans']} re-attached users)")  # fmt: skip
            complete = row["found"] == row["probed"]
            if (complete and reattaching.done()) or time.monotonic() > deadline:
                break
            await asyncio.sleep(self.args.probe_interval)
        if not reattaching.done():
            reattaching.cancel()
        checked = self.rng.sample(range(self.args.records),
                                  min(self.args.final_check, self.args.records))  # fmt: skip
        final = await self._probe_round(checked, killed_at, orphan_set)
        self.result["churn"] = {
            "killed": len(victims),
            "orphaned_users": len(orphans),
            "first_round_success": rounds[0]["found"] / max(1, rounds[0]["probed"]),
            "success_at_30s": success_by(rounds, 30.0),
            "first_round_survivor_users": (rounds[0]["found"] - rounds[0]["orphans_found"])
            / max(1, rounds[0]["probed"] - rounds[0]["orphans"]),
            "reattached_s": rehomed_at,
            "repair_s": repair_time(rounds),
            "final_success": final["found"] / max(1, final["probed"]),
            "final_checked": final["probed"],
            "rounds": rounds,
        }
        self.log(f"after repair: {final['found']}/{final['probed']} found")

    async def _probe_round(self, users: list[int], killed_at: float,
                           orphans: set[int]) -> dict[str, Any]:  # fmt: skip
        gate = asyncio.Semaphore(self.args.probe_parallel)
        begin = time.monotonic() - killed_at
        found: list[int] = []
        alive = self.alive()

        async def one(user: int) -> None:
            async with gate:
                reply = await self.rng.choice(alive).call("lookup", user=user)
            if (reply.get("seq") or 0) >= self.seq[user]:
                found.append(user)

        await asyncio.gather(*(one(u) for u in users))
        return {"start_s": begin, "end_s": time.monotonic() - killed_at, "probed": len(users),
                "found": len(found), "orphans": sum(1 for u in users if u in orphans),
                "orphans_found": sum(1 for u in found if u in orphans)}  # fmt: skip

    async def stop(self) -> None:
        everyone = self.workers + ([self.far] if self.far else [])
        await asyncio.gather(*(w.stop() for w in everyone), return_exceptions=True)


async def run_size(args: argparse.Namespace, supernodes: int, material: Path, say: Say,
                   work: Path) -> dict[str, Any]:  # fmt: skip
    run = Run(args, supernodes, say, work)
    try:
        await run.start(material)
        await run.publish()
        await run.cost()
        await run.lookups()
        await run.far_lookups()
        await run.presence()
        await run.churn()
        run.result["counters"] = await run.stats()
    finally:
        await run.stop()
    run.result["seconds"] = time.monotonic() - run.t0
    return run.result


# ---------------------------------------------------------------------- output


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def _trio(values: dict[str, Any] | None, names: Sequence[str], unit: str = " ms") -> str:
    if not values:
        return "-"
    return " / ".join(_ms(values.get(n)) for n in names) + unit


def cells(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The table's rows for one network size: (figure, value)."""
    look, far, pres, churn, cost = r["lookup"], r.get("far"), r["presence"], r["churn"], r["cost"]
    far_seen = pres.get("far")
    repair = churn["repair_s"]
    idle_bytes = cost["idle_bytes_per_node_per_s"]
    trips = "-"
    if far and far["round_trips_p50"] is not None:
        trips = f"{far['round_trips_p50']:.1f} / {far['round_trips_p95']:.1f}"
    return [
        ("records published (rate)", f"{r['records']:,} ({r['publish']['per_second']:.0f}/s)"),
        ("lookup success (non-contacts)", _pct(look["success"])),
        ("lookup latency p50 / p95 / p99", _trio(look, ("ms_p50", "ms_p95", "ms_p99"))),
        ("packets per lookup (requests + answers)", _ms(look["packets_per_lookup"])),
        ("far node: lookup success", _pct(far["success"]) if far else "-"),
        ("far node: first value p50 / p95",
         _trio(far, ("first_value_ms_p50", "first_value_ms_p95"))),
        ("far node: round trips to first value p50 / p95", trips),
        ("far node: lookup() returns p50 / p95 / p99",
         _trio(far, ("lookup_ms_p50", "lookup_ms_p95", "lookup_ms_p99"))),
        ("presence change seen by contact p50 / p95",
         f"{_trio(pres, ('ms_p50', 'ms_p95'))} ({_pct(pres['seen'])} seen)"),
        ("… by a contact on the far node p50 / p95", "-" if not far_seen else
         f"{_trio(far_seen, ('ms_p50', 'ms_p95'))} ({_pct(far_seen['seen'])} seen)"),
        ("30% killed: found in the first round", _pct(churn["first_round_success"])),
        ("30% killed: survivors' users, first round", _pct(churn["first_round_survivor_users"])),
        ("30% killed: found 30 s after the kill", _pct(churn["success_at_30s"])),
        ("30% killed: repair time (all found)", "never" if repair is None else f"{repair:.1f} s"),
        ("30% killed: success after repair",
         f"{_pct(churn['final_success'])} of {churn['final_checked']:,}"),
        ("RSS per supernode process p50 / max",
         f"{cost['rss_mb_p50']:.0f} / {cost['rss_mb_max']:.0f} MB"),
        ("packets sent per DHT node, idle", "-" if cost["idle_packets_per_node_per_s"] is None
         else f"{cost['idle_packets_per_node_per_s']:.2f}/s"),
        ("bytes sent per DHT node, idle / publishing", "-" if idle_bytes is None else
         f"{idle_bytes:.0f} B/s / {r['publish']['bytes_per_node_per_s'] / 1000:.0f} kB/s"),
    ]  # fmt: skip


def table(results: list[dict[str, Any]]) -> str:
    heads = [f"N={r['supernodes']} ({r['supernodes']}×{r['nodes_per_supernode']} DHT nodes)"
             for r in results]  # fmt: skip
    columns = [cells(r) for r in results]
    lines = ["| figure | " + " | ".join(heads) + " |", "|---|" + "---|" * len(results)]
    for i, (name, _value) in enumerate(columns[0]):
        lines.append(f"| {name} | " + " | ".join(c[i][1] for c in columns) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- namespace and main


def _enter_netns(delay: float) -> None:
    """Re-run this bench inside the lab (root): the supernodes in one namespace of their own, so
    every packet on its `lo` is theirs, and with --delay one far node in another namespace
    behind the lab's delayed link (this kernel has no netem: a userspace forwarder, which only
    that node's traffic crosses)."""
    if os.environ.get(NETNS_MARK):
        return
    from punchline.lab.impair import Impairment
    from punchline.lab.netns import in_ns
    from punchline.lab.topology import Lab

    with Lab() as lab:
        dht = lab.add_public_host("dht")
        env = {**os.environ, NETNS_MARK: "1", DHT_IP_ENV: dht.ip}
        if delay > 0:
            far = lab.add_public_host("far", Impairment(delay_ms=delay))
            env[FAR_ENV] = f"{far.ns},{far.ip}"
        done = subprocess.run(in_ns(dht.ns, [sys.executable, *sys.argv]), env=env, check=False)
    raise SystemExit(done.returncode)


def _material(path: Path, seed: int) -> None:
    key = keys.generate()
    cert = certs.create_ca(key, time.time() - 60)
    path.write_text(json.dumps({"key": keys.private_to_pem(key).decode(),
                                "cert": certs.to_pem(cert),
                                "seed": random.Random(seed).randbytes(32).hex()}))  # noqa: S311  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--supernodes", default="20,100", help="comma-separated N (processes)")
    parser.add_argument(
        "--nodes-per-process",
        type=int,
        default=0,
        help=f"DHT nodes per process (default: enough for {MIN_DHT_NODES})",
    )
    parser.add_argument("--records", type=int, default=100_000, help="users published")
    parser.add_argument("--lookups", type=int, default=2000, help="timed lookups")
    parser.add_argument("--parallel", type=int, default=4, help="timed lookups in flight")
    parser.add_argument("--watches", type=int, default=300, help="presence changes watched")
    parser.add_argument(
        "--far-watches", type=int, default=50, help="of which watched from the far node"
    )
    parser.add_argument("--kill", type=float, default=0.3, help="fraction of supernodes killed")
    parser.add_argument("--probe", type=int, default=1000, help="users probed per repair round")
    parser.add_argument("--probe-parallel", type=int, default=50)
    parser.add_argument("--probe-interval", type=float, default=1.0)
    parser.add_argument(
        "--final-check", type=int, default=5000, help="users looked up once repair is done"
    )
    parser.add_argument(
        "--reattach",
        type=float,
        default=3.0,
        help="seconds before orphaned clients republish via a survivor",
    )
    parser.add_argument(
        "--repair-timeout",
        type=float,
        default=150.0,
        help="stop probing this long after the kill even if users are missing",
    )
    parser.add_argument(
        "--delay",
        type=float,
        default=25.0,
        help="one-way ms of the far node's link (root; 0: no far node)",
    )
    parser.add_argument("--far-lookups", type=int, default=500, help="lookups from the far node")
    parser.add_argument(
        "--no-netns",
        dest="netns",
        action="store_false",
        help="stay on the host's loopback (no bytes figure, no far node)",
    )
    parser.add_argument("--chunk", type=int, default=50, help="users per publish request")
    parser.add_argument(
        "--rehome-rate",
        type=float,
        default=400.0,
        help="records/s republished by re-attaching clients after the kill (0: no limit)",
    )
    parser.add_argument(
        "--publish-rate",
        type=float,
        default=250.0,
        help="records/s of the initial bulk publish, all supernodes together (0: no limit)",
    )
    parser.add_argument("--put-parallel", type=int, default=32, help="puts in flight per process")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--listen-settle", type=float, default=3.0)
    parser.add_argument("--propagation-wait", type=float, default=3.0)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of the quiet window")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", type=Path, help="keep the workers' logs here")
    parser.add_argument(
        "--custody-refresh",
        type=float,
        default=custody.REFRESH,
        help="seconds between a supernode's re-puts of a record (custody's own default)",
    )
    parser.add_argument(
        "--custody-first",
        type=float,
        default=custody.FIRST_REFRESH,
        help="seconds from a publish to its first re-put (custody's own default)",
    )
    parser.add_argument("--json", action="store_true")
    return parser


def main() -> None:
    args = _parser().parse_args()
    if args.netns and os.geteuid() != 0:
        args.netns = False
    if not args.netns:
        args.delay = 0.0
    if args.netns:
        _enter_netns(args.delay)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    sizes = [int(s) for s in args.supernodes.split(",") if s]
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-index-"))
    work.mkdir(parents=True, exist_ok=True)
    material = work / "ca.json"
    _material(material, args.seed)
    results = []
    for size in sizes:
        results.append(asyncio.run(run_size(args, size, material, say, work)))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps({"args": vars(args) | {"keep": str(args.keep)}, "results": results}))
        return
    print(table(results))
    print(f"\nrecords {args.records:,}; far node's link {args.delay:g} ms each way; "
          f"{args.lookups} timed lookups ({args.parallel} in flight); {args.watches} watched "
          f"changes; kill {args.kill:.0%} at once, probe {args.probe} users per round")  # fmt: skip


if __name__ == "__main__":
    main()
