"""The connectivity matrix: a user behind each kind of site calls each other, for real.

One lab (`topology.Lab`) holds four unimpaired public hosts — login server, two supernodes,
a relay — and one site per requested kind, each with `delay_ms` one-way delay on its uplink
(25 ms: 100 ms RTT site to site, 50 ms site to server). Every site's user is signed up and
its daemon started inside the site; then every ordered pair of sites places `runs` calls in
which the caller plays a clip of the shipped speech sample and the callee records it.

A row per (caller, callee) says how often audio flowed, the path the call ended on, the time
to first audio, the time until media moved to a direct (non-relay) path and the wideband PESQ
of the callee's recording. A site whose daemon never comes online yields rows that say so,
with the reason, instead of stopping the run: the matrix must describe what works today.
"""

from __future__ import annotations

import contextlib
import math
import re
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from punchline.lab import nat_types
from punchline.lab.impair import Impairment
from punchline.lab.loopback import NotReady, call_with_sample, pesq_of_recording
from punchline.lab.network import LabNetwork
from punchline.lab.topology import Lab
from punchline.voice import quality
from punchline.voice.codec import SAMPLE_RATE

DEFAULT_KINDS = nat_types.KINDS
INFRA = ("auth", "sn1", "sn2", "relay1")
# Speech played per call: room for a slow (relayed over TCP, ~4 s) set-up and still a few
# seconds to score, short enough for a matrix of hundreds of calls.
CLIP_S = 6.0
MIN_SCORED_S = 1.0
# The caller starts playing once answered, a little after the call was placed (setup_ms's
# origin): cut the reference this much short of setup_ms, and let PESQ's alignment find the
# rest of the lag (it searches +-2 s).
SKIP_MARGIN_S = 0.5
ONLINE_TIMEOUT_S = 20.0
Progress = Callable[[str], None]


@dataclass(frozen=True)
class SiteUser:
    """One site of the matrix and its user, both named after the site's kind."""

    name: str
    kind: str


def plan(kinds: Sequence[str]) -> list[SiteUser]:
    """Sites (and user names) for `kinds`; a kind listed twice gets two sites (`open-2`)."""
    sites: list[SiteUser] = []
    seen: Counter[str] = Counter()
    for kind in kinds:
        base = "double" if kind.startswith("double") else kind
        if base not in nat_types.KINDS:
            raise NotReady(f"unknown site kind {kind!r}; known: {', '.join(nat_types.KINDS)}")
        slug = re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")[:28].rstrip("-")
        seen[slug] += 1
        sites.append(SiteUser(slug if seen[slug] == 1 else f"{slug}-{seen[slug]}", kind))
    return sites


def pairs(
    sites: Sequence[SiteUser], only: Collection[tuple[str, str]] | None = None
) -> list[tuple[SiteUser, SiteUser]]:
    """Every ordered pair of sites, except the reverse of a pair of two sites of one kind
    (the same call again, with the names swapped); or just the (caller, callee) site names
    in `only`, in that order, for a reduced matrix."""
    if only is not None:
        by_name = {s.name: s for s in sites}
        missing = sorted({n for pair in only for n in pair} - set(by_name))
        if missing:
            raise NotReady(f"no site named {', '.join(missing)}; sites: {', '.join(by_name)}")
        return [(by_name[a], by_name[b]) for a, b in only]
    chosen: list[tuple[SiteUser, SiteUser]] = []
    for caller in sites:
        for callee in sites:
            if caller == callee:
                continue
            if caller.kind == callee.kind and (callee, caller) in chosen:
                continue
            chosen.append((caller, callee))
    return chosen


def path_class(path: str | None) -> str | None:
    """ "relay" for any relay-* label, "direct" for any other path, None for no path: the
    engine's labels get more precise over time, the class does not."""
    if path is None:
        return None
    return "relay" if path.startswith("relay") else "direct"


@dataclass(frozen=True)
class CallRun:
    connected: bool  # audio flowed (answered and the caller heard its first frame)
    path: str | None
    setup_ms: float | None
    direct_ms: float | None
    pesq: float | None
    reason: str | None = None
    paths: tuple[dict[str, Any], ...] = ()


