"""Options shared by several subcommands, so each is spelled one way everywhere."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from punchline.client.store import IdentityStore, default_data_dir
from punchline.errors import LocalError

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data",
        envvar="PUNCHLINE_DATA",
        help="Data dir holding this user's key and certificate [default: user config dir].",
        show_default=False,
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]


def store(data: Path | None) -> IdentityStore:
    return IdentityStore(data or default_data_dir())


def emit_json(value: dict[str, Any]) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=False))


def read_password(from_stdin: bool, prompt: str = "Password", confirm: bool = False) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            raise LocalError("--password-stdin given but standard input is empty")
        return line.rstrip("\r\n")
    if not sys.stdin.isatty():
        raise LocalError("no terminal to ask for a password on; pipe it with --password-stdin")
    return str(typer.prompt(prompt, hide_input=True, confirmation_prompt=confirm))
