"""`punchline lab ...`: the NAT lab of network namespaces (root required)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
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


def _lifetime(bounds: tuple[float, float] | None) -> str:
    if bounds is None:
        return "-"
    return f"{bounds[0]:g}-{bounds[1]:g}s"


def _table(rows: list[Any]) -> None:
    width = max(len(r.kind) for r in rows) + 1

    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    typer.echo(f"{'kind':<{width}} {'mapping':<27} {'filtering':<27} {'ports':<11} "
               "udp tcp80/443 tcp8080 proxy hairpin lifetime  verdict")  # fmt: skip
    for row in rows:
        o = row.observed
        verdict = "ok" if row.ok else f"MISMATCH (expected {row.expected})"
        typer.echo(
            f"{row.kind:<{width}} {o.mapping or '-':<27} {o.filtering or '-':<27} "
            f"{o.allocation or '-':<11} {yes(o.udp):<3} {yes(o.tcp_web):<9} "
            f"{yes(o.tcp_other):<7} {yes(o.proxy):<5} "
            f"{'-' if o.hairpin is None else yes(o.hairpin):<7} {_lifetime(o.lifetime):<9} "
            f"{verdict}"
        )


@app.command()
def matrix(
    as_json: Json = False,
    sites: Annotated[
        str | None,
        typer.Option(help="Comma-separated site kinds; repeat one for two sites [default: all]."),
    ] = None,
    delay: Annotated[
        float, typer.Option("--delay", help="One-way delay in ms on every site's uplink.")
    ] = 25.0,
    runs: Annotated[int, typer.Option(min=1, help="Calls per (caller, callee) pair.")] = 1,
    seconds: Annotated[
        float, typer.Option(min=1.0, help="Seconds of the speech sample each call plays.")
    ] = 6.0,
    workdir: Annotated[
        Path | None, typer.Option(help="Keep state, logs and recordings here [default: temp].")
    ] = None,
    online_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds a daemon may take to come online before its site counts as offline."
        ),
    ] = 20.0,
) -> None:
    """Call between a user behind every kind of site: path, time to audio and to direct, PESQ.

    Progress goes to stderr, so `--json` output on stdout stays one JSON object.
    """
    from punchline.lab import matrix as connectivity

    _need_root()
    kinds = [k.strip() for k in sites.split(",") if k.strip()] if sites else None
    result = connectivity.run(kinds or connectivity.DEFAULT_KINDS, runs, delay,
                              lambda line: typer.echo(line, err=True), workdir,
                              clip_s=seconds, online_timeout=online_timeout)  # fmt: skip
    if as_json:
        emit_json(result)
    else:
        typer.echo(connectivity.table(result))


@app.command()
def up(
    file: Annotated[Path, typer.Argument(help="Topology file (TOML).", exists=True)],
    as_json: Json = False,
) -> None:
    """Build a lab from a topology file and leave it running (see `lab exec`, `lab down`)."""
    from punchline.lab import spec
    from punchline.lab.topology import Lab

    _need_root()
    topology = spec.load(file)
    lab = Lab()
    try:
        lab.__enter__()
        spec.build(lab, topology)
    except BaseException:
        lab.close()
        raise
    state = spec.describe(lab)
    spec.save_state(state)
    if as_json:
        emit_json(state)
        return
    typer.echo(f"lab {lab.run_id} is up" + (f" (links impaired by a {lab.impairment_method})"
                                             if lab.impairment_method else "") + ":")  # fmt: skip
    for name, host in state["hosts"].items():
        typer.echo(f"  {name:<14} {host['ip']:<15} (namespace {host['ns']})")


@app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec_command(
    ctx: typer.Context,
    host: Annotated[str, typer.Argument(help="Host name from the topology.")],
    run: Annotated[str | None, typer.Option(help="Lab run id (when several are up).")] = None,
) -> None:
    """Run a command inside a host of a running lab: punchline lab exec HOST -- CMD ..."""
    from punchline.lab import spec

    _need_root()
    state = spec.pick(run)
    entry = state["hosts"].get(host)
    if entry is None:
        raise LocalError(f"no host {host!r} in lab {state['run_id']}; hosts: "
                         f"{', '.join(state['hosts'])}")  # fmt: skip
    if not ctx.args:
        raise LocalError("give the command after --, e.g. punchline lab exec h1 -- ip addr")
    os.execvp("ip", ["ip", "netns", "exec", entry["ns"], *ctx.args])  # noqa: S606 - on purpose


@app.command()
def down(
    run: Annotated[str | None, typer.Option(help="Lab run id (when several are up).")] = None,
) -> None:
    """Tear down a lab started with `lab up`: namespaces, processes, state."""
    from punchline.lab import netns, spec

    _need_root()
    state = spec.pick(run)
    removed = netns.cleanup(state["prefix"])
    spec.forget(state["run_id"])
    typer.echo(f"lab {state['run_id']} is down ({len(removed)} namespaces removed)")


@app.command()
def cleanup() -> None:
    """Remove every lab namespace (and the processes in it) left by crashed runs."""
    from punchline.lab import netns, topology

    _need_root()
    removed = netns.cleanup(topology.PREFIX)
    from punchline.lab import spec

    for state in spec.runs():
        spec.forget(state["run_id"])
    typer.echo(f"removed {len(removed)} namespace(s)")
