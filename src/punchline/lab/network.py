"""A punchline network whose processes run inside the hosts of the NAT lab.

The same `loopback.Network` code starts the login server, supernodes, relays and daemons; only
`place` differs: each process runs behind `ip netns exec` in the lab host it was assigned to
and the infrastructure listens on its public host's address at the ports a firewall lets out
(login server on 443, supernodes and relays on 3478 with TCP/TLS on 443 and 80). The
daemons' control sockets are files, so `status` and `call` work from outside the lab.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from punchline.client import account
from punchline.client.store import IdentityStore
from punchline.lab import netns
from punchline.lab.loopback import Network, NotReady, Placement, Relay, Supernode
from punchline.lab.topology import Host, Lab

# Well-known ports: the ones a tcp-web-only firewall or an HTTP proxy lets through.
AUTH_PORT = 443
NODE_PORT = 3478
WEB_PORTS = ("443", "80")


@dataclass
class LabNetwork(Network):
    lab: Lab | None = None
    # Process name (auth, sn1, relay1, a user) -> the lab host it runs on.
    hosts: dict[str, Host] = field(default_factory=dict)

    def place(self, name: str) -> Placement:
        host = self.hosts.get(name)
        if host is None:
            raise NotReady(f"no lab host assigned to {name!r}; assign one in `hosts` first")
        port = AUTH_PORT if name == "auth" else NODE_PORT
        return Placement(tuple(netns.in_ns(host.ns, [])), host.ip, port)

    def start_supernode(self, *extra: str) -> Supernode:
        """A supernode on its own public host; the DHT's rate limit stays (one node per IP)."""
        return super().start_supernode(*_tcp_ports(), *extra)

    def start_relay(self, *extra: str) -> Relay:
        return super().start_relay(*_tcp_ports(), *extra)

    def signup(self, user: str) -> account.Identity:
        """Sign `user` up from the login server's public host, not from the user's site.

        The matrix measures calls, not sign-up, and a proxy-only site has no direct way to
        the login server; the data dir is a file tree, so the daemon started in the site
        later finds its key, certificate and the cached bootstrap list there.
        """
        assert self.auth is not None
        password = secrets.token_urlsafe(16)
        result = self.cli("signup", user, "--auth", self.auth.url, "--data",
                          str(self.root / user), "--password-stdin", "--json",
                          on="auth", stdin=password + "\n")  # fmt: skip
        if result.returncode != 0:
            raise NotReady(f"signing up {user} failed: {result.stderr.strip()}")
        return account.current(IdentityStore(self.root / user), time.time())


def _tcp_ports() -> list[str]:
    """`--tcp-port 443 --tcp-port 80`: how sites without UDP can reach a node."""
    return [arg for port in WEB_PORTS for arg in ("--tcp-port", port)]
