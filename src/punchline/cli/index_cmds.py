"""`punchline lookup USER`: where a user is, as the global index tells the daemon's supernode."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from punchline.cli.network_cmds import _one
from punchline.cli.options import DataDir, Json, emit_json
from punchline.identity import names


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{max(0, round(seconds))} s ago"
    if seconds < 5400:
        return f"{round(seconds / 60)} min ago"
    return f"{seconds / 3600:.1f} h ago"


def lookup(
    name: Annotated[str, typer.Argument(help="The user to look up.")],
    data: DataDir = None,
    as_json: Json = False,
) -> None:
    """Look a user up: online (with their devices) or offline with when they were last seen."""
    answer: dict[str, Any] = _one(data, {"op": "lookup", "user": names.canonical(name)})
    answer.pop("ok", None)
    if as_json:
        emit_json(answer)
        return
    status = answer.get("status")
    if status == "unknown":
        typer.echo(f"{name}: not found (not online in the last 72 hours)")
    elif status == "offline":
        last_seen = answer.get("last_seen")
        when = _ago(time.time() - float(last_seen)) if last_seen is not None else "unknown"
        typer.echo(f"{name}: offline, last seen {when}")
    else:
        typer.echo(f"{name}: {status}")
        for device in answer.get("devices", []):
            supernode = str(device.get("supernode"))[:16]
            typer.echo(f"  {device.get('device')}: {device.get('status')} via {supernode}")


def register(app: typer.Typer) -> None:
    app.command()(lookup)
