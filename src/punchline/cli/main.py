"""Entry point: builds the command tree and turns every failure into a clear message.

No traceback ever reaches a user: punchline's own errors print their message, anything
unexpected prints one line and, with PUNCHLINE_DEBUG=1, the traceback for a bug report.
"""

from __future__ import annotations

import os
import sys

import typer

from punchline import __version__
from punchline.cli import (
    account_cmds,
    auth_cmds,
    contacts_cmds,
    demo,
    directory_cmds,
    index_cmds,
    lab_cmds,
    netcheck_cmds,
    network_cmds,
    node_cmds,
    relay_cmds,
)
from punchline.errors import PunchlineError
from punchline.util import logs

app = typer.Typer(
    name="punchline",
    help="Peer-to-peer voice calls that connect from behind any NAT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(auth_cmds.app, name="auth")
app.add_typer(node_cmds.app, name="node")
app.add_typer(lab_cmds.app, name="lab")
app.add_typer(contacts_cmds.app, name="contacts")
account_cmds.register(app)
network_cmds.register(app)
index_cmds.register(app)
netcheck_cmds.register(app)
relay_cmds.register(app)
directory_cmds.register(app)
demo.register(app)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def run() -> None:
    logs.configure()
    try:
        app()  # standalone mode: usage errors print and exit here, with click's exit codes
    except PunchlineError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as exc:
        if os.environ.get("PUNCHLINE_DEBUG") == "1":
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        typer.echo(f"error: {exc.strerror or exc}{where}", err=True)
        sys.exit(1)
    except Exception as exc:
        if os.environ.get("PUNCHLINE_DEBUG") == "1":
            raise
        typer.echo(
            f"internal error: {type(exc).__name__}: {exc}\n"
            "This is a bug in punchline; run again with PUNCHLINE_DEBUG=1 and report the output.",
            err=True,
        )
        sys.exit(70)
