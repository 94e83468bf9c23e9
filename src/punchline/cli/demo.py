"""`punchline demo`: a whole network on this machine and a real call through it.

A login server, two supernodes (each with its OpenDHT node) and two users' daemons run as
separate processes on loopback. The users sign up with fresh keys; their certificates are
shown and verified offline; then alice calls bob by name and plays a speech sample that
punchline ships, bob's daemon answers and records, and the demo prints the call report, the
recording's path and its wideband PESQ score against the original.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from cryptography import x509

from punchline import environment
from punchline.cli.options import Json, emit_json
from punchline.errors import RemoteError

if TYPE_CHECKING:
    from punchline.identity import certs
    from punchline.lab.loopback import Network

USERS = ("alice", "bob")


def _describe(cert: x509.Certificate, info: certs.CertInfo) -> dict[str, Any]:
    from punchline.identity import certs

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
    from cryptography.hazmat.primitives.serialization import Encoding

    from punchline.identity import certs

    der = bytearray(cert.public_bytes(Encoding.DER))
    position = der.find(b"alice") if b"alice" in der else len(der) // 2
    der[position] ^= 0x01
    try:
        forged = certs.load_untrusted(bytes(der))
        certs.verify(forged, ca, time.time())
    except certs.CertificateError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "accepted (this would be a bug)"


def _certificates(net: Network) -> tuple[list[dict[str, Any]], str]:
    from punchline.client import account
    from punchline.client.store import IdentityStore

    stores = [IdentityStore(net.root / user) for user in USERS]
    ca = stores[0].pinned_ca()
    assert ca is not None
    users = [
        {
            **_describe(s.certificate(), account.current(s, time.time()).info),
            "verified_offline": True,
        }
        for s in stores
    ]
    return users, _tamper(stores[0].certificate(), ca)


def demo(
    as_json: Json = False,
    workdir: Annotated[
        Path | None, typer.Option("--workdir", help="Keep all state here instead of a temp dir.")
    ] = None,
) -> None:
    """Run a login server, two supernodes and two users on loopback, and a call between them."""
    from punchline.lab.loopback import Network, call_with_sample, pesq_of_recording

    environment.require_opendht()

    def say(message: str) -> None:
        if not as_json:
            typer.echo(message)

    root = workdir or Path(tempfile.mkdtemp(prefix="punchline-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    net = Network(root)
    recording = root / "bob-recording.wav"
    try:
        say(f"[1/6] login server (state and logs in {root})")
        net.start_auth()
        assert net.auth is not None
        say(f"      {net.auth.url}  CA {net.auth.ca_fingerprint}")
        for _ in range(2):
            node = net.start_supernode()
            say(f"[2/6] supernode {node.node_id} on udp/tcp 127.0.0.1:{node.udp_port}, "
                f"DHT node on {node.dht_port}")  # fmt: skip
        for user in USERS:
            say(f"[3/6] signing up {user}")
            net.signup(user)
        users, tampered = _certificates(net)
        net.start_daemon("bob", "--auto-answer", "--record", str(recording))
        net.start_daemon("alice")
        for user in USERS:
            where = net.status(user).get("supernode") or {}
            say(f"[4/6] {user} is online via supernode {where.get('node_id')}")
        say("[5/6] alice calls bob and plays a speech sample; bob answers and records")
        report = call_with_sample(net, "alice", "bob", recording)
        if not report.get("connected"):
            raise RemoteError(f"the call did not connect: {report.get('end_reason')}")
    finally:
        net.stop()
    score = round(pesq_of_recording(recording), 2) if recording.exists() else None
    result = {
        "auth_url": net.auth.url if net.auth else None,
        "ca_fingerprint": net.auth.ca_fingerprint if net.auth else None,
        "users": users,
        "tampered_copy": tampered,
        "supernodes": [s.node_id for s in net.supernodes],
        "call": report,
        "recording": str(recording),
        "pesq_wb": score,
        "workdir": str(root),
    }
    if as_json:
        emit_json(result)
        return
    say("[6/6] done\n")
    for entry in users:
        validity = f"{entry['not_before']} .. {entry['not_after']}"
        typer.echo(f"  certificate of {entry['subject']}: serial {entry['serial']}, "
                   f"valid {validity}, verified offline")  # fmt: skip
    typer.echo(f"  a copy of alice's certificate with one byte changed: {tampered}\n")
    typer.echo("  call report:")
    for key, value in report.items():
        typer.echo(f"    {key:<15} {value}")
    typer.echo(f"\n  bob's recording: {recording}")
    typer.echo(f"  PESQ-WB of the recording against the original: {score}")


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
