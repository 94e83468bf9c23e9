"""`punchline contacts`: the contact list with live status, and contact requests.

The daemon holds the list (it syncs it with the user's other devices through the overlay and
follows the contacts' presence), so every command here is one request to the daemon's control
socket; `punchline up` must be running.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from punchline.cli.options import DataDir, Json, emit_json, store
from punchline.errors import LocalError, RemoteError

app = typer.Typer(
    help="Your contacts with their live status; add, accept and remove contacts.",
    invoke_without_command=True,
    no_args_is_help=False,
)

User = Annotated[str, typer.Argument(help="The other user's name.")]


def _ask(data: Path | None, request: dict[str, Any]) -> dict[str, Any]:
    from punchline.client import control

    async def one() -> dict[str, Any]:
        async for reply in control.request(store(data).dir, {"op": "contacts", **request}):
            return reply
        raise RemoteError("the daemon closed the connection without answering")

    answer = asyncio.run(one())
    if not answer.get("ok"):
        raise LocalError(str(answer.get("error", "the daemon refused")))
    return answer


def _when(moment: object) -> str:
    if not isinstance(moment, int | float):
        return "never seen"
    ago = time.time() - moment
    if ago < 60:
        return "just now"
    if ago < 3600:
        return f"{int(ago // 60)} min ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(moment))


def _show(view: dict[str, Any]) -> None:
    listed = view.get("contacts", [])
    if not listed:
        typer.echo("No contacts yet; add one with `punchline contacts add NAME`.")
    for contact in listed:
        status = contact["status"]
        extra = "" if status != "offline" else f"  last seen {_when(contact.get('last_seen'))}"
        if contact.get("devices", 0) > 1:
            extra = f"  ({contact['devices']} devices)"
        typer.echo(f"  {contact['user']:<24} {status:<8}{extra}")
    for request in view.get("requests_in", []):
        typer.echo(f"  request from {request['user']}: "
                   f"`punchline contacts accept {request['user']}` to accept")  # fmt: skip
    for request in view.get("requests_out", []):
        typer.echo(f"  waiting for {request['user']} to accept your request")
    if view.get("problem"):
        typer.echo(f"note: {view['problem']}", err=True)


@app.callback()
def contacts(ctx: typer.Context, data: DataDir = None, as_json: Json = False) -> None:
    """Show your contacts with their live status (online, away, busy, offline + last seen)
    and the pending requests."""
    if ctx.invoked_subcommand is not None:
        return
    answer = _ask(data, {"action": "list"})
    answer.pop("ok", None)
    if as_json:
        emit_json(answer)
    else:
        _show(answer)


@app.command()
def add(user: User, data: DataDir = None) -> None:
    """Send a contact request (or accept theirs, if they asked first)."""
    typer.echo(_ask(data, {"action": "add", "user": user})["message"])


@app.command()
def accept(user: User, data: DataDir = None) -> None:
    """Accept a contact request."""
    typer.echo(_ask(data, {"action": "accept", "user": user})["message"])


@app.command()
def remove(user: User, data: DataDir = None) -> None:
    """Remove a contact (on all your devices), or decline their request."""
    typer.echo(_ask(data, {"action": "remove", "user": user})["message"])


def rekey_running_daemon(data: Path | None) -> bool:
    """After a password change: a running daemon re-wraps the contact list key at once (else
    the next daemon start does). False when no daemon runs."""
    from punchline.client import control

    try:
        _ask(data, {"action": "rekey"})
    except control.DaemonNotRunning:
        return False
    return True
