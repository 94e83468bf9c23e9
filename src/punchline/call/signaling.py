"""One call's signaling, as a state machine with no I/O (invite, ring, answer, end).

The bodies travel end to end through supernodes, which cannot read the key material that
matters: the invite carries the caller's handshake hello (its certificate and a signed
ephemeral key, addressed to the callee), the answer the callee's reply. Both sides check the
other's certificate against the CA and that it names the user the supernode claims. Media keys
come from that handshake only, so a supernode or relay can never decrypt the call.

Transitions (a table, as in h11):

    caller: IDLE -invite-> INVITING -ringing-> RINGING -answer-> ACTIVE -hangup-> ENDED
    callee: IDLE -invite-> INCOMING -accept-> ACTIVE;  -reject/busy-> ENDED
    any live state -cancel/hangup/timeout/error-> ENDED

Several devices: an invite without a device goes to every online device of the callee, and
each rings back. The first valid answer wins: the caller binds to that device (`peer_device`)
and sends a `cancel` ("answered elsewhere") to every other device it heard from, then and
whenever one of them rings or answers later, so a late answer is refused and never gets a
second media session. After the caller binds, only the bound device has a say in the call. A
"busy" device does not end a call that another device may still take: the call ends busy only
if no other device rings within `busy_grace`. A decline on one device ends the call and stops
the others ("declined elsewhere").
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from punchline.crypto import handshake
from punchline.crypto.handshake import SessionKeys
from punchline.identity.certs import Role
from punchline.identity.keys import key_id
from punchline.session.outbound import Identity


class CallState(Enum):
    IDLE = "idle"
    INVITING = "inviting"
    RINGING = "ringing"
    INCOMING = "incoming"
    ACTIVE = "active"
    ENDED = "ended"


LIVE = frozenset({CallState.INVITING, CallState.RINGING, CallState.INCOMING, CallState.ACTIVE})

# The caller's reasons for a `cancel` to a device that lost the race, and what that device says.
ANSWERED_ELSEWHERE = "answered elsewhere"
DECLINED_ELSEWHERE = "declined elsewhere"
ANSWERED_ON_ANOTHER_DEVICE = "answered on another device"
DECLINED_ON_ANOTHER_DEVICE = "declined on another device"
_CANCEL_ENDS = {ANSWERED_ELSEWHERE: ANSWERED_ON_ANOTHER_DEVICE,
                DECLINED_ELSEWHERE: DECLINED_ON_ANOTHER_DEVICE}  # fmt: skip
MAX_DEVICE_ID = 64


@dataclass(frozen=True)
class CallConfig:
    # No ringing from any device within this time: the callee is unreachable.
    invite_timeout: float = 10.0
    # Ringing but nobody answers.
    ring_timeout: float = 60.0
    # A device said busy and no other rings: wait this long for a slower device to ring
    # (an invite reaches devices on other supernodes one index lookup later).
    busy_grace: float = 1.5


@dataclass(frozen=True)
class Outgoing:
    """A signal to send: to a user, optionally one device of theirs."""

    to: str
    body: dict[str, Any]
    to_device: str | None = None


@dataclass
class Call:
    call_id: str
    peer: str
    outgoing: bool
    identity: Identity
    user: str
    config: CallConfig
    started: float
    state: CallState = CallState.IDLE
    peer_device: str | None = None
    keys: SessionKeys | None = None
    peer_media: dict[str, Any] = field(default_factory=dict)
    end_reason: str = ""
    connected_at: float | None = None
    ended_at: float | None = None
    rejected_answers: int = 0
    problem: str = ""
    # The callee's device that took the call (the caller's view; a callee shows its own, or
    # the one the caller named when it stopped this device ringing).
    answered_by: str | None = None
    # This side's own device (a callee's key id; "" for a caller, which does not need it).
    device: str = ""
    _pending: handshake.PendingHandshake | None = None
    _deadline: float = float("inf")
    _busy_at: float = float("inf")
    _out: list[Outgoing] = field(default_factory=list)
    # Caller side: devices of the callee heard ringing, that said busy, that were told to stop.
    _ringing: set[str] = field(default_factory=set)
    _busy: set[str] = field(default_factory=set)
    _told: set[str] = field(default_factory=set)
    _stop_reason: str = ""

    # ----------------------------------------------------------------- caller side

    @classmethod
    def place(
        cls,
        identity: Identity,
        user: str,
        peer: str,
        media: dict[str, Any],
        now: float,
        config: CallConfig | None = None,
    ) -> Call:
        call = cls(secrets.token_hex(8), peer, True, identity, user, config or CallConfig(), now)
        call._pending = handshake.start(identity.key, identity.certificate, "call", peer, now)
        call._send({"type": "invite", "hello": call._pending.hello, "media": media})
        call.state = CallState.INVITING
        call._deadline = now + call.config.invite_timeout
        return call

    # ----------------------------------------------------------------- callee side

    @classmethod
    def incoming_untrusted(
        cls,
        identity: Identity,
        user: str,
        sender: str,
        sender_device: str,
        body: dict[str, Any],
        now: float,
        config: CallConfig | None = None,
    ) -> tuple[Call, dict[str, Any]]:
        """Check an invite; returns the call (INCOMING) and the handshake answer to send later.

        Raises `handshake.HandshakeError` when the invite is forged, stale, not for us, or its
        certificate names someone other than the user the supernode says sent it.
        """
        call_id = body.get("call_id")
        if not isinstance(call_id, str) or not 0 < len(call_id) <= 64:
            raise handshake.HandshakeError("invite without a call id")
        peer, keys, answer = handshake.answer_untrusted(
            body.get("hello"), identity.key, identity.certificate, identity.ca, "call", user,
            now, Role.USER,
        )  # fmt: skip
        if peer.info.subject != sender:
            raise handshake.HandshakeError(
                f"invite signed by {peer.info.subject!r} but delivered as from {sender!r}"
            )
        call = cls(call_id, sender, False, identity, user, config or CallConfig(), now)
        call.peer_device, call.keys = sender_device, keys
        call.device = key_id(identity.key.public_key())
        media = body.get("media")
        call.peer_media = media if isinstance(media, dict) else {}
        call.state = CallState.INCOMING
        call._deadline = now + call.config.ring_timeout
        call._send({"type": "ringing"})
        return call, answer

    def accept(self, answer: dict[str, Any], media: dict[str, Any], now: float) -> None:
        if self.state is not CallState.INCOMING:
            return
        self._send({"type": "answer", "answer": answer, "media": media})
        self.answered_by = self.device
        self._connected(now)

    def trickle(self, candidates: list[dict[str, Any]], restart: bool = False) -> None:
        """Candidates found after the invite or answer went out (a relay, predicted ports);
        `restart`: our addresses changed and these are all we offer now."""
        if self.state in LIVE:
            body: dict[str, Any] = {"type": "candidates", "candidates": candidates}
            if restart:
                body["restart"] = True
            self._send(body)

    def reject(self, reason: str, now: float) -> None:
        if self.state is CallState.INCOMING:
            self._send({"type": "reject", "reason": reason})
            self._end(reason, now)

    # ----------------------------------------------------------------- both

    def hangup(self, now: float, reason: str = "hung up") -> None:
        if self.state in LIVE:
            kind = "hangup" if self.state is CallState.ACTIVE else "cancel"
            if self.state is CallState.INCOMING:
                kind, reason = "reject", "declined"
            self._send({"type": kind, "reason": reason})
            self._end(reason, now)

    def signal_untrusted(self, sender_device: str, body: dict[str, Any], now: float) -> None:
        kind = body.get("type")
        if self.outgoing:
            self._caller_signal(sender_device, kind, body, now)
        else:
            self._callee_signal(sender_device, kind, body, now)

    def _caller_signal(self, device: str, kind: object, body: dict[str, Any], now: float) -> None:
        if self.state in (CallState.INVITING, CallState.RINGING):
            if kind == "ringing":
                self._rings(device, now)
            elif kind == "answer":
                self._answered(device, body, now)
            elif kind == "reject":
                self._rejected(device, str(body.get("reason", "rejected"))[:40], now)
            elif kind in ("hangup", "cancel"):
                self._end("peer hung up" if kind == "hangup" else "cancelled", now)
            return
        if device != self.peer_device:
            # Another device of the callee, late: the call is taken (or over); it stops ringing.
            if kind in ("ringing", "answer"):
                self._stop_ringing(device, self._stop_reason or "hung up")
            return
        if self.state is CallState.ENDED:
            return  # both sides hung up at once: the first reason stands
        if kind == "reject":
            self._end(str(body.get("reason", "rejected"))[:40], now)
        elif kind in ("hangup", "cancel"):
            self._end("peer hung up" if kind == "hangup" else "cancelled", now)

    def _callee_signal(self, device: str, kind: object, body: dict[str, Any], now: float) -> None:
        if self.state is CallState.ENDED or device != self.peer_device:
            return  # only the caller's device that invited us has a say
        if kind == "reject":
            self._end(str(body.get("reason", "rejected"))[:40], now)
        elif kind == "hangup":
            self._end("peer hung up", now)
        elif kind == "cancel":
            reason = body.get("reason")
            ending = _CANCEL_ENDS.get(reason) if isinstance(reason, str) else None
            winner = body.get("answered_by")
            if ending == ANSWERED_ON_ANOTHER_DEVICE and winner == self.device:
                return  # we are the device that took the call
            if isinstance(winner, str) and 0 < len(winner) <= MAX_DEVICE_ID:
                self.answered_by = winner
            self._end(ending or "cancelled", now)

    def _rings(self, device: str, now: float) -> None:
        self._ringing.add(device)
        self._busy_at = float("inf")  # a device that may still take the call
        if self.state is CallState.INVITING:
            self.state = CallState.RINGING
            self._deadline = now + self.config.ring_timeout

    def _rejected(self, device: str, reason: str, now: float) -> None:
        if reason != "busy":
            self._end(reason, now)  # declined: by the user, so on every device
            self._stop_reason = DECLINED_ELSEWHERE
            for other in sorted(self._ringing - {device}):
                self._stop_ringing(other, DECLINED_ELSEWHERE)
            return
        self._busy.add(device)
        self._ringing.discard(device)
        if not self._ringing:
            self._busy_at = min(self._busy_at, now + self.config.busy_grace)

    def _stop_ringing(self, device: str, reason: str) -> None:
        if device in self._told or not 0 < len(device) <= MAX_DEVICE_ID:
            return
        self._told.add(device)
        body: dict[str, Any] = {"type": "cancel", "reason": reason, "call_id": self.call_id}
        if self.answered_by is not None:
            body["answered_by"] = self.answered_by
        self._out.append(Outgoing(self.peer, body, device))

    def _answered(self, sender_device: str, body: dict[str, Any], now: float) -> None:
        assert self._pending is not None
        try:
            _peer, keys = self._pending.finish_untrusted(
                body.get("answer"), self.identity.ca, now, Role.USER, self.peer
            )
        except handshake.HandshakeError as exc:
            # Not authenticated, so not allowed to end the call: an injected answer must not
            # stop the genuine one. The call keeps waiting; the problem shows if it times out.
            self.rejected_answers += 1
            self.problem = f"answer rejected: {exc}"
            return
        self.keys, self.peer_device = keys, sender_device
        self.answered_by = sender_device
        media = body.get("media")
        self.peer_media = media if isinstance(media, dict) else {}
        self._connected(now)
        self._stop_reason = ANSWERED_ELSEWHERE
        for other in sorted(self._ringing):
            if other != sender_device:
                self._stop_ringing(other, ANSWERED_ELSEWHERE)

    def unreachable(self, reason: str, now: float) -> None:
        """The network could not deliver the invite (the callee is offline or unknown)."""
        if self.state in (CallState.INVITING, CallState.RINGING):
            self._end(reason, now)

    def _connected(self, now: float) -> None:
        self.state = CallState.ACTIVE
        self.connected_at = now
        self._deadline = self._busy_at = float("inf")

    def _end(self, reason: str, now: float) -> None:
        self.state = CallState.ENDED
        self.end_reason = reason
        self._deadline = self._busy_at = float("inf")
        self.ended_at = now

    def _send(self, body: dict[str, Any]) -> None:
        to_device = self.peer_device if self.state is not CallState.IDLE else None
        self._out.append(Outgoing(self.peer, {**body, "call_id": self.call_id}, to_device))

    def next_timer(self) -> float:
        return min(self._deadline, self._busy_at)

    def handle_timer(self, now: float) -> None:
        if now >= self._busy_at and self.state in (CallState.INVITING, CallState.RINGING):
            self._end("busy", now)  # every device that answered at all is in another call
            return
        if now < self._deadline:
            return
        if self.state is CallState.INVITING:
            self._send({"type": "cancel", "reason": "timeout"})
            self._end("no answer from the callee's devices (offline?)", now)
        elif self.state is CallState.RINGING:
            self._send({"type": "cancel", "reason": "timeout"})
            self._end("not answered" + (f" ({self.problem})" if self.problem else ""), now)
        elif self.state is CallState.INCOMING:
            self._end("not answered", now)

    def outgoing_signals(self) -> list[Outgoing]:
        out, self._out = self._out, []
        return out
