"""Commands of the directory: list or unlist yourself, search users by display name."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from punchline.cli.network_cmds import _one
from punchline.cli.options import DataDir, Json, emit_json
from punchline.errors import LocalError


def directory(
    list_as: Annotated[
        str | None,
        typer.Option("--list", help="Be findable by others under this display name."),
    ] = None,
    unlist: Annotated[
        bool, typer.Option("--unlist", help="Stop being findable in the directory.")
    ] = False,
    data: DataDir = None,
    as_json: Json = False,
) -> None:
    """Show, join or leave the user directory (only users who join are ever found)."""
    if list_as is not None and unlist:
        raise LocalError("--list and --unlist exclude each other")
    request: dict[str, Any] = {"op": "directory"}
    if list_as is not None:
        request["list"] = list_as
    elif unlist:
        request["unlist"] = True
    answer = _one(data, request)
    answer.pop("ok", None)
    if as_json:
        emit_json(answer)
        return
    if answer.get("listed"):
        typer.echo(f"listed in the directory as {answer['display']!r}")
    else:
        typer.echo("not listed in the directory")
    if "handed_over" in answer and not answer["handed_over"]:
        typer.echo("  (not online yet: the supernode takes it when the daemon attaches)", err=True)


def search(
    prefix: Annotated[str, typer.Argument(help="The start of a display name or user name.")],
    data: DataDir = None,
    as_json: Json = False,
) -> None:
    """Find users listed in the directory whose name starts with PREFIX."""
    answer = _one(data, {"op": "search", "query": prefix})
    answer.pop("ok", None)
    if as_json:
        emit_json(answer)
        return
    results = answer.get("results") or []
    if not results:
        typer.echo(f"nobody listed matches {prefix!r}")
    for result in results:
        typer.echo(f"{result['user']:<24} {result['display']}")
    if answer.get("more"):
        typer.echo("(more users match: type more of the name)", err=True)


def register(app: typer.Typer) -> None:
    for command in (directory, search):
        app.command()(command)
