"""`punchline auth ...`: run the login server and administer its accounts."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from punchline.cli.options import Json, emit_json
from punchline.util import logs
from punchline.util.parse import duration, host_port

if TYPE_CHECKING:
    from punchline.auth.server import Storage

app = typer.Typer(help="The login server (certificate authority) and its accounts.")
user_app = typer.Typer(help="Operator actions on user accounts.")
app.add_typer(user_app, name="user")

ServerData = Annotated[
    Path, typer.Option("--data", help="Server data dir: CA key, TLS key, SQLite database.")
]
DbUrl = Annotated[
    str | None,
    typer.Option(
        "--db", envvar="PUNCHLINE_DB", help="postgresql://... [default: SQLite in --data]."
    ),
]


@app.command("serve")
def serve_command(
    data: ServerData,
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT (port 0 picks one).")] = (
        "127.0.0.1:8443"
    ),
    db: DbUrl = None,
    name: Annotated[
        list[str] | None,
        typer.Option("--name", help="Extra host name or address clients use (repeatable)."),
    ] = None,
    enroll_secret: Annotated[
        str | None,
        typer.Option(
            "--enroll-secret",
            envvar="PUNCHLINE_ENROLL_SECRET",
            help="Secret nodes present to enrol [default: generated into DATA/enroll-secret].",
        ),
    ] = None,
    user_cert_lifetime: Annotated[
        str, typer.Option(help="Lifetime of user certificates, e.g. 24h.")
    ] = "24h",
    node_cert_lifetime: Annotated[
        str, typer.Option(help="Lifetime of node certificates, e.g. 7d.")
    ] = "7d",
) -> None:
    """Run the login server over HTTPS until interrupted."""
    from punchline.auth.config import AuthConfig
    from punchline.auth.server import serve

    logs.configure("INFO")
    host, port = host_port(listen)
    config = AuthConfig(
        data_dir=data,
        listen_host=host,
        listen_port=port,
        db_url=db,
        names=tuple(name or ()),
        enroll_secret=enroll_secret,
        user_cert_lifetime=duration(user_cert_lifetime),
        node_cert_lifetime=duration(node_cert_lifetime),
    )
    asyncio.run(serve(config))


def _sessions(data: Path, db: str | None) -> Storage:
    from punchline.auth.config import AuthConfig
    from punchline.auth.server import open_storage

    return open_storage(AuthConfig(data_dir=data, db_url=db))


def _set_disabled(name: str, data: Path, db: str | None, disabled: bool) -> None:
    from punchline.auth import operator

    storage = _sessions(data, db)
    changed = operator.set_disabled(storage.sessions, name, disabled, time.time())
    state = "disabled" if disabled else "enabled"
    typer.echo(f"account {name} {state}" + ("" if changed else " (it already was)"))


@user_app.command("disable")
def disable(name: str, data: ServerData, db: DbUrl = None) -> None:
    """Stop an account from logging in or renewing; its certificate lapses at expiry."""
    _set_disabled(name, data, db, True)


@user_app.command("enable")
def enable(name: str, data: ServerData, db: DbUrl = None) -> None:
    """Let a disabled account log in again."""
    _set_disabled(name, data, db, False)


@user_app.command("list")
def list_users(data: ServerData, db: DbUrl = None, as_json: Json = False) -> None:
    """List accounts with their state and how many certificates each was issued."""
    from punchline.auth import operator
    from punchline.identity import certs

    rows = operator.list_accounts(_sessions(data, db).sessions)
    if as_json:
        emit_json(
            {
                "users": [
                    {
                        "user": r.name,
                        "created": certs.iso(r.created_at),
                        "disabled": r.disabled,
                        "certificates": r.certificates,
                    }
                    for r in rows
                ]
            }
        )
        return
    for r in rows:
        state = "disabled" if r.disabled else "active"
        typer.echo(
            f"{r.name:<32} {state:<9} since {certs.iso(r.created_at)}  certs={r.certificates}"
        )
