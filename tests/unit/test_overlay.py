"""The overlay contract (put/get/listen), on the in-process MemoryIndex and on real OpenDHT nodes.

The DHT half runs a handful of real OpenDHT nodes on loopback inside this process: it checks the
traps we design around (listen callbacks land on the event loop; cancelling one of several
listens leaves the others working; changed documents are seen although OpenDHT refuses to
replace a value in place).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from punchline.overlay.dht import DhtConfig, DhtIndex
from punchline.overlay.index import MAX_DOCUMENT_BYTES, MemoryIndex, Overlay, device_value_id


def doc(n: int, who: str = "alice") -> dict[str, Any]:
    return {"payload": f'{{"user":"{who}","seq":{n}}}', "sig": "x" * 8}


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def contract(a: Overlay, b: Overlay) -> None:
    """What every overlay must do; `a` and `b` are two views of one network."""
    loop_thread = threading.get_ident()
    heard: dict[str, list[dict[str, Any]]] = {"one": [], "two": [], "other": [], "gone": []}
    threads: set[int] = set()

    def recorder(name: str) -> Callable[[dict[str, Any]], None]:
        def on_value(document: dict[str, Any]) -> None:
            threads.add(threading.get_ident())
            heard[name].append(document)

        return on_value

    one = b.listen("test/k", recorder("one"))
    b.listen("test/k", recorder("two"))
    b.listen("test/other", recorder("other"))
    gone = b.listen("test/gone", recorder("gone"))
    await asyncio.sleep(0.3)  # let the listens reach the nodes holding the keys
    await a.put("test/k", 1, doc(1))
    await until(lambda: len(heard["one"]) == 1 and len(heard["two"]) == 1)
    assert doc(1) in await b.get("test/k")
    # A changed document under the same value id is heard and found.
    await a.put("test/k", 1, doc(2))
    await until(lambda: doc(2) in heard["two"])
    assert doc(2) in await b.get("test/k")
    # Cancelling one of two listens on a key, and the only listen on another key: the rest work.
    one.cancel()
    gone.cancel()
    count_one = len(heard["one"])
    await a.put("test/k", 2, doc(3, "bob"))
    await a.put("test/other", 1, doc(4))
    await a.put("test/gone", 1, doc(5))
    await until(lambda: doc(3, "bob") in heard["two"] and doc(4) in heard["other"])
    await asyncio.sleep(0.2)
    assert len(heard["one"]) == count_one
    assert heard["gone"] == []
    assert threads == {loop_thread}
    assert await b.get("test/nothing") == []
    with pytest.raises(ValueError, match="limit"):
        await a.put("test/k", 3, {"payload": "x" * MAX_DOCUMENT_BYTES})


def test_memory_index_keeps_the_contract() -> None:
    async def main() -> None:
        network = MemoryIndex()
        await contract(network, network)
        await network.publish("carol", "laptop", doc(7, "carol"))
        assert await network.lookup("carol") == [doc(7, "carol")]

    asyncio.run(main())


async def with_dht(count: int, body: Callable[[list[DhtIndex]], Awaitable[None]]) -> None:
    first = DhtIndex(DhtConfig(bind_host="127.0.0.1", unlimited_rate=True, network_id=0x7E57))
    nodes = [first]
    try:
        for _ in range(count - 1):
            nodes.append(
                DhtIndex(
                    DhtConfig(
                        bind_host="127.0.0.1",
                        unlimited_rate=True,
                        network_id=0x7E57,
                        bootstrap=(("127.0.0.1", first.port),),
                    )
                )
            )
        await asyncio.sleep(1.0)  # routing tables fill
        await body(nodes)
    finally:
        await asyncio.gather(*(node.close() for node in nodes))


def test_dht_index_keeps_the_contract() -> None:
    async def body(nodes: list[DhtIndex]) -> None:
        await contract(nodes[1], nodes[3])
        assert nodes[3].listened_keys == 2
        # Presence wrappers: one value per device, found from another node.
        await nodes[2].publish("carol", "laptop", doc(7, "carol"))
        await nodes[2].publish("carol", "phone", doc(8, "carol"))
        found = await nodes[0].lookup("carol")
        assert doc(7, "carol") in found
        assert doc(8, "carol") in found
        # A late subscriber to a key already listened to hears what is there.
        late: list[dict[str, Any]] = []
        nodes[3].listen("test/other", late.append)
        await until(lambda: doc(4) in late)

    asyncio.run(with_dht(4, body))


def test_device_value_ids_are_stable_nonzero_and_distinct() -> None:
    ids = {device_value_id(f"device-{n}") for n in range(1000)}
    assert len(ids) == 1000
    assert 0 not in ids
    assert device_value_id("laptop") == device_value_id("laptop") < 2**63


def test_a_put_stored_nowhere_returns_at_once_and_is_retried_in_the_background() -> None:
    async def main() -> None:
        lone = DhtIndex(DhtConfig(bind_host="127.0.0.1", network_id=0x7E58, put_retries=1))
        try:
            loop = asyncio.get_running_loop()
            start = loop.time()
            await lone.put("test/k", 1, doc(1))
            assert loop.time() - start < 0.4
            await until(lambda: lone.counters["put_failures"] == 1, timeout=3.0)
            assert lone.counters["reputs_on_miss"] == 1
        finally:
            await lone.close()

    asyncio.run(main())
