"""No confirmed account is ever lost, whatever happens to the server process; upgrades keep data."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import sqlalchemy as sa

from punchline.auth import db, passwords
from tests.e2e.api import credentials, http
from tests.e2e.conftest import StartServer

PASSWORD = "durable password"


def test_sigkill_mid_signup_loses_no_confirmed_account(start_server: StartServer) -> None:
    server = start_server()
    confirmed: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def sign_up_forever(worker: int) -> None:
        with http(server) as client:
            for i in range(10_000):
                if stop.is_set():
                    return
                name = f"user{worker}x{i}"
                try:
                    response = client.post("/v1/signup", json=credentials(name, PASSWORD))
                except httpx.HTTPError:
                    return  # the server died under us: this one was never confirmed
                if response.status_code == 201:
                    with lock:
                        confirmed.append(name)

    workers = [threading.Thread(target=sign_up_forever, args=(w,)) for w in range(4)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 60
    while len(confirmed) < 24 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.kill()  # SIGKILL while the workers still have sign-ups in flight
    stop.set()
    for worker in workers:
        worker.join(30)
    assert len(confirmed) >= 24

    restarted = start_server(data_dir=server.data_dir)
    with http(restarted) as client:
        for name in confirmed:
            response = client.post("/v1/login", json=credentials(name, PASSWORD, "login"))
            assert response.status_code == 200, (name, response.text)


def test_upgrade_from_the_first_schema_keeps_accounts(
    start_server: StartServer, db_url: str | None, tmp_path: Path
) -> None:
    data = tmp_path / "auth"
    data.mkdir()
    engine = db.make_engine(db_url or db.default_url(data))
    db.migrate(engine, "0001")
    assert db.current_revision(engine) == "0001"
    hasher = passwords.PasswordHasher(passwords.Argon2Params())
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO accounts (name, password_hash, created_at, password_changed_at, "
                "disabled) VALUES ('olduser', :h, 1.0, 1.0, false)"
            ),
            {"h": hasher.hash(PASSWORD)},
        )
    engine.dispose()

    server = start_server(data_dir=data)
    with http(server) as client:
        response = client.post("/v1/login", json=credentials("olduser", PASSWORD, "login"))
    assert response.status_code == 200, response.text
    engine = db.make_engine(db_url or db.default_url(data))
    assert db.current_revision(engine) == db.head_revision()
    engine.dispose()
    assert "database schema migrated" in server.log_tail(50)
