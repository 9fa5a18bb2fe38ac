"""Engines for the store's URL: SQLite (the default) or PostgreSQL (several nodes sharing one state)."""

from __future__ import annotations

import importlib.util

from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError


class StoreError(RuntimeError):
    """The store named by storage.database cannot be used (driver missing, server unreachable)."""


def engine_url(url: str) -> str:
    """`postgresql://` (and `postgres://`) mean PostgreSQL through psycopg 3, the driver the node ships for.

    An explicit driver (`postgresql+psycopg2://`) is left as given.
    """
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            url = "postgresql+psycopg://" + url.removeprefix(prefix)
            break
    if url.startswith("postgresql+psycopg://") and importlib.util.find_spec("psycopg") is None:
        raise StoreError("storage.database is a PostgreSQL URL but the psycopg driver is not installed: "
                         "pip install 'ainode[postgresql]' (or 'psycopg[binary]>=3.1')")
    return url


def is_postgresql(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def where(url: str) -> str:
    """host:port/database of a URL, without the password, for error messages."""
    u = make_url(url)
    return f"{u.host or 'localhost'}:{u.port or 5432}/{u.database or ''}"


def unreachable(url: str, exc: OperationalError) -> StoreError:
    first = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
    return StoreError(f"cannot connect to the PostgreSQL store at {where(url)} (storage.database): {first}; "
                      "check that the server runs and accepts this node's connections, and the URL's "
                      "user, password and database")
