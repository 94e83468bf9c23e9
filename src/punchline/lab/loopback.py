"""A whole punchline network of real processes on loopback, for the demo and end-to-end tests.

Login server, supernodes (each with its OpenDHT node) and user daemons are separate
processes started with the real command line and killed for real; nothing is simulated.
Where each process runs is one overridable decision (`Network.place`): here everything is on
127.0.0.1 with ports the kernel picks; `lab.network.LabNetwork` runs the same processes inside
the hosts of the NAT lab.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from punchline.auth import launcher
from punchline.auth.server import READY_FILE
from punchline.client import account, control
from punchline.client.store import IdentityStore
from punchline.errors import LocalError


class NotReady(LocalError):
    """A process of the network exited or did not become ready in time."""


def _wait_for(check: Any, timeout: float, what: str, process: subprocess.Popen[bytes]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if process.poll() is not None:
            raise NotReady(f"{what} exited with status {process.returncode}")
        time.sleep(0.05)
    raise NotReady(f"{what} not ready after {timeout} s")


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Supernode(Proc):
    node_id: str = ""
    dht_port: int = 0
    udp_port: int = 0
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class Placement:
    """Where one process of the network runs: behind which command prefix (`ip netns exec NS`
    in the lab) and on which address and port it listens (0: the kernel picks)."""

    prefix: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 0

    @property
    def listen(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class Relay(Proc):
    node_id: str = ""
    udp_port: int = 0
    tcp_ports: list[int] = field(default_factory=list)
    health_port: int = 0


def _ready_file(path: Path, process: subprocess.Popen[bytes]) -> Any:
    """A check for `_wait_for`: the JSON a node writes once it serves, if it is this process's."""

    def ready() -> dict[str, Any] | None:
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return value if value.get("pid") == process.pid else None

    return ready


