"""Commands of the running network: supernode, up, call, hangup, answer, status.

Heavy modules (audio, crypto cores, the DHT) are imported inside the commands so that
`punchline call` starts quickly; the daemon does the work.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer

from punchline.cli.account_cmds import CaFingerprint
from punchline.cli.options import (
    Advertise,
    AllowPrivatePeers,
    AuthUrlOption,
    DataDir,
    EnrollSecret,
    Json,
    Listen,
    NodeData,
    RelayPorts,
    TcpPorts,
    TurnSecretFile,
    emit_json,
    port_range,
    store,
)
from punchline.errors import LocalError, RemoteError
from punchline.identity import names
from punchline.util import logs
from punchline.util.parse import host_port

WavFile = Annotated[
    Path | None, typer.Option(help="WAV file to use instead of the sound card.", dir_okay=False)
]


def supernode(
    data: NodeData,
    listen: Listen,
    auth: AuthUrlOption,
    bootstrap: Annotated[
        list[str] | None,
        typer.Option("--bootstrap", help="HOST:PORT of another supernode's DHT node (repeatable)."),
    ] = None,
    tcp_port: TcpPorts = None,
    dht_port: Annotated[int, typer.Option(help="UDP port of this node's DHT node (0: any).")] = 0,
    advertise: Advertise = None,
    enroll_secret: EnrollSecret = None,
    ca_fingerprint: CaFingerprint = None,
    loopback_lab: Annotated[
        bool, typer.Option(help="Lift the DHT's per-address rate limit (all nodes on one host).")
    ] = False,
    relay: Annotated[
        bool, typer.Option("--relay", help="Also be a relay node (TURN) on its own ports.")
    ] = False,
    relay_listen: Annotated[
        str | None, typer.Option(help="HOST:PORT of the relay's UDP/TCP port [default: any].")
    ] = None,
    relay_tcp_port: Annotated[
        list[int] | None, typer.Option(help="The relay's TLS/TCP ports, e.g. 443 (repeatable).")
    ] = None,
    turn_secret_file: TurnSecretFile = None,
    relay_ports: RelayPorts = None,
    allow_private_peers: AllowPrivatePeers = False,
) -> None:
    """Run a supernode: attach clients, answer STUN, share presence over OpenDHT."""
    from punchline import environment
    from punchline.relay.allocation import RelayConfig
    from punchline.relay.server import RelayServerConfig
    from punchline.supernode.server import SupernodeConfig, run

    logs.configure("INFO")
    environment.require_opendht()
    host, port = host_port(listen)
    relay_host, relay_port = host_port(relay_listen) if relay_listen else (host, 0)
    relay_config = RelayServerConfig(
        data_dir=data,
        listen_host=relay_host,
        listen_port=relay_port,
        auth_url=auth,
        turn_secret_file=turn_secret_file,
        tcp_ports=tuple(relay_tcp_port or ()),
        relay_ports=port_range(relay_ports),
        advertise_host=advertise,
        health_listen=None,
        core=RelayConfig(allow_private_peers=allow_private_peers),
    )
    config = SupernodeConfig(
        data_dir=data,
        listen_host=host,
        listen_port=port,
        auth_url=auth,
        tcp_ports=tuple(tcp_port or ()),
        dht_port=dht_port,
        dht_bootstrap=tuple(host_port(b) for b in bootstrap or ()),
        enroll_secret=enroll_secret,
        ca_fingerprint=ca_fingerprint,
        advertise_host=advertise,
        dht_unlimited_rate=loopback_lab,
        relay=relay_config if relay else None,
    )
    asyncio.run(run(config))


def up(
    data: DataDir = None,
    auto_answer: Annotated[bool, typer.Option(help="Answer every incoming call at once.")] = False,
    play: WavFile = None,
    record: WavFile = None,
    supernode: Annotated[
        str | None, typer.Option(help="Node id of the supernode to attach to first.")
    ] = None,
    renewal_check: Annotated[
        float, typer.Option(hidden=True, help="Seconds between certificate renewal checks.")
    ] = 600.0,
    relay_only: Annotated[
        bool, typer.Option("--relay-only", help="Send media only through a relay node.")
    ] = False,
    relay_transport: Annotated[
        str,
        typer.Option(help="Way to the relay: auto (udp, tcp, tls, proxy), udp, tcp, tls, proxy."),
    ] = "auto",
    proxy: Annotated[
        str | None,
        typer.Option(
            envvar="HTTPS_PROXY", help="HTTP CONNECT proxy, http://[user:pass@]host:port."
        ),
    ] = None,
    supernode_transport: Annotated[
        str,
        typer.Option(
            hidden=True,
            help="Way to the supernode: auto (udp, tcp 443/80, tls, proxy), udp, tcp, tls, proxy.",
        ),
    ] = "auto",
) -> None:
    """Go online: attach to a supernode, publish presence, take and place calls."""
    from punchline.client.daemon import Daemon, DaemonConfig
    from punchline.client.relay_path import TRANSPORT_CHOICES
    from punchline.relay.connection import ProxyConfig
    from punchline.voice import wav

    logs.configure("INFO")
    identity_store = store(data)
    if play is not None:
        wav.read_wav(play)
    if relay_transport not in TRANSPORT_CHOICES:
        raise LocalError(f"--relay-transport must be one of {', '.join(TRANSPORT_CHOICES)}")
    if proxy is not None:
        ProxyConfig.parse(proxy)  # a wrong URL is reported now, not at the first call
    config = DaemonConfig(identity_store.dir, auto_answer, play, record, prefer=supernode,
                          renewal_check_interval=renewal_check, relay_only=relay_only,
                          relay_transport=relay_transport, proxy=proxy,
                          supernode_transport=supernode_transport)  # fmt: skip
    asyncio.run(Daemon(config).run())


async def _ask(data: Path | None, message: dict[str, Any]) -> list[dict[str, Any]]:
    from punchline.client import control

    return [reply async for reply in control.request(store(data).dir, message)]


def _one(data: Path | None, message: dict[str, Any]) -> dict[str, Any]:
    replies = asyncio.run(_ask(data, message))
    if not replies:
        raise RemoteError("the daemon closed the connection without answering")
    answer = replies[0]
    if not answer.get("ok"):
        raise LocalError(str(answer.get("error", "the daemon refused")))
    return answer


def call(
    name: Annotated[str, typer.Argument(help="Who to call.")],
    data: DataDir = None,
    duration: Annotated[
        float | None, typer.Option(help="Hang up after this many seconds connected.")
    ] = None,
    play: WavFile = None,
    record: WavFile = None,
    as_json: Json = False,
) -> None:
    """Call a user by name and wait until the call ends; then print the call report."""
    from punchline.client import control
    from punchline.voice import wav

    if play is not None:
        wav.read_wav(play)  # fail here, clearly, before anything rings
    request: dict[str, Any] = {"op": "call", "user": names.canonical(name)}
    if duration is not None:
        request["duration"] = duration
    if play is not None:
        request["play"] = str(play.resolve())
    if record is not None:
        request["record"] = str(record.resolve())
    report: dict[str, Any] | None = None

    async def follow() -> None:
        nonlocal report
        async for event in control.request(store(data).dir, request):
            if event.get("ok") is False:
                raise LocalError(str(event.get("error")))
            if event.get("event") == "ended":
                report = event["report"]
            elif not as_json and event.get("event"):
                typer.echo(f"{event['event']}", err=True)

    asyncio.run(follow())
    if report is None:
        raise RemoteError("the daemon ended the call without a report")
    if as_json:
        emit_json(report)
    else:
        state = "connected" if report["connected"] else "not connected"
        typer.echo(f"call with {report['peer']}: {state} ({report.get('end_reason', '')})")
        for key in ("path", "setup_ms", "duration_s", "rtt_ms", "loss", "jitter_ms"):
            typer.echo(f"  {key:<11} {report.get(key)}")
    if not report["connected"]:
        raise typer.Exit(1)


def hangup(data: DataDir = None) -> None:
    """Hang up (or decline) the current call."""
    _one(data, {"op": "hangup"})


def answer(data: DataDir = None) -> None:
    """Answer the ringing incoming call."""
    _one(data, {"op": "answer"})


def status(
    data: DataDir = None,
    as_json: Json = False,
    set_status: Annotated[
        str | None,
        typer.Option("--set", help="Set your presence status: online, away or busy."),
    ] = None,
) -> None:
    """Show whether the daemon is online, through which supernode, and the current call."""
    if set_status is not None:
        _one(data, {"op": "set_status", "status": set_status})
    answer = _one(data, {"op": "status"})
    answer.pop("ok", None)
    if as_json:
        emit_json(answer)
        return
    supernode = answer.get("supernode")
    where = f"via {supernode['node_id']} {supernode['address']}" if supernode else "offline"
    typer.echo(f"{answer['user']}: {where}")
    relay = answer.get("relay")
    if relay:
        host, port = relay["relayed"]
        typer.echo(f"  media relayed by {relay['node_id'][:16]} ({relay['transport']}) "
                   f"at {host}:{port}")  # fmt: skip
    if answer.get("call"):
        typer.echo(f"  call with {answer['call']['peer']}: {answer['call']['state']}")


def register(app: typer.Typer) -> None:
    for command in (supernode, up, call, hangup, answer, status):
        app.command()(command)
