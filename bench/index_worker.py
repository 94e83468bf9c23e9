"""One "supernode" process of bench/index.py: K OpenDHT nodes of punchline's own `DhtIndex`.

Started by bench/index.py, never by hand. It speaks JSON lines: requests on stdin, one reply per
request (same "id") on the protocol stream, which is the original stdout; fd 1 itself is pointed
at stderr so nothing else (structlog, OpenDHT) can corrupt the protocol.

Users are "attached" to this process when their index modulo the process count is its own; their
keys derive from the run's seed and their certificates come from the run's throw-away CA, so a
surviving process can also republish a user whose supernode died, as the re-attaching client
would. Records are punchline's real signed presence records, verified on lookup exactly as a
supernode verifies them (`wire.presence.verify_untrusted`, then the freshest per device).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from punchline.identity import certs, keys
from punchline.overlay.custody import FIRST_REFRESH, REFRESH, Custody, CustodySchedule
from punchline.overlay.dht import DhtConfig, DhtIndex, _hash
from punchline.overlay.index import Listening, device_value_id, presence_key
from punchline.util import logs
from punchline.wire import presence

DEVICE = "d1"
RECORD_LIFETIME = 3600.0
CERT_LIFETIME = 86_400.0


def user_name(index: int) -> str:
    return f"u{index:06d}"


class FirstValueRunner:
    """The probe's OpenDHT runner, wrapped to note when each get hears its first value.

    `DhtIndex.lookup` returns once the search is done or has settled, which says little about
    how many round trips it took to find the record; the first value's arrival does. Everything
    else goes straight to the real runner, so the lookup itself is punchline's own code.
    """

    def __init__(self, runner: Any) -> None:
        self._runner = runner
        self.first: dict[str, float] = {}  # key hash -> monotonic time of its first value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def get(self, key: Any, on_value: Callable[[Any], bool], on_done: Any) -> Any:
        name = str(key)

        def noted(value: Any) -> bool:
            self.first.setdefault(name, time.monotonic())  # OpenDHT's thread: one dict write
            return on_value(value)

        return self._runner.get(key, noted, on_done)


class Worker:
    def __init__(self, args: argparse.Namespace, out_fd: int) -> None:
        material = json.loads(Path(args.ca).read_text())
        self.ca_key = keys.private_from_pem(material["key"].encode())
        self.ca_cert = x509.load_pem_x509_certificate(material["cert"].encode())
        self.seed = bytes.fromhex(material["seed"])
        self.worker = args.worker
        self.out_fd = out_fd
        bootstrap = [(h, int(p)) for h, p in (b.rsplit(":", 1) for b in args.bootstrap if b)]
        self.host = args.bind
        self.nodes: list[DhtIndex] = []
        for _ in range(args.nodes):
            # the very first process has no one to join but itself
            peers = bootstrap or [(self.host, n.port) for n in self.nodes[:1]]
            self.nodes.append(DhtIndex(DhtConfig(bind_host=self.host, bootstrap=peers,
                                                 unlimited_rate=True)))  # fmt: skip
        # each DHT node stands for one supernode, with its own custody of its users' records
        self.custodies = [
            Custody(node, CustodySchedule(args.custody_refresh, args.custody_first))
            for node in self.nodes
        ]
        self.timed: FirstValueRunner | None = None
        if args.probe:
            self.timed = FirstValueRunner(self.nodes[0]._runner)
            self.nodes[0]._runner = self.timed
        self.identities: dict[int, tuple[Ed25519PrivateKey, x509.Certificate]] = {}
        self.seq: dict[int, int] = {}
        self.home: dict[int, int] = {}  # user -> local node the user is attached to
        self.listens: list[Listening] = []
        self.seen: dict[tuple[int, int], float] = {}  # (user, seq) -> monotonic time first seen
        self.bad_records = 0
        self.rng = random.Random(args.worker)  # noqa: S311 - sampling, not security

    # ------------------------------------------------------------------ records

    def identity(self, user: int) -> tuple[Ed25519PrivateKey, x509.Certificate]:
        found = self.identities.get(user)
        if found is None:
            name = user_name(user)
            key = Ed25519PrivateKey.from_private_bytes(
                hashlib.sha256(self.seed + name.encode()).digest()
            )
            cert = certs.issue(self.ca_key, self.ca_cert, name, key.public_key(),
                               [certs.Role.USER], time.time(), CERT_LIFETIME)  # fmt: skip
            found = self.identities[user] = (key, cert)
        return found

    def record(self, user: int, node: int, seq: int, status: str) -> dict[str, str]:
        key, cert = self.identity(user)
        where = {
            "node_id": f"sn{self.worker:03d}.{node}",
            "addresses": [{"transport": "udp", "host": self.host, "port": self.nodes[node].port}],
        }
        return presence.make(key, cert, user_name(user), DEVICE, where, seq,
                             time.time() + RECORD_LIFETIME, status)  # fmt: skip

    def verified(self, user: int, documents: list[dict[str, Any]]) -> list[presence.Presence]:
        valid = []
        now, name = time.time(), user_name(user)
        for document in documents:
            try:
                valid.append(presence.verify_untrusted(document, self.ca_cert, now, name))
            except presence.PresenceError:
                self.bad_records += 1
        return presence.freshest(valid)

    def newest(self, user: int, documents: list[dict[str, Any]]) -> int | None:
        """The highest verified sequence number found: the caller knows which one is current."""
        return max((p.seq for p in self.verified(user, documents)), default=None)

    # ------------------------------------------------------------------ operations

    async def publish(self, node: int, user: int, document: dict[str, str]) -> None:
        """What the supernode server does with a client's new record: put it, then keep it."""
        name = user_name(user)
        await self.nodes[node].publish(name, DEVICE, document)
        until = time.time() + RECORD_LIFETIME
        self.custodies[node].keep(presence_key(name), device_value_id(DEVICE), document, until,
                                  put_now=False)  # fmt: skip

    async def op_publish(self, users: list[int], seq: int, parallel: int) -> dict[str, Any]:
        """Attach `users` here (spread over the local nodes) and publish their records."""
        gate = asyncio.Semaphore(parallel)
        failures = 0

        async def one(user: int) -> None:
            nonlocal failures
            node = self.home.setdefault(user, user % len(self.nodes))
            self.seq[user] = seq
            document = self.record(user, node, seq, "online")
            async with gate:
                try:
                    await self.publish(node, user, document)
                except Exception:
                    failures += 1

        started = time.monotonic()
        await asyncio.gather(*(one(u) for u in users))
        return {"published": len(users), "failures": failures,
                "seconds": time.monotonic() - started}  # fmt: skip

    async def op_lookup(self, user: int) -> dict[str, Any]:
        """One lookup from a random local node, verified like a supernode does."""
        node = self.rng.randrange(len(self.nodes))
        started = time.monotonic()
        documents = await self.nodes[node].lookup(user_name(user))
        elapsed = time.monotonic() - started
        reply: dict[str, Any] = {"seq": self.newest(user, documents), "ms": elapsed * 1000}
        if self.timed is not None:
            first = self.timed.first.pop(str(_hash(presence_key(user_name(user)))), None)
            reply["first_ms"] = None if first is None else (first - started) * 1000
        return reply

    def op_watch(self, users: list[int]) -> dict[str, Any]:
        """Subscribe like a contact's supernode does: listen, verify, note when a seq shows up."""
        for user in users:
            node = self.rng.randrange(len(self.nodes))
            self.listens.append(self.nodes[node].listen(
                "presence/" + user_name(user), self._on_value(user)))  # fmt: skip
        return {"watching": len(self.listens)}

    def _on_value(self, user: int) -> Callable[[dict[str, Any]], None]:
        def on_value(document: dict[str, Any]) -> None:
            now = time.monotonic()
            for record in self.verified(user, [document]):
                self.seen.setdefault((user, record.seq), now)

        return on_value

    def op_seen(self, users: list[int], seq: int) -> dict[str, Any]:
        return {"seen": {str(u): self.seen[(u, seq)] for u in users if (u, seq) in self.seen}}

    async def op_update(self, user: int, seq: int, status: str) -> dict[str, Any]:
        """The user changes status: its supernode publishes the new record (timed from here)."""
        node = self.home[user]
        self.seq[user] = seq
        document = self.record(user, node, seq, status)
        started = time.monotonic()
        await self.publish(node, user, document)
        return {"started": started, "put_ms": (time.monotonic() - started) * 1000}

    def op_stats(self) -> dict[str, Any]:
        """OpenDHT's own message counters are not read: `getNodeMessageStats` takes the node's
        lock while holding the GIL and deadlocks against a callback waiting for the GIL."""
        counters: dict[str, int] = {}
        for node in self.nodes:
            for name, value in node.counters.items():
                counters[name] = counters.get(name, 0) + value
        for custody in self.custodies:
            for name, value in custody.counters.items():
                counters["custody_" + name] = counters.get("custody_" + name, 0) + value
        return {"counters": counters,
                "bad_records": self.bad_records, "attached": len(self.home),
                "listens": len(self.listens)}  # fmt: skip

    def op_bootstrap(self, peers: list[tuple[str, int]]) -> dict[str, Any]:
        for node in self.nodes:
            for host, port in peers:
                node.bootstrap(host, int(port))
        return {}

    async def dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        r = request
        waits: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
            "publish": lambda: self.op_publish(r["users"], r["seq"], r["parallel"]),
            "lookup": lambda: self.op_lookup(r["user"]),
            "update": lambda: self.op_update(r["user"], r["seq"], r["status"]),
        }
        at_once: dict[str, Callable[[], dict[str, Any]]] = {
            "watch": lambda: self.op_watch(r["users"]),
            "seen": lambda: self.op_seen(r["users"], r["seq"]),
            "stats": self.op_stats,
            "bootstrap": lambda: self.op_bootstrap(r["peers"]),
        }
        op = r["op"]
        if op in waits:
            return await waits[op]()
        if op in at_once:
            return at_once[op]()
        raise ValueError(f"unknown op {op!r}")

    def send(self, message: dict[str, Any]) -> None:
        os.write(self.out_fd, json.dumps(message, separators=(",", ":")).encode() + b"\n")

    async def answer(self, request: dict[str, Any]) -> None:
        try:
            reply = await self.dispatch(request)
            reply["ok"] = True
        except Exception as exc:  # the coordinator reports it; this process stays up
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        reply["id"] = request.get("id")
        self.send(reply)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 24)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        self.send({"ready": True, "pid": os.getpid(), "ports": [n.port for n in self.nodes]})
        tasks: set[asyncio.Task[None]] = {asyncio.create_task(c.run()) for c in self.custodies}
        while line := await reader.readline():
            request = json.loads(line)
            if request.get("op") == "quit":
                break
            task = asyncio.create_task(self.answer(request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        for listening in self.listens:
            listening.cancel()
        for custody in self.custodies:
            custody.close()
        for task in tasks:
            task.cancel()
        await asyncio.wait_for(asyncio.gather(*(n.close() for n in self.nodes)), 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--ca", required=True, help="JSON file: CA key and cert PEM, seed")
    parser.add_argument("--bootstrap", nargs="*", default=[], help="host:port of running nodes")
    parser.add_argument("--bind", default="127.0.0.1", help="address of this process's nodes")
    parser.add_argument("--probe", action="store_true", help="time each lookup's first value")
    parser.add_argument("--custody-refresh", type=float, default=REFRESH)
    parser.add_argument("--custody-first", type=float, default=FIRST_REFRESH)
    args = parser.parse_args()
    out_fd = os.dup(1)
    os.dup2(2, 1)  # stray prints (ours, OpenDHT's) go to stderr, never into the protocol
    logs.configure("WARNING")
    profile_dir = os.environ.get("PUNCHLINE_BENCH_PROFILE")  # where to leave a cProfile dump
    if not profile_dir:
        asyncio.run(Worker(args, out_fd).serve())
        return
    import cProfile

    with cProfile.Profile() as profile:
        asyncio.run(Worker(args, out_fd).serve())
    profile.dump_stats(Path(profile_dir) / f"worker{args.worker:03d}.prof")


if __name__ == "__main__":
    main()
