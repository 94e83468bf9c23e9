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
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from punchline.crypto import handshake
from punchline.crypto.handshake import SessionKeys
from punchline.identity.certs import Role
from punchline.session.outbound import Identity


class CallState(Enum):
    IDLE = "idle"
    INVITING = "inviting"
    RINGING = "ringing"
    INCOMING = "incoming"
    ACTIVE = "active"
    ENDED = "ended"


LIVE = frozenset({CallState.INVITING, CallState.RINGING, CallState.INCOMING, CallState.ACTIVE})


@dataclass(frozen=True)
class CallConfig:
    # No ringing from any device within this time: the callee is unreachable.
    invite_timeout: float = 10.0
    # Ringing but nobody answers.
    ring_timeout: float = 60.0


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
    _pending: handshake.PendingHandshake | None = None
    _deadline: float = float("inf")
    _out: list[Outgoing] = field(default_factory=list)

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
        self._connected(now)

    def trickle(self, candidates: list[dict[str, Any]]) -> None:
        """Candidates found after the invite or answer went out (a relay, predicted ports)."""
        if self.state in LIVE:
            self._send({"type": "candidates", "candidates": candidates})

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
        if self.state is CallState.ENDED:
            return  # both sides hung up at once: the first reason stands
        kind = body.get("type")
        if self.outgoing and self.state in (CallState.INVITING, CallState.RINGING):
            if kind == "ringing":
                if self.state is CallState.INVITING:
                    self.state = CallState.RINGING
                    self._deadline = now + self.config.ring_timeout
                return
            if kind == "answer":
                self._answered(sender_device, body, now)
                return
        if kind == "reject":
            self._end(str(body.get("reason", "rejected"))[:40], now)
        elif kind in ("hangup", "cancel"):
            self._end("peer hung up" if kind == "hangup" else "cancelled", now)

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
        media = body.get("media")
        self.peer_media = media if isinstance(media, dict) else {}
        self._connected(now)

    def unreachable(self, reason: str, now: float) -> None:
        """The network could not deliver the invite (the callee is offline or unknown)."""
        if self.state in (CallState.INVITING, CallState.RINGING):
            self._end(reason, now)

    def _connected(self, now: float) -> None:
        self.state = CallState.ACTIVE
        self.connected_at = now
        self._deadline = float("inf")

    def _end(self, reason: str, now: float) -> None:
        self.state = CallState.ENDED
        self.end_reason = reason
        self._deadline = float("inf")
        self.ended_at = now

    def _send(self, body: dict[str, Any]) -> None:
        to_device = self.peer_device if self.state is not CallState.IDLE else None
        self._out.append(Outgoing(self.peer, {**body, "call_id": self.call_id}, to_device))

    def next_timer(self) -> float:
        return self._deadline

    def handle_timer(self, now: float) -> None:
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
