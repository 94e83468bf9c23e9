"""A secure channel: reliable, ordered-enough JSON messages over sealed datagrams.

Sans-I/O: `receive_untrusted(packet, now)` in, `datagrams(now)` out, `handle_timer(now)` when
`next_timer()` says. The handshake that produced the keys is done before; this core only
seals, acknowledges, retransmits and notices when the other side has gone silent.

Reliability is hop by hop: every reliable message carries a number; the receiver answers with
an acknowledgement (piggybacked on its own messages when it has some) and drops duplicates.
Unacknowledged messages are resent with exponential back-off. A ping when idle keeps NAT
mappings open and proves the peer alive; if nothing is acknowledged for `dead_after` seconds
the channel declares itself dead, which is how a client notices its supernode died.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from punchline.crypto.handshake import SessionKeys
from punchline.crypto.packets import PacketCipher, PacketError
from punchline.util.jsontext import loads_untrusted
from punchline.wire.session import Sealed, encode_sealed, sealed_header


@dataclass(frozen=True)
class ChannelConfig:
    # First retransmission after this many seconds, doubling up to `retransmit_max`.
    retransmit_initial: float = 0.25
    retransmit_max: float = 1.0
    # Idle time after which a ping is sent (well inside NAT UDP timeouts of 30 s and more);
    # None: never ping (a supernode lets its clients keep the path alive).
    ping_interval: float | None = 1.5
    # No acknowledgement for this long: the peer is gone. With the ping interval this bounds
    # how long a client needs to notice its supernode died (≤ 4 s), within the 5 s target.
    dead_after: float = 2.5
    # How many recent message numbers are remembered to drop duplicates.
    dedupe_window: int = 1024
    # Messages waiting for an acknowledgement at most; beyond it the oldest are given up.
    max_unacked: int = 256


@dataclass
class _Outgoing:
    number: int
    message: dict[str, Any]
    first_sent: float
    next_send: float
    backoff: float


class SecureChannel:
    def __init__(self, keys: SessionKeys, now: float, config: ChannelConfig | None = None) -> None:
        self.config = config or ChannelConfig()
        self.session_id = keys.session_id
        self._cipher = PacketCipher(keys)
        self._send_index = 0
        self._next_number = 1
        self._unacked: OrderedDict[int, _Outgoing] = OrderedDict()
        self._pending_acks: list[int] = []
        self._seen: OrderedDict[int, None] = OrderedDict()
        self._out: list[bytes] = []
        self.last_heard = now
        self._last_sent = now
        self.dead = False
        self.counters = {"sent": 0, "received": 0, "resent": 0, "forged": 0, "duplicate": 0}

    # ----------------------------------------------------------------- sending

    def send(self, message: dict[str, Any], now: float, reliable: bool = True) -> None:
        if not reliable:
            self._emit({"m": message}, now)
            return
        number = self._next_number
        self._next_number += 1
        entry = _Outgoing(number, message, now, now + self.config.retransmit_initial,
                          self.config.retransmit_initial)  # fmt: skip
        self._unacked[number] = entry
        while len(self._unacked) > self.config.max_unacked:
            self._unacked.popitem(last=False)
        self._emit({"n": number, "m": message}, now)

    def _emit(self, envelope: dict[str, Any], now: float) -> None:
        if self._pending_acks:
            envelope["a"] = self._pending_acks[:64]
            del self._pending_acks[:64]
        self._send_index += 1
        header = sealed_header(self.session_id, self._send_index)
        body = json.dumps(envelope, separators=(",", ":")).encode()
        self._out.append(encode_sealed(header, self._cipher.seal(self._send_index, header, body)))
        self._last_sent = now
        self.counters["sent"] += 1

    def datagrams(self, now: float) -> list[bytes]:
        if self._pending_acks:
            self._emit({}, now)
        out, self._out = self._out, []
        return out

    # ----------------------------------------------------------------- receiving

    def receive_untrusted(self, packet: Sealed, now: float) -> list[dict[str, Any]]:
        """Open one sealed packet; return the new application messages in it.

        Forged, replayed or garbled packets are counted and dropped: only authenticated bytes
        change any state.
        """
        try:
            body = self._cipher.open_untrusted(packet.index, packet.header, packet.ciphertext)
            envelope = loads_untrusted(body)
        except (PacketError, ValueError):
            self.counters["forged"] += 1
            return []
        if not isinstance(envelope, dict):
            self.counters["forged"] += 1
            return []
        self.last_heard = now
        self.dead = False
        for number in envelope.get("a", []) if isinstance(envelope.get("a"), list) else []:
            if isinstance(number, int):
                self._unacked.pop(number, None)
        message = envelope.get("m")
        number = envelope.get("n")
        if not isinstance(message, dict):
            return []
        if isinstance(number, int):
            self._pending_acks.append(number)
            if number in self._seen:
                self.counters["duplicate"] += 1
                return []
            self._seen[number] = None
            while len(self._seen) > self.config.dedupe_window:
                self._seen.popitem(last=False)
        self.counters["received"] += 1
        return [message]

    # ----------------------------------------------------------------- time

    def next_timer(self) -> float:
        candidates = [float("inf")]
        if self.config.ping_interval is not None and not self.dead:
            candidates.append(self._last_sent + self.config.ping_interval)
        if self._unacked:
            candidates.append(min(o.next_send for o in self._unacked.values()))
            if not self.dead:
                oldest = next(iter(self._unacked.values()))
                deadline = max(oldest.first_sent, self.last_heard) + self.config.dead_after
                candidates.append(deadline)
        return min(candidates)

    def handle_timer(self, now: float) -> None:
        for entry in list(self._unacked.values()):
            if entry.next_send <= now:
                entry.backoff = min(entry.backoff * 2, self.config.retransmit_max)
                entry.next_send = now + entry.backoff
                self.counters["resent"] += 1
                self._emit({"n": entry.number, "m": entry.message}, now)
        if self._unacked:
            oldest = next(iter(self._unacked.values()))
            # compare against the very sum next_timer() named, or float rounding can leave a
            # timer due forever (a busy loop in the driver)
            if now >= max(oldest.first_sent, self.last_heard) + self.config.dead_after:
                self.dead = True
        interval = self.config.ping_interval
        if interval is not None and now >= self._last_sent + interval and not self.dead:
            self.send({"t": "ping"}, now)

    @property
    def unacked(self) -> int:
        return len(self._unacked)
