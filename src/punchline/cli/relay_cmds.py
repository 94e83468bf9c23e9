"""`punchline relay`: a TURN relay node (RFC 8656) for calls that have no direct path."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from punchline.cli.account_cmds import CaFingerprint
from punchline.cli.options import (
    Advertise,
    AllowPrivatePeers,
    AuthUrlOption,
    EnrollSecret,
    Listen,
    NodeData,
    RelayPorts,
    TcpPorts,
    TurnSecretFile,
    port_range,
)
from punchline.util import logs
from punchline.util.parse import host_port


def relay(
    data: NodeData,
    listen: Listen,
    auth: AuthUrlOption,
    turn_secret_file: TurnSecretFile = None,
    tcp_port: TcpPorts = None,
    relay_ports: RelayPorts = None,
    advertise: Advertise = None,
    enroll_secret: EnrollSecret = None,
    ca_fingerprint: CaFingerprint = None,
    allow_private_peers: AllowPrivatePeers = False,
    max_allocations: Annotated[
        int, typer.Option(help="Allocations the relay holds at most (then 508).")
    ] = 5000,
    user_allocations: Annotated[
        int, typer.Option(help="Allocations one user may hold (then 486).")
    ] = 10,
    user_rate: Annotated[
        int, typer.Option(help="Bytes/s an allocation may relay each way (0: unlimited).")
    ] = 0,
    max_lifetime: Annotated[
        int, typer.Option(help="Longest allocation lifetime granted, in seconds.")
    ] = 3600,
    health: Annotated[
        str, typer.Option(help="HOST:PORT of the HTTP health endpoint (GET /healthz).")
    ] = "127.0.0.1:0",
    python_forwarder: Annotated[
        bool, typer.Option(hidden=True, help="Forward in Python even if the native path exists.")
    ] = False,
) -> None:
    """Run a relay node: TURN over UDP, TCP and TLS (443/80), enrolled in the bootstrap list."""
    from punchline.relay.allocation import RelayConfig
    from punchline.relay.server import RelayServerConfig, run

    logs.configure("INFO")
    config = RelayServerConfig(
        data_dir=data,
        listen_host=host_port(listen)[0],
        listen_port=host_port(listen)[1],
        auth_url=auth,
        turn_secret_file=turn_secret_file,
        tcp_ports=tuple(tcp_port or ()),
        relay_ports=port_range(relay_ports),
        enroll_secret=enroll_secret,
        ca_fingerprint=ca_fingerprint,
        advertise_host=advertise,
        health_listen=host_port(health),
        native_forwarder=not python_forwarder,
        core=RelayConfig(
            max_allocations=max_allocations,
            max_allocations_per_user=user_allocations,
            rate_bytes_per_s=user_rate,
            max_lifetime=float(max_lifetime),
            allow_private_peers=allow_private_peers,
        ),
    )
    asyncio.run(run(config))


def register(app: typer.Typer) -> None:
    app.command()(relay)
