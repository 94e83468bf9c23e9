"""Storage of the login server through SQLAlchemy: SQLite by default, PostgreSQL in production.

Times are stored as float seconds since the epoch (UTC) so both engines compare them the same
way. SQLite runs in WAL mode with `synchronous=FULL`: an account is on disk before the server
answers the sign-up, so killing the server can never lose a confirmed account.
Schema changes go through the Alembic migrations next to this file; `migrate` runs at start-up.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Boolean, Float, Integer, String, Text, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from punchline.errors import LocalError


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(32), unique=True, nullable=False)
    password_hash: Mapped[str] = mapped_column(String(255), nullable=False)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    password_changed_at: Mapped[float] = mapped_column(Float, nullable=False)
    disabled: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    disabled_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    display_name: Mapped[str | None] = mapped_column(String(64), nullable=True)


class Node(Base):
    """An enrolled supernode, relay or gateway; `last_seen` decides bootstrap-list membership."""

    __tablename__ = "nodes"

    node_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    roles: Mapped[str] = mapped_column(String(64), nullable=False)
    public_key: Mapped[str] = mapped_column(String(64), nullable=False)
    addresses: Mapped[str] = mapped_column(Text, nullable=False)
    enrolled_at: Mapped[float] = mapped_column(Float, nullable=False)
    last_seen: Mapped[float] = mapped_column(Float, nullable=False)


class IssuedCertificate(Base):
    """Every certificate the CA signed: the audit trail an operator needs after an incident."""

    __tablename__ = "certificates"

    serial: Mapped[str] = mapped_column(String(40), primary_key=True)
    subject: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    roles: Mapped[str] = mapped_column(String(64), nullable=False)
    key_fingerprint: Mapped[str] = mapped_column(String(80), nullable=False)
    not_before: Mapped[float] = mapped_column(Float, nullable=False)
    not_after: Mapped[float] = mapped_column(Float, nullable=False)
    issued_at: Mapped[float] = mapped_column(Float, nullable=False)


class DatabaseError(LocalError):
    """The configured database cannot be opened or migrated."""


def default_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'auth.db'}"


def normalise_url(url: str) -> str:
    """Accept plain `postgresql://` URLs and pick the psycopg 3 driver for them."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if url.startswith("postgresql"):
        return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8)
    raise DatabaseError(f"unsupported database URL {url!r}: use sqlite:/// or postgresql://")


def make_sessions(engine: Engine) -> sessionmaker[Any]:
    return sessionmaker(engine, expire_on_commit=False)


def _alembic_config() -> Config:
    cfg = Config()
    location = resources.files("punchline.auth") / "migrations"
    cfg.set_main_option("script_location", str(location))
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision`, keeping every existing row."""
    cfg = _alembic_config()
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(_alembic_config()).get_current_head()
