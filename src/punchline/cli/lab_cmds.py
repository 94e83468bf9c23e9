"""`punchline lab ...`: the NAT lab of network namespaces (root required)."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer

from punchline.cli.options import Json, emit_json
from punchline.errors import LocalError

app = typer.Typer(help="The NAT lab: real routers, NATs and firewalls in network namespaces.")


def _need_root() -> None:
    if os.geteuid() != 0:
        raise LocalError("the lab builds network namespaces and nftables rules: run it as root")


@app.command("verify")
def verify_command(
    as_json: Json = False,
    kinds: Annotated[
        str | None, typer.Option(help="Comma-separated kinds to verify [default: all].")
    ] = None,
) -> None:
    """Build one site of each NAT kind and check, with real probes, that it behaves as named."""
    from punchline.lab import nat_types, verify

    _need_root()
    chosen = tuple(k.strip() for k in kinds.split(",")) if kinds else nat_types.KINDS
    unknown = [k for k in chosen if k.split(":")[0] not in nat_types.KINDS]
    if unknown:
        raise LocalError(
            f"unknown kind(s) {', '.join(unknown)}; known: {', '.join(nat_types.KINDS)}"
        )
    progress = (lambda _line: None) if as_json else (lambda line: typer.echo(line, err=True))
    rows = verify.verify(chosen, (sys.executable, "-m", "punchline.lab.probe"), progress,
                         knobs=kinds is None)  # fmt: skip
    if as_json:
        emit_json({"ok": all(r.ok for r in rows), "kinds": [r.as_json() for r in rows]})
    else:
        _table(rows)
    if not all(r.ok for r in rows):
        raise typer.Exit(1)


def _table(rows: list[Any]) -> None:
    width = max(len(r.kind) for r in rows) + 1

    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    typer.echo(f"{'kind':<{width}} {'mapping':<27} {'filtering':<27} {'ports':<11} "
               "udp tcp80/443 tcp8080 proxy hairpin verdict")  # fmt: skip
    for row in rows:
        o = row.observed
        verdict = "ok" if row.ok else f"MISMATCH (expected {row.expected})"
        typer.echo(
            f"{row.kind:<{width}} {o.mapping or '-':<27} {o.filtering or '-':<27} "
            f"{o.allocation or '-':<11} {yes(o.udp):<3} {yes(o.tcp_web):<9} "
            f"{yes(o.tcp_other):<7} {yes(o.proxy):<5} "
            f"{'-' if o.hairpin is None else yes(o.hairpin):<7} {verdict}"
        )


@app.command()
def cleanup() -> None:
    """Remove every lab namespace (and the processes in it) left by crashed runs."""
    from punchline.lab import netns, topology

    _need_root()
    removed = netns.cleanup(topology.PREFIX)
    typer.echo(f"removed {len(removed)} namespace(s)")
