"""The store opened for reading only: reports and replay must never change what the node recorded."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

from node.store.db import Store
from node.store.engine import engine_url


class StoreMissing(Exception):
    """The configured database file does not exist (wrong --config, or the node never ran)."""


class ReadOnlyStore:
    """The Store's query methods over a read-only connection.

    A SQLite file is opened with mode=ro, so neither a table nor a row can be written, and no
    create_all runs (the Store's constructor would create missing tables). SQLite may still create
    the -wal/-shm companion files of a WAL database (its lock index; no data is written to them).
    On PostgreSQL the connection's transactions are read-only (default_transaction_read_only), and no
    migration runs either.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite:///"):
            path = Path(url.removeprefix("sqlite:///")).resolve()
            if not path.is_file():
                raise StoreMissing(f"no store at {path} (storage.database / storage.root in the config): "
                                   "pass the running node's config with --config (or --db-config)")
            self.engine = create_engine(f"sqlite:///file:{path}?mode=ro&uri=true",
                                        connect_args={"check_same_thread": False, "timeout": 30})
        else:
            full = engine_url(url)
            # PostgreSQL enforces it too: every transaction of this engine is READ ONLY.
            args = ({"options": "-c default_transaction_read_only=on"} if full.startswith("postgresql+psycopg://")
                    else {})
            self.engine = create_engine(full, pool_pre_ping=True, connect_args=args)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def session(self) -> Session:
        return self._session()

    def close(self) -> None:
        self.engine.dispose()

    # The Store's own readers, so that a report sees a study exactly as the node's router does.
    get_study = Store.get_study
    series_of = Store.series_of
    instances_of = Store.instances_of
