"""`punchline netcheck`: which ways out work from here, and what the NAT does (no daemon)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from punchline.cli.options import DataDir, Json, emit_json, store
from punchline.errors import LocalError


def netcheck(
    data: DataDir = None,
    as_json: Json = False,
    proxy: Annotated[
        str | None,
        typer.Option(
            envvar="HTTPS_PROXY",
            help="HTTP CONNECT proxy, http://host:port or http://user:pass@host:port.",
        ),
    ] = None,
    lifetime: Annotated[
        str | None,
        typer.Option(
            help="Also measure idle mapping lifetime: waits in seconds, e.g. 15,30,60 (slow)."
        ),
    ] = None,
) -> None:
    """Report UDP, TCP 443/80, proxy and IPv6 reachability, latencies and the NAT's behaviour."""
    from punchline.nat.netcheck import human
    from punchline.nat.netcheck import netcheck as run
    from punchline.runtime.streams import ProxyConfig

    identity_store = store(data)
    identity_store.require_profile()
    listing = identity_store.bootstrap()
    if not listing or not listing.get("nodes"):
        raise LocalError("no bootstrap list of nodes is cached; log in again to fetch one")
    proxy_config = ProxyConfig.parse(proxy) if proxy else None
    waits = _waits(lifetime)
    report = asyncio.run(run(listing, proxy_config, waits))
    report = {"user": identity_store.require_profile().user, **report}
    if as_json:
        emit_json(report)
    else:
        typer.echo(human(report))


def _waits(text: str | None) -> tuple[float, ...]:
    if not text:
        return ()
    try:
        waits = tuple(float(part) for part in text.split(","))
    except ValueError:
        waits = ()
    if not waits or not all(0 < w <= 900 for w in waits):
        raise LocalError(f"--lifetime takes seconds (1-900) separated by commas, not {text!r}")
    return waits


def register(app: typer.Typer) -> None:
    app.command()(netcheck)
