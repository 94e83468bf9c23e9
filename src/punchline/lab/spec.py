"""Lab topologies from a small TOML file, and the state of labs left running by `lab up`.

    [[public]]
    name = "p1"

    [[site]]
    name = "home"
    kind = "port-restricted"      # any kind of nat_types.KINDS, or double:INNER/OUTER
    hosts = 2                     # LAN hosts (default 1)
    hairpin = true                # optional
    udp_timeout = 30              # optional, seconds
    proxy_auth = "user:password"  # optional, proxy-only sites
    delay_ms = 25                 # optional uplink impairment, each direction:
    jitter_ms = 5                 #   extra uniform delay (also reorders)
    loss = 0.01                   #   probability a frame is dropped
    rate_kbit = 2000              #   bottleneck rate (tail drop past 200 ms of queue)
    lan_delay_ms = 2              # the same keys prefixed lan_ (each LAN host's link) or
    carrier_loss = 0.01           #   carrier_ (a double NAT's carrier <-> home link)

`lab up` builds it and leaves it running; the run's host names and namespaces are kept in
/run/punchline-lab/<run id>.json for `lab exec` and `lab down`.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from punchline.lab import nat_types
from punchline.lab.impair import Impairment
from punchline.lab.netns import LabError
from punchline.lab.topology import Lab

STATE_DIR = Path("/run/punchline-lab")
IMPAIRMENT_KEYS = {"delay_ms", "jitter_ms", "loss", "rate_kbit"}
LINKS = ("", "lan_", "carrier_")  # uplink, each LAN host's link, a double NAT's inner link
SITE_KEYS = {"name", "kind", "hosts", "hairpin", "udp_timeout", "proxy_auth",
             *(link + key for link in LINKS for key in IMPAIRMENT_KEYS)}  # fmt: skip


def load(path: Path) -> dict[str, Any]:
    try:
        spec = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LabError(f"cannot read the topology {path}: {exc}") from exc
    names = set()
    for entry in [*spec.get("public", []), *spec.get("site", [])]:
        name = entry.get("name")
        if not isinstance(name, str) or not name.isalnum() or len(name) > 12:
            raise LabError(f"{path}: every host and site needs a short alphanumeric name")
        if name in names:
            raise LabError(f"{path}: the name {name!r} is used twice")
        names.add(name)
    for site in spec.get("site", []):
        unknown = set(site) - SITE_KEYS
        if unknown:
            raise LabError(f"{path}: site {site['name']!r} has unknown keys {sorted(unknown)}")
        if str(site.get("kind", "")).split(":")[0] not in nat_types.KINDS:
            raise LabError(f"{path}: site {site['name']!r} has unknown kind {site.get('kind')!r}")
    return spec


def build(lab: Lab, spec: dict[str, Any]) -> None:
    for entry in spec.get("public", []):
        lab.add_public_host(entry["name"])
    for site in spec.get("site", []):
        auth = site.get("proxy_auth")
        user, _, password = auth.partition(":") if isinstance(auth, str) else ("", "", "")
        lab.add_site(
            site["name"],
            site["kind"],
            hosts=int(site.get("hosts", 1)),
            proxy_auth=(user, password) if user else None,
            hairpin=bool(site.get("hairpin", False)),
            udp_timeout=site.get("udp_timeout"),
            impairment=_impairment(site, ""),
            lan_impairment=_impairment(site, "lan_"),
            carrier_impairment=_impairment(site, "carrier_"),
        )


def _impairment(site: dict[str, Any], link: str) -> Impairment | None:
    """One link's impairment, from [link]delay_ms / jitter_ms / loss / rate_kbit keys."""
    given = {key: float(site[link + key]) for key in IMPAIRMENT_KEYS if link + key in site}
    return Impairment(**given) if given else None


def describe(lab: Lab) -> dict[str, Any]:
    hosts = {h.name: {"ns": h.ns, "ip": h.ip} for h in lab.public.values()}
    sites = {}
    for site in lab.sites.values():
        for host in site.hosts:
            hosts[host.name] = {"ns": host.ns, "ip": host.ip, "site": site.name}
        sites[site.name] = {"kind": site.kind, "public_ip": site.wan_ip,
                            "hosts": [h.name for h in site.hosts], "proxy": site.proxy}  # fmt: skip
    return {"run_id": lab.run_id, "prefix": lab.prefix, "hosts": hosts, "sites": sites,
            "impairment_method": lab.impairment_method}  # fmt: skip


def save_state(state: dict[str, Any]) -> Path:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    path = STATE_DIR / f"{state['run_id']}.json"
    path.write_text(json.dumps(state, indent=2))
    return path


def runs() -> list[dict[str, Any]]:
    found = []
    for path in sorted(STATE_DIR.glob("*.json")) if STATE_DIR.exists() else []:
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return found


def pick(run_id: str | None) -> dict[str, Any]:
    available = runs()
    if run_id is not None:
        for state in available:
            if state["run_id"] == run_id:
                return state
        raise LabError(f"no running lab {run_id!r}")
    if len(available) != 1:
        listing = ", ".join(s["run_id"] for s in available) or "none"
        raise LabError(f"say which lab with --run (running: {listing})")
    return available[0]


def forget(run_id: str) -> None:
    (STATE_DIR / f"{run_id}.json").unlink(missing_ok=True)
