"""The global index on OpenDHT (Debian's python3-opendht), run by every supernode.

Each supernode runs one DHT node in punchline's private network (its own network id), so
clients never join the DHT. Traps handled (see shared/OPENDHT-NOTES.md):

- OpenDHT callbacks run on its own thread holding the GIL: they copy the bytes and hand them to
  the event loop with `call_soon_threadsafe`, nothing more.
- Storing nodes refuse to replace a value with the same id but other bytes (some keep the old,
  some take the new), so each distinct document gets its own OpenDHT value id derived from the
  caller's value id and the bytes: a changed document is a new value (listeners hear it), an
  identical re-put refreshes the stored copy's 10-minute lifetime. Readers keep the highest
  sequence number per author, as they must anyway.
- Puts soon after start-up can land nowhere: `put` puts again (in the background) while
  OpenDHT reports the value stored on no node, and custody (overlay.custody) re-puts early
  (30 s) and then every few minutes.
- `cancelListen` can release the wrong callback when several listens run in one process: there
  is one OpenDHT listen per key, shared by all local subscribers and reference-counted; a
  cancelled listen's callback also answers False, which ends it on OpenDHT's side whatever
  `cancelListen` did.
- The per-address rate limit is lifted on loopback, where every node shares one address.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from punchline import environment
from punchline.overlay.index import (
    Listening,
    device_value_id,
    encode_document,
    presence_key,
)
from punchline.util.jsontext import loads_untrusted

log = structlog.get_logger(component="dht")

NETWORK_ID = 0x70756E63  # "punc": our own DHT network, apart from Jami's
MAX_VALUE_BYTES = 60_000


@dataclass(frozen=True)
class DhtConfig:
    bind_host: str = "0.0.0.0"  # noqa: S104 - the DHT node is a public service
    port: int = 0
    bootstrap: Sequence[tuple[str, int]] = field(default_factory=tuple)
    network_id: int = NETWORK_ID
    # Lift OpenDHT's 1,024 requests/s per source address limit (for loopback tests).
    unlimited_rate: bool = False
    # A lookup ends this long after the last new value, and at the latest after the timeout.
    lookup_settle: float = 0.25
    lookup_timeout: float = 3.0
    # Put again this many times while OpenDHT reports a put stored on no node.
    put_retries: int = 2


def _hash(key: str) -> Any:
    import opendht

    return opendht.InfoHash.get("punchline/" + key)


def _dht_value_id(value_id: int, data: bytes) -> int:
    digest = hashlib.sha256(value_id.to_bytes(8, "big") + data).digest()
    return (int.from_bytes(digest[:8], "big") >> 1) | 1


@dataclass
class _Subscriber:
    on_value: Callable[[dict[str, Any]], None]
    active: bool = True


@dataclass
class _KeyListen:
    """The one OpenDHT listen on a key, shared by every local subscriber."""

    key: str
    generation: int
    subscribers: list[_Subscriber] = field(default_factory=list)
    seen: dict[bytes, dict[str, Any]] = field(default_factory=dict)
    token: Any = None
    # the binding's own reference to our callback, released by cancelListen (see _unsubscribe)
    callback_ref: Any = None
    live: bool = True  # read by OpenDHT's thread: False makes its callback end the listen


class _DhtListening:
    def __init__(self, index: DhtIndex, key: str, subscriber: _Subscriber) -> None:
        self._index, self._key, self._subscriber = index, key, subscriber

    def cancel(self) -> None:
        self._index._unsubscribe(self._key, self._subscriber)


class DhtIndex:
    def __init__(self, config: DhtConfig) -> None:
        environment.require_opendht()
        import opendht

        self._opendht = opendht
        self.config = config
        self._runner = opendht.DhtRunner()
        dht_config = opendht.DhtConfig()
        dht_config.setNetwork(config.network_id)
        if config.unlimited_rate:
            dht_config.setRateLimit(-1, -1)
        ipv4 = config.bind_host if ":" not in config.bind_host else ""
        ipv6 = config.bind_host if ":" in config.bind_host else ""
        self._runner.run(port=config.port, ipv4=ipv4, ipv6=ipv6, config=dht_config)
        self.port = int(self._runner.getBound().getPort())
        self._listens: dict[str, _KeyListen] = {}
        self._generations = itertools.count(1)
        self._closed = False
        self._background: set[asyncio.Task[None]] = set()
        self.counters: dict[str, int] = {"puts": 0, "reputs_on_miss": 0, "put_failures": 0}
        for host, port in config.bootstrap:
            self.bootstrap(host, port)
        log.info("dht node running", port=self.port, bootstrap=len(config.bootstrap))

    def bootstrap(self, host: str, port: int) -> None:
        if port == self.port and host in ("127.0.0.1", self.config.bind_host):
            return
        self._runner.bootstrap(host, str(port))

    # ----------------------------------------------------------------- put / get

    async def put(self, key: str, value_id: int, document: dict[str, Any]) -> None:
        """Store; if OpenDHT reports the value stored on no node, put again in the background.

        Returns after the first attempt, so a publish is never slowed down (a lone node's puts
        always "fail"). A read-back through `get` would prove nothing: the putting node answers
        from its own storage even when the put reached no one. The put's own report (success
        and the nodes that took the value) is the evidence there is; custody's early re-put
        covers the puts that reported success but landed on the wrong nodes.
        """
        data = encode_document(document)
        if not await self._put_once(key, value_id, data):
            self._spawn(self._reput(key, value_id, data))

    async def _reput(self, key: str, value_id: int, data: bytes) -> None:
        for attempt in range(1, self.config.put_retries + 1):
            await asyncio.sleep(0.5 * attempt)
            self.counters["reputs_on_miss"] += 1
            if await self._put_once(key, value_id, data):
                log.info("value stored on a re-put", key=key, attempt=attempt)
                return
        self.counters["put_failures"] += 1
        log.info("value stored on no DHT node (no peers yet?)", key=key)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _put_once(self, key: str, value_id: int, data: bytes) -> bool:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()

        def on_done(ok: bool, nodes: Any) -> None:
            _threadsafe(loop, _resolve, done, bool(ok) and len(nodes) > 0)

        value = self._opendht.Value(data)
        value.id = _dht_value_id(value_id, data)
        self.counters["puts"] += 1
        self._runner.put(_hash(key), value, on_done)
        try:
            return await asyncio.wait_for(asyncio.shield(done), self.config.lookup_timeout * 3)
        except TimeoutError:
            return False

    async def get(self, key: str) -> list[dict[str, Any]]:
        found = []
        for data in await self._get_raw(key):
            try:
                document = loads_untrusted(data)
            except ValueError:
                continue
            if isinstance(document, dict):
                found.append(document)
        return found

    async def _get_raw(self, key: str, wanted: bytes | None = None) -> set[bytes]:
        """Values found under `key`, without waiting on every slow or dead DHT node.

        OpenDHT's search only ends once every search path has answered or timed out, which
        takes seconds when nodes have died. Here values stream in through callbacks, and the
        get ends when the search is done, `settle` seconds after the last new value, at
        `timeout`, or as soon as `wanted` is seen.
        """
        loop = asyncio.get_running_loop()
        found: set[bytes] = set()
        changed = asyncio.Event()
        finished = asyncio.Event()
        stop = threading.Event()

        def on_value(value: Any) -> bool:
            _threadsafe(loop, _collect, found, bytes(value.data), changed)
            return not stop.is_set()

        def on_done(_ok: bool, _nodes: Any) -> None:
            _threadsafe(loop, finished.set)

        self._runner.get(_hash(key), on_value, on_done)
        deadline = loop.time() + self.config.lookup_timeout
        try:
            while not finished.is_set() and loop.time() < deadline:
                if wanted is not None and wanted in found:
                    break
                changed.clear()
                wait = self.config.lookup_timeout if not found else self.config.lookup_settle
                wait = min(wait, deadline - loop.time())
                waiters = [
                    asyncio.ensure_future(changed.wait()),
                    asyncio.ensure_future(finished.wait()),
                ]
                done, pending = await asyncio.wait(waiters, timeout=max(0.0, wait),
                                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                for task in pending:
                    task.cancel()
                if not done:
                    break  # settled: nothing new for a while
        finally:
            stop.set()
        return set(found)

    # ----------------------------------------------------------------- listen

    def listen(self, key: str, on_value: Callable[[dict[str, Any]], None]) -> Listening:
        subscriber = _Subscriber(on_value)
        shared = self._listens.get(key)
        if shared is None:
            shared = self._listens[key] = _KeyListen(key, next(self._generations))
            self._start_listen(shared)
        else:
            loop = asyncio.get_running_loop()
            for document in list(shared.seen.values()):  # what the others already heard
                loop.call_soon(self._deliver_one, subscriber, document)
        shared.subscribers.append(subscriber)
        return _DhtListening(self, key, subscriber)

    def _start_listen(self, shared: _KeyListen) -> None:
        loop = asyncio.get_running_loop()

        def on_value(value: Any, expired: bool) -> bool:
            if not shared.live:
                return False
            _threadsafe(loop, self._heard, shared, bytes(value.data), bool(expired))
            return True

        shared.token = self._runner.listen(_hash(shared.key), on_value)
        shared.callback_ref = self._opendht.ListenToken._cb.get("cb")

    def _heard(self, shared: _KeyListen, data: bytes, expired: bool) -> None:
        if not shared.live:
            return
        if expired:
            shared.seen.pop(data, None)
            return
        if data in shared.seen:
            return
        try:
            document = loads_untrusted(data)
        except ValueError:
            return
        if not isinstance(document, dict):
            return
        shared.seen[data] = document
        for subscriber in list(shared.subscribers):
            self._deliver_one(subscriber, document)

    @staticmethod
    def _deliver_one(subscriber: _Subscriber, document: dict[str, Any]) -> None:
        if not subscriber.active:
            return
        try:
            subscriber.on_value(document)
        except Exception:  # one subscriber's bug must not silence the others
            log.exception("listen subscriber failed")

    def _unsubscribe(self, key: str, subscriber: _Subscriber) -> None:
        subscriber.active = False
        shared = self._listens.get(key)
        if shared is None or subscriber not in shared.subscribers:
            return
        shared.subscribers.remove(subscriber)
        if shared.subscribers:
            return
        del self._listens[key]
        shared.live = False
        if not self._closed and shared.token is not None:
            # python3-opendht 2.4 keeps the callback of every ListenToken in ONE class-level
            # dict, so cancelListen releases the callback of the latest listen (a use after
            # free of another key's callback): put this key's back in place first.
            self._opendht.ListenToken._cb["cb"] = shared.callback_ref
            self._runner.cancelListen(shared.token)

    @property
    def listened_keys(self) -> int:
        return len(self._listens)

    # ----------------------------------------------------------------- presence wrappers

    async def publish(self, user: str, device: str, record: dict[str, Any]) -> None:
        await self.put(presence_key(user), device_value_id(device), record)

    async def lookup(self, user: str) -> list[dict[str, Any]]:
        return await self.get(presence_key(user))

    async def close(self) -> None:
        self._closed = True
        for task in list(self._background):
            task.cancel()
        for shared in self._listens.values():
            shared.live = False
        self._listens.clear()
        done = threading.Event()
        self._runner.shutdown(done.set)
        await asyncio.to_thread(done.wait, 5.0)


def _threadsafe(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    """From OpenDHT's thread: queue work for the loop; a closed loop just loses it."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


def _resolve(future: asyncio.Future[bool], ok: bool) -> None:
    if not future.done():
        future.set_result(ok)


def _collect(found: set[bytes], data: bytes, changed: asyncio.Event) -> None:
    if data not in found:
        found.add(data)
        changed.set()
