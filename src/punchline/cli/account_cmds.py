"""User commands: signup, login, whoami, renew, passwd."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated

import typer

from punchline.cli.options import DataDir, Json, emit_json, read_password, store
from punchline.errors import LocalError

if TYPE_CHECKING:
    from punchline.client import account

AuthUrl = Annotated[
    str,
    typer.Option("--auth", envvar="PUNCHLINE_AUTH", help="Login server URL, https://host:port."),
]
OptionalAuthUrl = Annotated[
    str | None,
    typer.Option(
        "--auth",
        envvar="PUNCHLINE_AUTH",
        help="Login server URL [default: the one in the profile].",
    ),
]
CaFingerprint = Annotated[
    str | None,
    typer.Option(
        "--ca-fingerprint",
        help="Expected CA fingerprint (sha256:...); without it the first one seen is pinned.",
    ),
]
PasswordStdin = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from the first line of stdin.")
]


def _show(identity: account.Identity, as_json: bool, verb: str) -> None:
    from punchline.identity import certs

    if as_json:
        emit_json(identity.as_json())
        return
    typer.echo(f"{verb} as {identity.profile.user}")
    typer.echo(f"  certificate serial {format(identity.info.serial, 'x')}")
    typer.echo(f"  valid until        {certs.iso(identity.info.not_after)}")
    typer.echo(f"  login server       {identity.profile.auth_url}")
    typer.echo(f"  CA fingerprint     {identity.profile.ca_fingerprint}")
    typer.echo("  (compare the CA fingerprint with the one your operator published)")


def signup(
    name: Annotated[str, typer.Argument(help="The user name to register.")],
    auth: AuthUrl,
    data: DataDir = None,
    password_stdin: PasswordStdin = False,
    ca_fingerprint: CaFingerprint = None,
    as_json: Json = False,
) -> None:
    """Create an account and log in: generates this device's key and gets a certificate."""
    from punchline.client import account

    password = read_password(password_stdin, confirm=True)
    _show(account.signup(store(data), auth, name, password, ca_fingerprint), as_json, "Signed up")


def login(
    name: Annotated[str, typer.Argument(help="Your user name.")],
    auth: OptionalAuthUrl = None,
    data: DataDir = None,
    password_stdin: PasswordStdin = False,
    ca_fingerprint: CaFingerprint = None,
    as_json: Json = False,
) -> None:
    """Log in with a password and get a fresh certificate for this device's key."""
    from punchline.client import account

    identity_store = store(data)
    profile = identity_store.profile()
    url = auth or (profile.auth_url if profile else None)
    if not url:
        raise LocalError("which login server? pass --auth https://host:port")
    password = read_password(password_stdin)
    _show(account.login(identity_store, url, name, password, ca_fingerprint), as_json, "Logged in")


def whoami(data: DataDir = None, as_json: Json = False) -> None:
    """Show the identity in the data dir, verified offline; renews it first when due."""
    from punchline.client import account

    freshness = account.ensure_fresh(store(data), time.time())
    if as_json:
        emit_json({**freshness.identity.as_json(), "renewed": freshness.renewed})
        return
    _show(freshness.identity, False, "Logged in")
    if freshness.problem:
        typer.echo(f"  renewal postponed: {freshness.problem}", err=True)


def renew(data: DataDir = None, as_json: Json = False) -> None:
    """Renew the certificate now (no password needed while it is still valid)."""
    from punchline.client import account

    _show(account.renew(store(data)), as_json, "Renewed")


def passwd(data: DataDir = None, password_stdin: PasswordStdin = False) -> None:
    """Change the account password (old password, then new, one per line with --password-stdin)."""
    from punchline.client import account

    old = read_password(password_stdin, "Current password")
    new = read_password(password_stdin, "New password", confirm=True)
    account.change_password(store(data), old, new)
    typer.echo("Password changed.")
    from punchline.cli.contacts_cmds import rekey_running_daemon

    rekey_running_daemon(data)  # the contact list key is re-wrapped under the new password


def register(app: typer.Typer) -> None:
    for command in (signup, login, whoami, renew, passwd):
        app.command()(command)
