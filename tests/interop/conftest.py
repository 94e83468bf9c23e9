"""Interop tests reuse the real-server fixtures of the end-to-end suite."""

from tests.e2e.conftest import backend, db_url, postgres_server, server, start_server

__all__ = ["backend", "db_url", "postgres_server", "server", "start_server"]
