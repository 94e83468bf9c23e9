"""`punchline node ...`: enrol an infrastructure node with the login server by hand.

Supernodes and relays enrol themselves at start; these commands are for operators and
scripts that want a node identity ready beforehand, or to check the bootstrap list.
"""

from __future__ import annotations

from typing import Annotated

import typer

from punchline.cli.account_cmds import AuthUrl, CaFingerprint
from punchline.cli.options import DataDir, Json, emit_json, store
from punchline.errors import LocalError

app = typer.Typer(help="Infrastructure node identity: enrolment and heartbeats.")


@app.command()
def enroll(
    auth: AuthUrl,
    role: Annotated[
        list[str], typer.Option("--role", help="supernode, relay or gateway (repeatable).")
    ],
    address: Annotated[
        list[str],
        typer.Option("--address", help="Where clients reach it: udp:HOST:PORT, tcp:…, tls:…"),
    ],
    enroll_secret: Annotated[
        str | None,
        typer.Option("--enroll-secret", envvar="PUNCHLINE_ENROLL_SECRET", help="Operator secret."),
    ] = None,
    data: DataDir = None,
    ca_fingerprint: CaFingerprint = None,
    as_json: Json = False,
) -> None:
    """Enrol this node: get a node certificate for its key and join the bootstrap list."""
    from punchline.identity import certs
    from punchline.node import enrolment

    if not enroll_secret:
        raise LocalError(
            "the operator's enrolment secret is needed: "
            "--enroll-secret or env PUNCHLINE_ENROLL_SECRET"
        )
    try:
        roles = [certs.Role(r) for r in role]
    except ValueError as exc:
        raise LocalError(f"unknown role: {exc}") from exc
    addresses = [enrolment.NodeAddress.parse(a) for a in address]
    identity = enrolment.enroll(store(data), auth, enroll_secret, roles, addresses, ca_fingerprint)
    result = {
        "node_id": identity.profile.user,
        "roles": sorted(r.value for r in identity.info.roles),
        "cert_expires": certs.iso(identity.info.not_after),
        "ca_fingerprint": identity.profile.ca_fingerprint,
        "auth_url": identity.profile.auth_url,
    }
    if as_json:
        emit_json(result)
    else:
        typer.echo(f"enrolled node {result['node_id']} as {', '.join(result['roles'])}")


@app.command()
def heartbeat(data: DataDir = None, as_json: Json = False) -> None:
    """Send one heartbeat and print the (CA-verified) bootstrap list of live nodes."""
    from punchline.node import enrolment

    payload = enrolment.heartbeat(store(data))
    if as_json:
        emit_json(payload)
        return
    for node in payload.get("nodes", []):
        typer.echo(f"{node['node_id']}  {','.join(node['roles'])}")