@dataclass
class Network:
    root: Path
    auth: launcher.AuthProcess | None = None
    supernodes: list[Supernode] = field(default_factory=list)
    daemons: dict[str, Proc] = field(default_factory=dict)
    relays: list[Relay] = field(default_factory=list)
    # The operator's enrolment secret of this throw-away network.
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(16))

    def place(self, name: str) -> Placement:
        """Where process `name` (auth, sn1, relay1, a user) runs: all on loopback here."""
        return Placement()

    def start_auth(self, *extra: str) -> None:
        """The login server, spawned like every other process here (launcher.start's
        ready-file handshake, but through `place`, so it can run inside a lab host)."""
        data = self.root / "auth"
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        args = ["auth", "serve", "--data", str(data), "--listen", self.place("auth").listen,
                "--enroll-secret", self.secret, *extra]  # fmt: skip
        process, log = self._spawn("auth", args)
        info = _wait_for(_ready_file(data / READY_FILE, process), 30, "login server", process)
        self.auth = launcher.AuthProcess(data, process, info["url"], info["ca_fingerprint"],
                                         log, args)  # fmt: skip

    def _spawn(self, name: str, args: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.root / f"{name}.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [*self.place(name).prefix, sys.executable, "-m", "punchline", *args],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        return process, log

    def start_supernode(self, *extra: str) -> Supernode:
        assert self.auth is not None
        name = f"sn{len(self.supernodes) + 1}"
        data = self.root / name
        where = self.place(name)
        args = ["supernode", "--data", str(data), "--listen", where.listen, "--auth",
                self.auth.url, "--enroll-secret", self.secret, "--loopback-lab"]  # fmt: skip
        for other in self.supernodes:
            args += ["--bootstrap", f"{other.host}:{other.dht_port}"]
        args += list(extra)
        process, log = self._spawn(name, args)
        info = _wait_for(_ready_file(data / "supernode.json", process), 30, name, process)
        node = Supernode(name, process, log, info["node_id"], info["dht_port"], info["udp"][1],
                         where.host)  # fmt: skip
        self.supernodes.append(node)
        return node

    def start_relay(self, *extra: str) -> Relay:
        """A relay node; peers on private addresses allowed (loopback, and the lab's addresses
        are all private or reserved to Python's `ipaddress`)."""
        assert self.auth is not None
        name = f"relay{len(self.relays) + 1}"
        data = self.root / name
        args = ["relay", "--data", str(data), "--listen", self.place(name).listen, "--auth",
                self.auth.url,
                "--enroll-secret", self.secret, "--allow-private-peers", *extra]  # fmt: skip
        process, log = self._spawn(name, args)
        info = _wait_for(_ready_file(data / "relay.json", process), 30, name, process)
        relay = Relay(name, process, log, info["node_id"], info["udp"], info["tcp_ports"],
                      info["health_port"])  # fmt: skip
        self.relays.append(relay)
        return relay

    def signup(self, user: str) -> account.Identity:
        assert self.auth is not None
        password = secrets.token_urlsafe(16)
        return account.signup(IdentityStore(self.root / user), self.auth.url, user, password)

    def spawn_daemon(self, user: str, *extra: str) -> Proc:
        """Start `user`'s daemon without waiting for it to come online (see `start_daemon`)."""
        process, log = self._spawn(user, ["up", "--data", str(self.root / user), *extra])
        proc = Proc(user, process, log)
        self.daemons[user] = proc
        return proc

    def start_daemon(self, user: str, *extra: str) -> Proc:
        proc = self.spawn_daemon(user, *extra)
        # online means findable: attached, and the index holds the presence record
        _wait_for(lambda: self.status(user).get("published"), 30, f"daemon {user}", proc.process)
        return proc

    def status(self, user: str) -> dict[str, Any]:
        """The daemon's status over its control socket, in-process: cheap enough to poll."""

        async def ask() -> dict[str, Any]:
            async for reply in control.request(self.root / user, {"op": "status"}):
                return reply
            return {}

        try:
            return asyncio.run(ask())
        except (control.DaemonNotRunning, OSError):
            return {}

    def cli(
        self, *args: str, timeout: float = 60, on: str | None = None, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """The punchline CLI, where process `on` runs (default: here; the daemons' control
        sockets are files, reachable from any network namespace)."""
        prefix = self.place(on).prefix if on is not None else ()
        return subprocess.run(
            [*prefix, sys.executable, "-m", "punchline", *args], input=stdin,
            capture_output=True, text=True, check=False, timeout=timeout,
        )  # fmt: skip

    def supernode_of(self, user: str) -> Supernode:
        node_id = self.status(user)["supernode"]["node_id"]
        return next(s for s in self.supernodes if s.node_id == node_id)

    def stop(self) -> None:
        for proc in [*self.daemons.values(), *self.supernodes, *self.relays]:
            proc.stop()
        if self.auth is not None:
            self.auth.stop()

    def logs(self) -> str:
        procs = [*self.supernodes, *self.relays, *self.daemons.values()]
        parts = [f"--- {p.name}\n{p.tail()}" for p in procs]
        return "\n".join(parts)


def call_with_sample(
    net: Network,
    caller: str,
    callee: str,
    recording: Path,
    *extra: str,
    sample: Path | None = None,
) -> dict[str, Any]:
    """`caller` calls `callee` playing `sample` (default: the shipped speech sample); waits
    for the recording.

    The callee's daemon writes its recording when it learns of the hang-up, a moment after the
    caller's report: wait for that so the file is complete.
    """
    from punchline.voice import wav

    recording.unlink(missing_ok=True)
    played = sample or wav.speech_sample()
    result = net.cli("call", callee, "--data", str(net.root / caller), "--play", str(played),
                     "--json", *extra, timeout=120)  # fmt: skip
    if result.returncode not in (0, 1) or not result.stdout.strip():
        raise NotReady(f"the call failed: {result.stderr.strip()}\n{net.logs()}")
    report: dict[str, Any] = json.loads(result.stdout)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and report.get("connected"):
        state = (net.status(callee).get("call") or {}).get("state")
        if recording.exists() and state != "active":
            break
        time.sleep(0.05)
    return report


def pesq_of_recording(recording: Path, sample: Path | None = None, skip_s: float = 0.0) -> float:
    """Wideband PESQ of a recording of `sample` (default: the shipped speech sample) against
    the original, less its first `skip_s` seconds: a recording starts with the first audio
    that arrived, so what was played before any path existed is not in it to compare."""
    from punchline.voice import quality, wav
    from punchline.voice.codec import SAMPLE_RATE

    original = wav.read_wav(sample or wav.speech_sample())
    return quality.pesq_wb(original[round(skip_s * SAMPLE_RATE) :], wav.read_wav(recording))


class SupernodeKiller(threading.Thread):
    """Kills `user`'s supernode after `delay` seconds and times how long until it re-attaches."""

    def __init__(self, net: Network, user: str, delay: float, watch: float = 15.0) -> None:
        super().__init__(daemon=True)
        self.net, self.user, self.delay, self.watch = net, user, delay, watch
        self.doomed = net.supernode_of(user)
        self.reattach_s: float | None = None

    def run(self) -> None:
        time.sleep(self.delay)
        self.doomed.kill()
        killed = time.monotonic()
        while time.monotonic() - killed < self.watch:
            node = self.net.status(self.user).get("supernode")
            if node and node["node_id"] != self.doomed.node_id:
                self.reattach_s = time.monotonic() - killed
                return
            time.sleep(0.05)
