"""Real login servers in real processes, on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from punchline.auth import launcher
from tests.conftest import unavailable
from tests.e2e import postgres

BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    bindir = postgres.find_bindir()
    if bindir is None:
        unavailable("PostgreSQL server binaries (Debian package postgresql) are not installed")
        return
    with postgres.cluster(bindir) as url:
        yield url


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(backend: str, request: pytest.FixtureRequest) -> str | None:
    """None means the SQLite default in the data dir; else a fresh PostgreSQL database."""
    if backend == "sqlite":
        return None
    server = request.getfixturevalue("postgres_server")
    return postgres.create_database(server)


StartServer = Callable[..., launcher.AuthProcess]


@pytest.fixture
def start_server(tmp_path: Path, db_url: str | None) -> Iterator[StartServer]:
    """Start (or restart) a login server on this test's data dir and database."""
    started: list[launcher.AuthProcess] = []

    def start(*extra: str, data_dir: Path | None = None) -> launcher.AuthProcess:
        args = list(extra) + (["--db", db_url] if db_url else [])
        server = launcher.start(data_dir or tmp_path / "auth", extra_args=args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(start_server: StartServer) -> launcher.AuthProcess:
    return start_server()
