"""Fixtures of the integration layer: the store suite's backends (STYLE 5: one suite, every
backend — SQLite and PostgreSQL; a missing PostgreSQL server is a failure, not a skip)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from deskfleet.store import SQLStore
from support import BACKENDS, Backend, Capture


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = BACKENDS[request.param](tmp_path)
    yield b
    b.close()


@pytest.fixture
def backend_store(backend: Backend) -> SQLStore:
    return backend.open(migrate=True)


@pytest.fixture
def s(backend_store: SQLStore) -> SQLStore:
    """Short name for the store under test: a migrated, empty database."""
    return backend_store


@pytest.fixture
def captured() -> Iterator[Capture]:
    handler = Capture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
