"""Runs the login server: opens storage and the CA, serves HTTPS until told to stop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from punchline.auth import ca as ca_files
from punchline.auth import db
from punchline.auth.api import build_app
from punchline.auth.config import AuthConfig
from punchline.auth.passwords import PasswordHasher
from punchline.auth.service import AuthService
from punchline.relay import credentials
from punchline.util.files import atomic_write, private_dir

log = structlog.get_logger(component="auth")

READY_FILE = "server.json"


@dataclass(frozen=True)
class Storage:
    url: str
    sessions: sessionmaker[Session]


def open_storage(config: AuthConfig) -> Storage:
    """Open and migrate the database, or fail with a message that says what to fix."""
    url = config.db_url or db.default_url(config.data_dir)
    try:
        engine = db.make_engine(url)
        before = db.current_revision(engine)
        db.migrate(engine)
        after = db.current_revision(engine)
    except SQLAlchemyError as exc:
        first = str(exc).splitlines()[0]
        raise db.DatabaseError(f"cannot open the account database {_redact(url)}: {first}") from exc
    if before != after:
        log.info("database schema migrated", previous=before or "empty", current=after)
    return Storage(url, db.make_sessions(engine))


def _redact(url: str) -> str:
    """Database URLs may carry a password; never print it."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return scheme + "://***@" + rest.rsplit("@", 1)[1]
    return url


def _url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "", "::"):  # noqa: S104 - a wildcard bind is reached via loopback here
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"https://{host}:{port}"


async def serve(config: AuthConfig, stop: asyncio.Event | None = None) -> None:
    now = time.time()
    data_dir = private_dir(config.data_dir)
    authority = ca_files.load_or_create(data_dir, now)
    storage = open_storage(config)
    secret = ca_files.load_or_create_secret(data_dir, config.enroll_secret)
    dns, ips = ca_files.local_names(config.listen_host, config.names)
    cert_path, key_path = ca_files.issue_tls(authority, data_dir, now, dns, ips)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.minimum_version = ssl.TLSVersion.TLSv1_2
    tls.load_cert_chain(cert_path, key_path)

    turn_secret = credentials.load_or_create_secret(
        config.turn_secret_file or data_dir / credentials.SECRET_FILE
    )
    service = AuthService(
        config, authority, storage.sessions, PasswordHasher(config.argon2), secret, turn_secret
    )
    runner = web.AppRunner(build_app(service), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, config.listen_host, config.listen_port, ssl_context=tls)
    await site.start()
    port = _bound_port(runner) or config.listen_port
    url = _url(config.listen_host, port)
    ready = {"url": url, "pid": os.getpid(), "ca_fingerprint": authority.fingerprint}
    atomic_write(data_dir / READY_FILE, json.dumps(ready).encode(), mode=0o644)
    log.info(
        "login server listening",
        url=url,
        ca_fingerprint=authority.fingerprint,
        database=_redact(storage.url),
        tls_names=",".join(dns + ips),
    )

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("login server stopping")
        (data_dir / READY_FILE).unlink(missing_ok=True)
        await runner.cleanup()


def _bound_port(runner: web.AppRunner) -> int | None:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return None


def read_ready(data_dir: Path) -> dict[str, object] | None:
    path = data_dir / READY_FILE
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
