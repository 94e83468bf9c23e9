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


# ------------------------------------------------------------------ infrastructure nodes

NodeData = Annotated[Path, typer.Option("--data", help="The node's data dir (key, certificate).")]
Listen = Annotated[str, typer.Option("--listen", help="HOST:PORT for UDP and TCP.")]
AuthUrlOption = Annotated[
    str, typer.Option("--auth", envvar="PUNCHLINE_AUTH", help="Login server URL.")
]
TcpPorts = Annotated[
    list[int] | None,
    typer.Option("--tcp-port", help="Extra port serving TLS (and TCP), e.g. 443 (repeatable)."),
]
Advertise = Annotated[str | None, typer.Option(help="Address clients use to reach this node.")]
EnrollSecret = Annotated[
    str | None,
    typer.Option("--enroll-secret", envvar="PUNCHLINE_ENROLL_SECRET", help="Operator secret."),
]
TurnSecretFile = Annotated[
    Path | None,
    typer.Option(
        "--turn-secret-file",
        help="The login server's TURN secret (its data dir's turn-secret file).",
        dir_okay=False,
    ),
]
RelayPorts = Annotated[
    str | None,
    typer.Option("--relay-ports", help="LOW-HIGH range for relayed UDP ports [default: any]."),
]
AllowPrivatePeers = Annotated[
    bool,
    typer.Option(
        help="Relay to loopback and private peer addresses (labs and tests; refused by default)."
    ),
]


def port_range(text: str | None) -> tuple[int, int]:
    if not text:
        return (0, 0)
    low_text, sep, high_text = text.partition("-")
    try:
        low, high = int(low_text), int(high_text)
    except ValueError:
        low = high = -1
    if not sep or not 1024 <= low < high <= 65535:
        raise LocalError(f"--relay-ports must look like 49152-65535, not {text!r}")
    return low, high
