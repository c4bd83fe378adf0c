"""Engine and sessions for the index: SQLite (WAL) by default, PostgreSQL in production."""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from config.settings import StorageSettings

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # noqa: ANN001 - DBAPI types
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # WAL + NORMAL: a commit is not flushed to the device by itself, so a power loss (not a process
    # crash) can roll back the newest commits, never corrupt the database. FULL would add one device
    # flush per commit (+3.8 ms per stored instance, measured under load on this disk). Nothing a
    # sender was told is stored is lost: its file was durable before its row was committed, and
    # ``cradle archive check --repair`` indexes a complete file without a row (storage/ingest.py).
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def create_db_engine(url: str, *, connect_timeout: float = 10) -> Engine:
    """An engine for ``url``; a SQLite file's directory is created (owner-only) when missing.

    ``hide_parameters``: SQLAlchemy puts bound values (patient names, IDs, birth dates) into its
    exception messages, and those end up in logs.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            create_private_file(Path(parsed.database))
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                               hide_parameters=True)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    if parsed.get_backend_name() == "postgresql":
        # connect_timeout: an unreachable server fails the attempt (the sender hears 0xA700) instead of
        # holding the C-STORE for the operating system's TCP timeout (minutes); pool_timeout: a
        # request waits this long for a pooled connection, not 30 s
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, hide_parameters=True,
                             pool_timeout=connect_timeout,
                             connect_args={"connect_timeout": max(1, int(round(connect_timeout)))})
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, hide_parameters=True)


def create_private_file(path: Path) -> None:
    """Create ``path`` (and its directory) owner-only before SQLite does: SQLite creates a database
    with the process umask, and its ``-wal`` and ``-shm`` files with the database's own mode."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


MIGRATION_LOCK_ID = 0x63726164  # "crad": PostgreSQL advisory lock held while migrating


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Serialise migrations of processes starting together (listener, worker, dispatcher)."""
    if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        fd = os.open(f"{engine.url.database}.migrate.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
        return
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID})
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID})
        return
    yield


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration (alembic ``upgrade head``)."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with _migration_lock(engine), engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error.

    On SQLite the transaction is opened with ``BEGIN IMMEDIATE``: pysqlite would otherwise start it
    only at the first INSERT/UPDATE, so a SAVEPOINT issued before that (``begin_nested``) opened and,
    on RELEASE, committed a transaction of its own, and the rows written under it survived a later
    rollback. Taking the write lock up front also makes read-then-write inside the block consistent
    and lets concurrent writers wait (``busy_timeout``) instead of failing.
    """
    with factory() as session, session.begin():
        _begin_immediate_on_sqlite(session)
        yield session


def _begin_immediate_on_sqlite(session: Session) -> None:
    connection = session.connection()
    if connection.dialect.name != "sqlite":
        return
    if not connection.connection.dbapi_connection.in_transaction:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def configured_engine(storage: StorageSettings) -> Engine:
    """The index engine of a process, with the configured connect timeout."""
    return create_db_engine(storage.database_url, connect_timeout=storage.connect_timeout)


def open_configured_index(storage: StorageSettings) -> sessionmaker[Session]:
    """:func:`open_index` for the configured index (``storage.database_url``, ``storage.connect_timeout``)."""
    return open_index(storage.database_url, connect_timeout=storage.connect_timeout)


def open_index(url: str, *, connect_timeout: float = 10) -> sessionmaker[Session]:
    """Engine + migrations + session factory: what every process does at start."""
    engine = create_db_engine(url, connect_timeout=connect_timeout)
    migrate(engine)
    return session_factory(engine)
