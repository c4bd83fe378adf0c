"""Shared fixtures: a node's settings in a temporary directory, a fresh PostgreSQL database, ports."""

from __future__ import annotations

import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from config.settings import Settings, load_settings

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


LONGEST_FIRST = ("test_training_children.py", "test_training.py", "test_demo.py", "test_training_starts.py")
"""``make test`` runs two xdist workers with ``--dist loadfile`` (a module per unit of work: its module
fixtures built once): the longest modules go first, two to a worker, and the short ones fill in after."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require(tool: str) -> str:
    """The path of a command-line peer (DCMTK, dicom3tools), or skip saying which is missing."""
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (apt-get install dcmtk dicom3tools)")
    return path


@pytest.fixture(autouse=True)
def _no_audit_trail_left_behind() -> Iterator[None]:
    """A test that ran ``cradle`` in-process configured this process's audit trail: remove it again."""
    yield
    from storage.audit import unconfigure_audit

    unconfigure_audit()


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def node_settings(tmp_path: Path, port: int) -> Settings:
    """Embedded defaults rooted in tmp_path, listening on a free loopback port."""
    return load_settings(None, **{
        "node": {"ae_title": "CRADLE", "host": "127.0.0.1", "port": port,
                 "allowed_calling_aets": ["STORESCU", "ECHOSCU", "MODALITY", "TESTSCU"]},
        "storage": {"archive_dir": str(tmp_path / "archive"),
                    "database_url": f"sqlite:///{tmp_path / 'cradle.db'}"},
        "queue": {"broker_url": f"sqla+sqlite:///{tmp_path / 'broker.db'}"},
        "models_dir": str(tmp_path / "models"),
        "completion": {"quiet_seconds": 2, "poll_seconds": 0.2},
    })


@pytest.fixture(scope="session")
def training_archive(tmp_path_factory: pytest.TempPathFactory):
    """The synthetic archive every training test shares (tests/training_archive.py), built once."""
    from training_archive import build_archive

    return build_archive(tmp_path_factory.mktemp("node"))


@pytest.fixture(scope="session")
def children_archive(tmp_path_factory: pytest.TempPathFactory):
    """Children's films for pneumonia by type, fracture and bone age (tests/training_archive.py), built once."""
    from training_archive import build_children_archive

    return build_children_archive(tmp_path_factory.mktemp("children"))


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A new, empty PostgreSQL database on the local server, dropped afterwards."""
    name = f"cradle_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - any connection failure means no server
        pytest.skip(f"local PostgreSQL not reachable: {type(exc).__name__}")
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
