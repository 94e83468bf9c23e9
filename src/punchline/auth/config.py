"""Every tunable of the login server, in one typed place (house rule 9)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from punchline.auth.passwords import Argon2Params
from punchline.auth.throttle import ThrottlePolicy


@dataclass(frozen=True)
class AuthConfig:
    data_dir: Path
    listen_host: str = "127.0.0.1"
    listen_port: int = 8443
    # SQLAlchemy URL; None means the SQLite file `auth.db` in the data dir.
    db_url: str | None = None
    # Extra DNS names or addresses clients may use to reach this server (TLS certificate SANs).
    names: tuple[str, ...] = ()
    # Operator secret nodes must present to enrol; None means generate one into the data dir.
    enroll_secret: str | None = None
    # Secret shared with relays for TURN REST API credentials; None means `turn-secret` in the
    # data dir (created on first start). Give the same file to relays (--turn-secret-file).
    turn_secret_file: Path | None = None
    turn_credential_lifetime: float = 24 * 3600.0
    # Short-lived user certificates: a disabled account stops working within this time.
    user_cert_lifetime: float = 24 * 3600.0
    node_cert_lifetime: float = 7 * 24 * 3600.0
    # A node stays in the bootstrap list this long after its last heartbeat.
    node_liveness: float = 120.0
    # Bodies above this are refused with 413 before being read into memory.
    max_body_bytes: int = 64 * 1024
    argon2: Argon2Params = field(default_factory=Argon2Params)
    # Back-off after failed logins per account, and per source address across accounts.
    account_throttle: ThrottlePolicy = field(default_factory=ThrottlePolicy)
    source_throttle: ThrottlePolicy = field(
        default_factory=lambda: ThrottlePolicy(free_failures=20, base_delay=1.0)
    )
    # Sign-ups per source address before back-off sets in (account-farming brake).
    signup_throttle: ThrottlePolicy = field(
        default_factory=lambda: ThrottlePolicy(free_failures=50, base_delay=2.0)
    )
