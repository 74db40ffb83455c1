"""Shared fixtures: database URLs for SQLite and a private PostgreSQL server."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """A PostgreSQL server for the whole test session (started on a free loopback port)."""
    from tests.peers import Postgres

    pg = Postgres(tmp_path_factory.mktemp("pg")).start()
    yield pg
    pg.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """A fresh, empty database: SQLite in tmp_path, or a new database on the PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'node.sqlite'}"
        return
    pg = request.getfixturevalue("postgres_server")
    import subprocess
    import uuid

    name = f"t_{uuid.uuid4().hex[:12]}"
    psql = str(pg.bindir / "psql") if (pg.bindir / "psql").exists() else "psql"
    subprocess.run([psql, "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "-c",
                    f"CREATE DATABASE {name} OWNER ctvlp"], check=True, capture_output=True)
    yield f"postgresql+psycopg://ctvlp@127.0.0.1:{pg.port}/{name}"