def run_of(report: dict[str, Any], pesq: float | None) -> CallRun:
    """A call report (`punchline call --json`) boiled down to what the matrix shows."""
    paths = tuple(p for p in report.get("paths") or () if isinstance(p, dict))
    direct = next((p["at_ms"] for p in paths if path_class(p.get("path")) == "direct"), None)
    connected = bool(report.get("connected")) and report.get("setup_ms") is not None
    reason = None
    if not connected:
        reason = "answered, but no audio arrived" if report.get("connected") else (
            str(report.get("end_reason") or "not connected"))  # fmt: skip
    return CallRun(connected, report.get("path"), report.get("setup_ms"), direct, pesq, reason,
                   paths)  # fmt: skip


def _nearest_rank(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def spread(values: Sequence[float | None]) -> dict[str, float | None]:
    """Median and p95 (nearest rank: with 5 runs, the worst) of the values that exist."""
    present = [v for v in values if v is not None]
    if not present:
        return {"median": None, "p95": None}
    return {"median": round(statistics.median(present), 1),
            "p95": round(_nearest_rank(present, 0.95), 1)}  # fmt: skip


@dataclass
class Row:
    caller: SiteUser
    callee: SiteUser
    results: list[CallRun] = field(default_factory=list)
    skipped: str | None = None  # why no call was placed (a party is offline)

    def as_json(self) -> dict[str, Any]:
        """The row's JSON contract: fields may be added, never renamed."""
        connected = [r for r in self.results if r.connected]
        finals = Counter(r.path for r in connected)
        path = finals.most_common(1)[0][0] if finals else None
        scores = [r.pesq for r in connected if r.pesq is not None]
        reasons = Counter(r.reason for r in self.results if r.reason)
        return {
            "caller": self.caller.name,
            "callee": self.callee.name,
            "caller_kind": self.caller.kind,
            "callee_kind": self.callee.kind,
            "runs": len(self.results),
            "connected": len(connected),
            "path": path,
            "path_class": path_class(path),
            "setup_ms": spread([r.setup_ms for r in connected]),
            "direct_ms": spread([r.direct_ms for r in connected]),
            "pesq": {
                "median": round(statistics.median(scores), 2) if scores else None,
                "min": round(min(scores), 2) if scores else None,
            },
            "reason": self.skipped or (reasons.most_common(1)[0][0] if reasons else None),
            "paths": [list(r.paths) for r in self.results],
        }


@dataclass
class SiteState:
    site: SiteUser
    online: bool = False
    reason: str | None = None
    transport: str | None = None
    reflexive: list[Any] | None = None

    def as_json(self) -> dict[str, Any]:
        return {"name": self.site.name, "kind": self.site.kind, "online": self.online,
                "reason": self.reason, "transport": self.transport,
                "reflexive": self.reflexive}  # fmt: skip


class Matrix:
    """The lab and the network of one matrix run; `with Matrix(...) as m: m.call(...)`."""

    def __init__(
        self,
        sites: Sequence[SiteUser],
        delay_ms: float,
        root: Path,
        progress: Progress,
        clip_s: float = CLIP_S,
        online_timeout: float = ONLINE_TIMEOUT_S,
    ) -> None:
        self.sites, self.delay_ms, self.root, self.say = list(sites), delay_ms, root, progress
        self.clip_s, self.online_timeout = clip_s, online_timeout
        self.timings: dict[str, float] = {}
        self.states = {s.name: SiteState(s) for s in self.sites}
        self.lab = Lab()
        self.net = LabNetwork(root, lab=self.lab)
        self.clip = root / "clip.wav"

    def __enter__(self) -> Matrix:
        self.lab.__enter__()
        try:
            self._build()
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.net.stop()
        finally:
            self.lab.close()

    @contextlib.contextmanager
    def _timed(self, key: str) -> Iterator[None]:
        start = time.monotonic()
        yield
        self.timings[key] = round(time.monotonic() - start, 2)

    def _build(self) -> None:
        impairment = Impairment(delay_ms=self.delay_ms) if self.delay_ms > 0 else None
        with self._timed("lab_build_s"):
            for name in INFRA:
                self.net.hosts[name] = self.lab.add_public_host(name)
            for site in self.sites:
                self.say(f"building site {site.name} ({site.kind})")
                built = self.lab.add_site(site.name, site.kind, impairment=impairment)
                self.net.hosts[site.name] = built.host
        self.say(f"lab built in {self.timings['lab_build_s']} s")

    def _start(self) -> None:
        from punchline.voice import wav

        speech = wav.read_wav(wav.speech_sample())
        wav.write_wav(self.clip, speech[: int(self.clip_s * SAMPLE_RATE)])
        with self._timed("network_start_s"):
            self.net.start_auth()
            self.net.start_supernode()
            self.net.start_supernode()
            self.net.start_relay()
            with ThreadPoolExecutor(max_workers=4) as pool:
                list(pool.map(self.net.signup, [s.name for s in self.sites]))
            for site in self.sites:
                self.net.spawn_daemon(site.name, *self._daemon_args(site))
        started = self.timings["network_start_s"]
        self.say(f"login server, 2 supernodes, relay and {len(self.sites)} users started in "
                 f"{started} s; waiting for them to come online")  # fmt: skip
        with self._timed("online_s"):
            self._wait_online()
        for state in self.states.values():
            where = "online" if state.online else f"OFFLINE: {state.reason}"
            self.say(f"  {state.site.name:<28} {where}")

    def _daemon_args(self, site: SiteUser) -> list[str]:
        args = ["--auto-answer", "--record", str(self._recording(site))]
        proxy = self.lab.sites[site.name].proxy
        if proxy is not None:  # the only way out of a proxy-only site
            args += ["--proxy", f"http://{proxy[0]}:{proxy[1]}"]
        return args

    def _recording(self, site: SiteUser) -> Path:
        return self.root / f"{site.name}-recording.wav"

    def _wait_online(self) -> None:
        deadline = time.monotonic() + self.online_timeout
        waiting = set(self.states)
        while waiting and time.monotonic() < deadline:
            for name in list(waiting):
                status = self.net.status(name)
                # online, and its NAT measured: a real user's daemon has been up for a while
                # when a call comes, so both are known before the first call here too
                if status.get("published") and status.get("nat") is not None:
                    state = self.states[name]
                    state.online, state.transport = True, status.get("transport")
                    state.reflexive = status.get("reflexive")
                    waiting.discard(name)
                elif self.net.daemons[name].process.poll() is not None:
                    waiting.discard(name)
            time.sleep(0.1)
        for name in waiting | {n for n, s in self.states.items() if not s.online}:
            self.states[name].reason = self._offline_reason(name)

    def _offline_reason(self, name: str) -> str:
        proc = self.net.daemons[name]
        last = _gist(proc.tail(1))
        if proc.process.poll() is not None:
            return f"the daemon exited with status {proc.process.returncode}: {last}"
        status = self.net.status(name)
        if not status:
            return f"the daemon's control socket does not answer; last log: {last}"
        if status.get("supernode") is None:
            return (f"no supernode session after {self.online_timeout:g} s "
                    f"(transport {status.get('transport')}); last log: {last}")  # fmt: skip
        return f"attached but not published after {self.online_timeout:g} s; last log: {last}"

    def call(self, row: Row) -> None:
        """One more run of `row`'s call, unless a party is offline (then the row says why)."""
        for party, role in ((row.caller, "caller"), (row.callee, "callee")):
            state = self.states[party.name]
            if not state.online:
                row.skipped = f"{role} {party.name} offline: {state.reason}"
                return
        recording = self._recording(row.callee)
        try:
            report = call_with_sample(self.net, row.caller.name, row.callee.name, recording,
                                      sample=self.clip)  # fmt: skip
        except NotReady as exc:
            row.results.append(CallRun(False, None, None, None, None,
                                       str(exc).splitlines()[0]))  # fmt: skip
            return
        row.results.append(run_of(report, self._score(recording, report.get("setup_ms"))))

    def _score(self, recording: Path, setup_ms: float | None) -> float | None:
        """PESQ of what the callee heard once audio flowed, against the same stretch of the
        clip (the recording starts at the first audio; the speech played before a path
        existed is time to first audio's business, not quality's). None with under
        `MIN_SCORED_S` of speech left after a slow set-up."""
        if setup_ms is None or not recording.exists():
            return None
        skip_s = max(0.0, setup_ms / 1000 - SKIP_MARGIN_S)
        if self.clip_s - skip_s < MIN_SCORED_S:
            return None
        with contextlib.suppress(quality.QualityError, ValueError):
            return pesq_of_recording(recording, self.clip, skip_s)
        return None


_LOG_FIELD = re.compile(r"\b(event|reason)=(?:'([^']*)'|\"([^\"]*)\")")


def _gist(line: str) -> str:
    """The event (and reason) of a structured log line, without timestamps and ids."""
    found: dict[str, str] = {
        str(key): str(single or double) for key, single, double in _LOG_FIELD.findall(line)
    }
    if "event" not in found:
        return line.strip()[:200] or "(no output)"
    return found["event"] + (f" ({found['reason']})" if "reason" in found else "")


def run(
    kinds: Sequence[str],
    runs: int = 1,
    delay_ms: float = 25.0,
    progress: Progress = lambda _line: None,
    workdir: Path | None = None,
    clip_s: float = CLIP_S,
    online_timeout: float = ONLINE_TIMEOUT_S,
    only: Collection[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """Build the lab, run the matrix, tear it all down; the whole result as JSON-ready data.

    `only` limits the calls to these (caller, callee) site names (see `plan`)."""
    sites = plan(kinds)
    if len(sites) < 2:
        raise NotReady("the matrix needs at least two sites (repeat a kind for two of it)")
    rows = [Row(caller, callee) for caller, callee in pairs(sites, only)]
    root = workdir or Path(tempfile.mkdtemp(prefix="punchline-matrix-"))
    root.mkdir(parents=True, exist_ok=True)
    progress(f"state, logs and recordings in {root}")
    with Matrix(sites, delay_ms, root, progress, clip_s, online_timeout) as matrix:
        started = time.monotonic()
        placed = 0
        for number, row in enumerate(rows, 1):
            for attempt in range(1, runs + 1):
                matrix.call(row)
                if row.skipped:
                    break
                placed += 1
                last = row.results[-1]
                outcome = (f"{last.path} first audio {last.setup_ms} ms"
                           if last.connected else f"not connected: {last.reason}")  # fmt: skip
                progress(f"[{number}/{len(rows)}] {row.caller.name} -> {row.callee.name} "
                         f"run {attempt}/{runs}: {outcome}")  # fmt: skip
            if row.skipped:
                progress(f"[{number}/{len(rows)}] {row.caller.name} -> {row.callee.name}: "
                         f"skipped, {row.skipped.split(':')[0]}")  # fmt: skip
        calls_s = time.monotonic() - started
        timings = {**matrix.timings, "calls_s": round(calls_s, 1),
                   "per_call_s": round(calls_s / placed, 2) if placed else None}  # fmt: skip
        states = [s.as_json() for s in matrix.states.values()]
    return {
        "delay_ms": delay_ms,
        "runs": runs,
        "clip_s": clip_s,
        "sites": states,
        "rows": [r.as_json() for r in rows],
        "timings": timings,
        "workdir": str(root),
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def table(result: dict[str, Any], reference: Callable[[str, str], str] | None = None) -> str:
    """The human table: one line per row, then the offline sites and the timings."""
    headers = ["caller", "callee", "ok", "path", "first audio ms", "direct ms", "PESQ"]
    if reference is not None:
        headers.append("reference")
    lines = []
    for row in result["rows"]:
        setup, direct, pesq = row["setup_ms"], row["direct_ms"], row["pesq"]
        cells = [
            row["caller"], row["callee"], f"{row['connected']}/{row['runs']}",
            row["path"] or ("offline" if row["runs"] == 0 else "not connected"),
            f"{_ms(setup['median'])} (p95 {_ms(setup['p95'])})",
            f"{_ms(direct['median'])} (p95 {_ms(direct['p95'])})",
            "-" if pesq["median"] is None else f"{pesq['median']:.2f} (min {pesq['min']:.2f})",
        ]  # fmt: skip
        if reference is not None:
            cells.append(reference(row["caller_kind"], row["callee_kind"]))
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h)
              for i, h in enumerate(headers)]  # fmt: skip
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
            for cells in lines]  # fmt: skip
    for site in result["sites"]:
        if not site["online"]:
            out.append(f"offline: {site['name']}: {site['reason']}")
    not_connected = [r for r in result["rows"] if r["runs"] and not r["connected"]]
    for row in not_connected:
        out.append(f"not connected: {row['caller']} -> {row['callee']}: {row['reason']}")
    t = result["timings"]
    out.append(f"{result['runs']} run(s) per pair, {result['delay_ms']:g} ms one-way delay on "
               f"each site uplink; lab built in {t['lab_build_s']} s, network started in "
               f"{t['network_start_s']} s, online after {t['online_s']} s, calls took "
               f"{t['calls_s']} s ({t['per_call_s']} s per call)")  # fmt: skip
    return "\n".join(out)
