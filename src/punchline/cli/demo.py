"""`punchline demo`: a whole (for now: login-server-sized) network on this machine.

It starts a real login server process, signs up two users with real keys, prints their
certificates, then stops the server and shows that the certificates still verify offline,
which is the property the rest of the system is built on. Later issues grow this into a call.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from punchline import environment
from punchline.auth import launcher
from punchline.cli.options import Json, emit_json
from punchline.client import account
from punchline.client.store import IdentityStore
from punchline.identity import certs

USERS = ("alice", "bob")


def _describe(cert: x509.Certificate, info: certs.CertInfo) -> dict[str, Any]:
    return {
        "subject": info.subject,
        "roles": sorted(r.value for r in info.roles),
        "serial": format(info.serial, "x"),
        "not_before": certs.iso(info.not_before),
        "not_after": certs.iso(info.not_after),
        "issuer": cert.issuer.rfc4514_string(),
        "key_fingerprint": info.key_fingerprint,
        "pem": certs.to_pem(cert),
    }


def _tamper(cert: x509.Certificate, ca: x509.Certificate) -> str:
    """Flip one byte inside the signed part and report how verification rejects it."""
    der = bytearray(cert.public_bytes(Encoding.DER))
    position = der.find(b"alice") if b"alice" in der else len(der) // 2
    der[position] ^= 0x01
    try:
        forged = certs.load_untrusted(bytes(der))
        certs.verify(forged, ca, time.time())
    except certs.CertificateError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "accepted (this would be a bug)"


def demo(
    as_json: Json = False,
    workdir: Annotated[
        Path | None, typer.Option("--workdir", help="Keep all state here instead of a temp dir.")
    ] = None,
) -> None:
    """Start a login server, sign up two users and show their certificates."""
    environment.require_opendht()

    def say(message: str) -> None:
        if not as_json:
            typer.echo(message)

    root = workdir or Path(tempfile.mkdtemp(prefix="punchline-demo-"))
    say(f"[1/4] starting the login server (state in {root})")
    server = launcher.start(root / "auth")
    report: dict[str, Any] = {"auth_url": server.url, "ca_fingerprint": server.ca_fingerprint}
    try:
        say(f"      listening on {server.url}, CA fingerprint {server.ca_fingerprint}")
        stores = [IdentityStore(root / user) for user in USERS]
        for user, store in zip(USERS, stores, strict=True):
            say(f"[2/4] signing up {user}")
            account.signup(store, server.url, user, secrets.token_urlsafe(16))
    finally:
        say("[3/4] stopping the login server: from here on, everything is offline")
        server.stop()
    ca = stores[0].pinned_ca()
    assert ca is not None
    users = [
        {
            **_describe(s.certificate(), account.current(s, time.time()).info),
            "verified_offline": True,
        }
        for s in stores
    ]
    report["users"] = users
    report["tampered_copy"] = _tamper(stores[0].certificate(), ca)
    say("[4/4] certificates, verified offline against the pinned CA:")
    if as_json:
        emit_json(report)
    else:
        for entry in users:
            roles = ",".join(entry["roles"])
            typer.echo(
                f"\n  {entry['subject']}: roles={roles} serial={entry['serial']}\n"
                f"    valid {entry['not_before']} .. {entry['not_after']}\n"
                f"    issuer {entry['issuer']}\n    key {entry['key_fingerprint']}\n"
            )
            typer.echo("    " + entry["pem"].strip().replace("\n", "\n    "))
        typer.echo(
            f"\n  a copy of alice's certificate with one byte changed: {report['tampered_copy']}"
        )
    if workdir is None:
        shutil.rmtree(root, ignore_errors=True)


def doctor(as_json: Json = False) -> None:
    """Check this machine has what punchline needs, and say how to fix what is missing."""
    problem = environment.opendht_problem()
    result = {"opendht": problem is None, "problems": [problem] if problem else []}
    if as_json:
        emit_json(result)
    else:
        typer.echo(problem or "everything punchline needs is here")
    if problem:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(demo)
    app.command()(doctor)
