"""The supernode's protocol core: sessions, presence, lookups and signal routing, without I/O.

Driven like every punchline core: `receive(data, route, now)` for each datagram or TCP frame,
`handle_timer(now)` when `next_timer()` says, then `datagrams()` to send and `actions()` for the
index operations the adapter must run (`lookup_done` feeds their results back).

A `route` names where bytes came from and where answers go: ("udp", (host, port)) or
("tcp:N", (host, port)) for the N-th TCP/TLS connection. Clients are found by session id, not
by address, so a client whose NAT mapping changed keeps its session.

Trust: every presence record is verified before it is stored or served; a client may only
publish its own records naming this supernode; only supernodes may hand signals over to
another supernode. Signal bodies are end-to-end material this node does not open.

Presence: a record that fails verification is dropped and counted (`forged_record`,
`expired_record`), and so is one with a lower sequence number than one already seen for its
device (`stale_record`). With each publish a client hands over a pre-signed offline record;
when its session ends (bye or silence) this node puts that record, keeps it alive (custody) and
sends it to two more supernodes picked by rendezvous hashing, which keep it too, so the user
stays findable, offline with a last-seen time, for 72 hours even if this node dies.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from cryptography import x509

from punchline.crypto import handshake
from punchline.identity.certs import Role
from punchline.overlay.custody import custodians
from punchline.overlay.index import presence_key
from punchline.session.channel import ChannelConfig, SecureChannel
from punchline.session.outbound import Identity, OutboundSession
from punchline.supernode.directory import Directory
from punchline.supernode.watch import Watch
from punchline.wire import presence
from punchline.wire import session as wire

log = structlog.get_logger(component="supernode")

Route = tuple[str, tuple[str, int]]
MAX_MESSAGE_FIELD = 16_384


@dataclass(frozen=True)
class CoreConfig:
    # A session with nothing heard for this long is dropped (clients ping every 1.5 s).
    session_timeout: float = 20.0
    # A HELLO seen again within this time gets the same WELCOME (the first one was lost).
    hello_cache_seconds: float = 30.0
    channel: ChannelConfig = field(default_factory=lambda: ChannelConfig(ping_interval=None))
    link_channel: ChannelConfig = field(default_factory=ChannelConfig)
    # Other supernodes that keep a detached user's offline record alive besides this one.
    offline_custodians: int = 2


@dataclass
class Session:
    peer: handshake.Peer
    channel: SecureChannel
    route: Route
    device: str | None = None
    record: dict[str, Any] | None = None
    seq: int = 0  # of `record`, verified when it was published
    confirmed: bool = False  # the index holds `record`
    offline: dict[str, Any] | None = None  # pre-signed, put when the session ends
    offline_seq: int = -1

    @property
    def subject(self) -> str:
        return self.peer.info.subject

    @property
    def is_supernode(self) -> bool:
        return Role.SUPERNODE in self.peer.info.roles


@dataclass
class Link:
    """This supernode's own session to another supernode, for handing signals over."""

    node_id: str
    route: Route
    session: OutboundSession
    # (session id, request id, callee) of signals queued before the link was up: if it
    # fails, their senders hear "unreachable" instead of waiting for a timeout.
    waiting: list[tuple[bytes, Any, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Publish:
    """Put `record` into the index and keep it alive there until `until` (custody)."""

    user: str
    device: str
    record: dict[str, Any]
    until: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class Release:
    """Stop keeping this device's record alive (its session ended without an offline record)."""

    user: str
    device: str


@dataclass(frozen=True)
class Lookup:
    ref: int
    user: str


Action = Publish | Lookup | Release


@dataclass
class _PendingLookup:
    kind: str  # "lookup" (answer the client) or "route" (deliver a signal)
    session_id: bytes
    request: dict[str, Any]
    user: str


class SupernodeCore:
    def __init__(
        self,
        identity: Identity,
        node_id: str,
        now: float,
        config: CoreConfig | None = None,
        stun: Callable[[bytes, Route], bytes | None] | None = None,
    ) -> None:
        self.identity = identity
        self.node_id = node_id
        self.config = config or CoreConfig()
        self._stun = stun
        self.sessions: dict[bytes, Session] = {}
        self.by_user: dict[str, dict[str, Session]] = {}
        self.links: dict[str, Link] = {}
        # The live supernodes of the bootstrap list (node id -> {"node_id", "addresses"}).
        self.peers: dict[str, dict[str, Any]] = {}
        # Highest sequence number put per (user, device), and until when it matters.
        self.seqs: dict[tuple[str, str], tuple[int, float]] = {}
        self._hellos: dict[bytes, tuple[bytes, float]] = {}
        self._pending: dict[int, _PendingLookup] = {}
        self._refs = itertools.count(1)
        self._out: list[tuple[bytes, Route]] = []
        self._actions: list[Action] = []
        self.counters: dict[str, int] = {
            "malformed": 0, "refused_hello": 0, "sessions_opened": 0, "sessions_closed": 0,
            "unknown_session": 0, "bad_record": 0, "signals_routed": 0, "signals_undeliverable": 0,
            "stun": 0, "forbidden": 0, "forged_record": 0, "stale_record": 0,
            "expired_record": 0, "offline_put": 0, "custody_sent": 0, "custody_received": 0,
        }  # fmt: skip
        self.started = now
        self.watch = Watch(identity.ca)  # contacts: live presence, lists and requests
        self.directory = Directory(identity.ca)  # opt-in listings and searches by name

    @property
    def ca(self) -> x509.Certificate:
        return self.identity.ca

    # ----------------------------------------------------------------- input

    def receive(self, data: bytes, route: Route, now: float) -> None:
        if self._stun is not None and data[:1] in (b"\x00", b"\x01"):
            answer = self._stun(data, route)
            self.counters["stun"] += 1
            if answer is not None:
                self._out.append((answer, route))
            return
        try:
            packet = wire.decode_untrusted(data)
        except wire.SessionPacketError:
            self.counters["malformed"] += 1
            return
        if isinstance(packet, wire.Hello):
            self._hello(packet, data, route, now)
        elif isinstance(packet, wire.Sealed):
            self._sealed(packet, route, now)
        else:
            self._link_packet(packet, route, now)

    def _hello(self, packet: wire.Hello, raw: bytes, route: Route, now: float) -> None:
        try:
            key = handshake.hello_id(packet.hello)
        except handshake.HandshakeError:
            self.counters["refused_hello"] += 1
            return
        cached = self._hellos.get(key)
        if cached is not None:
            self._out.append((cached[0], route))
            return
        try:
            peer, keys, answer = handshake.answer_untrusted(
                packet.hello, self.identity.key, self.identity.certificate, self.ca,
                "session", self.node_id, now, None,
            )  # fmt: skip
        except handshake.HandshakeError as exc:
            self.counters["refused_hello"] += 1
            log.info("session refused", route=route[1], reason=str(exc))
            self._out.append((wire.encode_refused(str(exc)), route))
            return
        if not peer.info.roles & {Role.USER, Role.SUPERNODE}:
            self.counters["refused_hello"] += 1
            self._out.append((wire.encode_refused("only users and supernodes attach"), route))
            return
        session = Session(peer, SecureChannel(keys, now, self.config.channel), route)
        self.sessions[keys.session_id] = session
        welcome = wire.encode_welcome(answer)
        self._hellos[key] = (welcome, now + self.config.hello_cache_seconds)
        self._out.append((welcome, route))
        session.channel.send(
            {"t": "welcome", "node_id": self.node_id, "reflexive": list(route[1])}, now
        )
        self.counters["sessions_opened"] += 1
        log.info("session opened", subject=session.subject, route=route[1])

    def _sealed(self, packet: wire.Sealed, route: Route, now: float) -> None:
        session = self.sessions.get(packet.session_id)
        if session is None:
            for link in self.links.values():
                channel = link.session.channel
                if channel is not None and channel.session_id == packet.session_id:
                    # Links only carry our deliveries out: receiving processes their
                    # acknowledgements; any message on them is not for us to act on.
                    link.session.receive_untrusted(packet, now)
                    return
            self.counters["unknown_session"] += 1
            return
        messages = session.channel.receive_untrusted(packet, now)
        if messages and session.route != route:
            log.info("client address changed", subject=session.subject, route=route[1])
            session.route = route  # authenticated: follow the client to its new address
        for message in messages:
            self._message(session, message, now)

    def _link_packet(self, packet: wire.Packet, route: Route, now: float) -> None:
        for link in self.links.values():
            if link.route == route:
                link.session.receive_untrusted(packet, now)
                return
        self.counters["malformed"] += 1

    # ----------------------------------------------------------------- client messages

    def _message(self, session: Session, message: dict[str, Any], now: float) -> None:
        kind = message.get("t")
        if kind == "ping":
            return
        if kind == "publish":
            self._publish(session, message.get("record"), now)
            if "offline" in message:
                self._offline_record(session, message.get("offline"), now)
        elif kind == "lookup":
            self._lookup(session, "lookup", message)
        elif kind == "signal":
            self._signal(session, message, now)
        elif kind == "deliver" and session.is_supernode:
            self._deliver(message, now)
        elif kind == "custody" and session.is_supernode:
            self._custody_received(session, message.get("record"), now)
        elif kind in Watch.MESSAGES and not session.is_supernode:
            self.watch.message(session.channel.session_id, session.subject, message, now)
        elif kind in Directory.MESSAGES and not session.is_supernode:
            self.directory.message(session.channel.session_id, session.subject, message, now)
        elif kind == "bye":
            self._close(session, "said goodbye", now)
        else:
            self.counters["forbidden" if kind == "deliver" else "malformed"] += 1

    def _rejected(self, exc: presence.PresenceError, origin: str, user: object = None) -> None:
        """Count a record that failed verification, and say so in the log."""
        self.counters["bad_record"] += 1
        self.counters["expired_record" if exc.kind == "expired" else "forged_record"] += 1
        if exc.kind != "expired":
            log.warning("presence record rejected", origin=origin, user=user, reason=str(exc))

    def _stale(self, checked: presence.Presence, origin: str) -> bool:
        """A lower sequence number than one already put for this device: dropped, counted."""
        known = self.seqs.get((checked.user, checked.device))
        if known is None or checked.seq >= known[0]:
            return False
        self.counters["bad_record"] += 1
        self.counters["stale_record"] += 1
        log.info("stale presence record dropped", origin=origin, user=checked.user,
                 device=checked.device, seq=checked.seq, known=known[0])  # fmt: skip
        return True

    def _saw(self, checked: presence.Presence) -> None:
        ident = (checked.user, checked.device)
        known = self.seqs.get(ident)
        if known is None or checked.seq >= known[0]:
            self.seqs[ident] = (checked.seq, checked.expires)

    def _publish(self, session: Session, record: object, now: float) -> None:
        try:
            checked = presence.verify_untrusted(record, self.ca, now, session.subject)
        except presence.PresenceError as exc:
            self._rejected(exc, "client", session.subject)
            session.channel.send({"t": "error", "message": str(exc)}, now)
            return
        if checked.supernode.get("node_id") != self.node_id:
            self.counters["bad_record"] += 1
            session.channel.send({"t": "error", "message": "record names another supernode"}, now)
            return
        if checked.status == "offline":
            self.counters["bad_record"] += 1
            session.channel.send({"t": "error", "message": "say bye to go offline"}, now)
            return
        assert isinstance(record, dict)
        if session.record == record and session.device == checked.device:
            if session.confirmed:  # a republish of what the index holds: custody keeps it
                session.channel.send({"t": "published", "seq": session.seq}, now)
            return
        if self._stale(checked, "client"):
            session.channel.send({"t": "error", "message": "stale presence record"}, now)
            return
        previous = session.device
        if previous is not None and previous != checked.device:
            self.by_user.get(session.subject, {}).pop(previous, None)
            self._actions.append(Release(session.subject, previous))
            session.offline = None
        session.device, session.record, session.seq = checked.device, record, checked.seq
        session.confirmed = False
        if session.offline is not None and session.offline_seq <= checked.seq:
            session.offline = None  # older than this record: useless once it is put
        self._saw(checked)
        self.by_user.setdefault(session.subject, {})[checked.device] = session
        self._actions.append(Publish(session.subject, checked.device, record, checked.expires))

    def _offline_record(self, session: Session, record: object, now: float) -> None:
        """Keep the client's pre-signed offline record, to put when its session ends."""
        try:
            checked = presence.verify_untrusted(record, self.ca, now, session.subject)
        except presence.PresenceError as exc:
            self._rejected(exc, "client", session.subject)
            return
        if (
            checked.status != "offline"
            or checked.device != session.device
            or checked.seq <= session.seq
            or checked.expires > now + presence.LAST_SEEN_WINDOW + 3600
        ):
            self.counters["bad_record"] += 1
            session.channel.send({"t": "error", "message": "unusable offline record"}, now)
            return
        assert isinstance(record, dict)
        session.offline, session.offline_seq = record, checked.seq

    def _went_offline(self, session: Session, now: float) -> None:
        """The session of a device ended: put its offline record, or stop keeping it online."""
        if session.device is None:
            return
        user, device = session.subject, session.device
        try:
            checked = presence.verify_untrusted(session.offline, self.ca, now, user)
        except presence.PresenceError:
            self._actions.append(Release(user, device))
            return
        assert session.offline is not None
        self._saw(checked)
        self.counters["offline_put"] += 1
        self._actions.append(Publish(user, device, session.offline, checked.expires))
        others = [n for n in self.peers if n != self.node_id]
        for node_id in custodians(presence_key(user), others, self.config.offline_custodians):
            if self._send_to_node(node_id, {"t": "custody", "record": session.offline}, now):
                self.counters["custody_sent"] += 1

    def _custody_received(self, session: Session, record: object, now: float) -> None:
        """Another supernode asks this one to keep an offline record alive too."""
        try:
            checked = presence.verify_untrusted(record, self.ca, now)
        except presence.PresenceError as exc:
            self._rejected(exc, f"supernode {session.subject}")
            return
        if checked.status != "offline":
            self.counters["bad_record"] += 1
            return
        if self._stale(checked, f"supernode {session.subject}"):
            return
        assert isinstance(record, dict)
        self._saw(checked)
        self.counters["custody_received"] += 1
        self._actions.append(Publish(checked.user, checked.device, record, checked.expires))

    def set_peers(self, nodes: list[dict[str, Any]]) -> None:
        """The live supernodes (from the CA-signed bootstrap list): custodians come from here."""
        self.peers = {
            str(n["node_id"]): {"node_id": str(n["node_id"]), "addresses": n.get("addresses", [])}
            for n in nodes
            if isinstance(n, dict) and isinstance(n.get("node_id"), str)
        }

    def _send_to_node(self, node_id: str, message: dict[str, Any], now: float) -> bool:
        """Send a message to another supernode over this node's link to it."""
        route = _udp_route(self.peers.get(node_id, {}))
        if route is None:
            return False
        link = self.links.get(node_id)
        if link is None or link.session.state.value == "failed":
            outbound = OutboundSession(self.identity, node_id, now, Role.SUPERNODE,
                                       self.config.link_channel)  # fmt: skip
            link = self.links[node_id] = Link(node_id, route, outbound)
        link.session.send(message, now)
        return True

    def _lookup(self, session: Session, kind: str, request: dict[str, Any]) -> None:
        user = request.get("user") if kind == "lookup" else request.get("to")
        if not isinstance(user, str) or not 0 < len(user) <= 64:
            self.counters["malformed"] += 1
            return
        ref = next(self._refs)
        self._pending[ref] = _PendingLookup(kind, session.channel.session_id, request, user)
        self._actions.append(Lookup(ref, user))

    def published(self, user: str, device: str, record: dict[str, Any], now: float) -> None:
        """The index holds `record`: tell the device, which only now is findable by others
        (a call placed before this lands while the DHT put is still under way)."""
        session = self.by_user.get(user, {}).get(device)
        if session is not None and session.record is record:
            session.confirmed = True
            session.channel.send({"t": "published", "seq": session.seq}, now)

    def lookup_done(self, ref: int, records: list[dict[str, Any]], now: float) -> None:
        pending = self._pending.pop(ref, None)
        if pending is None:
            return
        user = pending.user
        best = self.best_records(user, records, now)
        session = self.sessions.get(pending.session_id)
        if pending.kind == "lookup":
            if session is not None:
                summary = presence.summarize(user, [p for p, _r in best.values()])
                session.channel.send(
                    {"t": "lookup_result", "id": pending.request.get("id"), "user": user,
                     "records": [r for p, r in best.values() if p.status != "offline"],
                     **summary.as_json()},
                    now,
                )  # fmt: skip
            return
        reachable = [p for p, _r in best.values() if p.status != "offline"]
        self._route(session, pending.request, reachable, now)

    def best_records(
        self, user: str, records: list[dict[str, Any]], now: float
    ) -> dict[str, tuple[presence.Presence, dict[str, Any]]]:
        """The freshest verified record per device, from the index and this node's sessions.

        Records failing verification are dropped and counted; so are records older than one
        seen for the same device (the DHT holds older copies until they expire, and a replayed
        one must not win)."""
        valid = []
        for record in records:
            try:
                valid.append((presence.verify_untrusted(record, self.ca, now, user), record))
            except presence.PresenceError as exc:
                self._rejected(exc, "index", user)
        for local in self.by_user.get(user, {}).values():
            if local.record is None:
                continue
            try:
                checked = presence.verify_untrusted(local.record, self.ca, now, user)
            except presence.PresenceError:
                continue  # expired while the client stayed attached without republishing
            valid.append((checked, local.record))
        best: dict[str, tuple[presence.Presence, dict[str, Any]]] = {}
        for checked, record in sorted(valid, key=lambda pr: pr[0].seq):
            current = best.get(checked.device)
            if current is not None and current[1] != record and current[0].seq < checked.seq:
                self.counters["stale_record"] += 1
            best[checked.device] = (checked, record)
        for checked, _record in best.values():
            self._saw(checked)
        return best

    # ----------------------------------------------------------------- signaling

    def _signal(self, session: Session, message: dict[str, Any], now: float) -> None:
        if session.device is None:
            session.channel.send(
                {
                    "t": "signal_error",
                    "ref": message.get("id"),
                    "to": message.get("to"),
                    "reason": "publish presence first",
                },
                now,
            )
            return
        if not isinstance(message.get("body"), dict):
            self.counters["malformed"] += 1
            return
        # Devices attached here get the signal at once; the index is asked for the others.
        local = self._local_targets(message, now)
        envelope = self._envelope(session, message)
        for target in local:
            self._deliver_one(target, envelope, now)
        message = {**message, "_delivered": [t.device for t in local]}
        self._lookup(session, "route", message)

    def _local_targets(self, message: dict[str, Any], now: float) -> list[presence.Presence]:
        found = []
        for device, local in self.by_user.get(str(message.get("to")), {}).items():
            wanted = message.get("to_device")
            if local.record is None or wanted not in (None, device):
                continue
            try:
                found.append(presence.verify_untrusted(local.record, self.ca, now))
            except presence.PresenceError:
                continue
        return found

    @staticmethod
    def _envelope(session: Session, message: dict[str, Any]) -> dict[str, Any]:
        return {
            "t": "deliver", "from": session.subject, "from_device": session.device,
            "to": message.get("to"), "body": message.get("body"),
        }  # fmt: skip

    def _route(
        self,
        session: Session | None,
        message: dict[str, Any],
        targets: list[presence.Presence],
        now: float,
    ) -> None:
        if session is None:
            return
        to_device = message.get("to_device")
        envelope = self._envelope(session, message)
        already = message.get("_delivered", [])
        delivered = len(already)
        for target in targets:
            if (to_device is not None and target.device != to_device) or target.device in already:
                continue
            origin = (session.channel.session_id, message.get("id"), message.get("to"))
            delivered += self._deliver_one(target, envelope, now, origin)
        if delivered:
            self.counters["signals_routed"] += 1
            return
        self.counters["signals_undeliverable"] += 1
        session.channel.send(
            {"t": "signal_error", "ref": message.get("id"), "to": message.get("to"),
             "reason": "offline"},
            now,
        )  # fmt: skip

    def _deliver_one(
        self,
        target: presence.Presence,
        envelope: dict[str, Any],
        now: float,
        origin: tuple[bytes, Any, Any] | None = None,
    ) -> int:
        node_id = target.supernode.get("node_id")
        if node_id == self.node_id:
            local = self.by_user.get(target.user, {}).get(target.device)
            if local is None:
                return 0
            local.channel.send(_signal_for(envelope), now)
            return 1
        route = _udp_route(target.supernode)
        if not isinstance(node_id, str) or route is None:
            return 0
        link = self.links.get(node_id)
        if link is None or link.session.state.value == "failed":
            outbound = OutboundSession(self.identity, node_id, now, Role.SUPERNODE,
                                       self.config.link_channel)  # fmt: skip
            link = self.links[node_id] = Link(node_id, route, outbound)
        link.session.send({**envelope, "to_device": target.device}, now)
        if origin is not None and not link.session.established:
            link.waiting.append(origin)
        return 1

    def _deliver(self, envelope: dict[str, Any], now: float) -> None:
        user, device = envelope.get("to"), envelope.get("to_device")
        local = self.by_user.get(str(user), {}).get(str(device))
        if local is None:
            self.counters["signals_undeliverable"] += 1
            return
        local.channel.send(_signal_for(envelope), now)

    def _reap_links(self, now: float) -> None:
        """Drop failed links (a link can fail while sending, not only on a timer)."""
        for node_id, link in list(self.links.items()):
            if link.session.established:
                link.waiting.clear()
            elif link.session.state.value == "failed":
                log.info("supernode link failed", node=node_id, reason=link.session.failure)
                del self.links[node_id]
                self._unreachable(link, now)

    def _unreachable(self, link: Link, now: float) -> None:
        for session_id, ref, to in link.waiting:
            origin = self.sessions.get(session_id)
            if origin is not None:
                self.counters["signals_undeliverable"] += 1
                origin.channel.send(
                    {"t": "signal_error", "ref": ref, "to": to, "reason": "unreachable"}, now
                )

    # ----------------------------------------------------------------- time and output

    def _close(self, session: Session, why: str, now: float | None = None) -> None:
        self.sessions.pop(session.channel.session_id, None)
        self.watch.drop(session.channel.session_id)
        self.directory.drop(session.channel.session_id)
        if session.device is not None:
            devices = self.by_user.get(session.subject, {})
            if devices.get(session.device) is session:
                del devices[session.device]
                self._went_offline(session, session.channel.last_heard if now is None else now)
            if not devices:
                self.by_user.pop(session.subject, None)
        self.counters["sessions_closed"] += 1
        log.info("session closed", subject=session.subject, reason=why)

    def handle_timer(self, now: float) -> None:
        for session in list(self.sessions.values()):
            if now >= session.channel.last_heard + self.config.session_timeout:
                self._close(session, "silent", now)
            else:
                session.channel.handle_timer(now)
        for link in self.links.values():
            link.session.handle_timer(now)
        self._reap_links(now)
        self._hellos = {h: v for h, v in self._hellos.items() if v[1] > now}
        if len(self.seqs) > 10_000:  # forget sequence numbers of records long expired
            self.seqs = {k: v for k, v in self.seqs.items() if v[1] > now - 3600}

    def next_timer(self) -> float:
        times = [s.channel.next_timer() for s in self.sessions.values()]
        times += [
            s.channel.last_heard + self.config.session_timeout for s in self.sessions.values()
        ]
        times += [link.session.next_timer() for link in self.links.values()]
        return min(times, default=float("inf"))

    def datagrams(self, now: float) -> list[tuple[bytes, Route]]:
        out, self._out = self._out, []
        for session_id, message in [*self.watch.pushes(), *self.directory.pushes()]:
            if (target := self.sessions.get(session_id)) is not None:
                target.channel.send(message, now)
        for session in self.sessions.values():
            out += [(d, session.route) for d in session.channel.datagrams(now)]
        for link in self.links.values():
            out += [(d, link.route) for d in link.session.datagrams(now)]
        if any(link.session.state.value == "failed" for link in self.links.values()):
            self._reap_links(now)  # their senders' errors go out with the next flush
        return out

    def actions(self) -> list[Action]:
        out, self._actions = self._actions, []
        return out


def _signal_for(envelope: dict[str, Any]) -> dict[str, Any]:
    return {"t": "signal", "from": envelope.get("from"),
            "from_device": envelope.get("from_device"), "body": envelope.get("body")}  # fmt: skip


def _udp_route(supernode: dict[str, Any]) -> Route | None:
    addresses = supernode.get("addresses")
    if not isinstance(addresses, list):
        return None
    for address in addresses:
        if isinstance(address, dict) and address.get("transport") == "udp":
            host, port = address.get("host"), address.get("port")
            if isinstance(host, str) and isinstance(port, int):
                return ("udp", (host, port))
    return None
