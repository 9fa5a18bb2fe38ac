"""Brings a store's schema to the newest Alembic revision (node/store/migrations), at every Store start.

No alembic.ini at runtime: the configuration is made here. On PostgreSQL an advisory lock serialises
the upgrade, so several nodes starting at once on one database do not run the same migration twice.
A database made by create_all before migrations existed (tables, no alembic_version) is adopted by
revision 0001, which creates only the tables it lacks, and then upgraded like any other.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import select, func
from sqlalchemy.engine import Connection, Engine

from node.store.engine import is_postgresql

log = logging.getLogger("ainode.store")

MIGRATIONS = Path(__file__).with_name("migrations")
_LOCK_KEY = 0x41494E4F4445  # "AINODE": the advisory lock id of schema upgrades


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()  # type: ignore[return-value]


def current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine) -> None:
    """Upgrade to head; a no-op (one SELECT) when the database is there already."""
    target = head()
    with engine.connect() as conn:
        if current(conn) == target:
            conn.rollback()
            return
        conn.rollback()
        pg = is_postgresql(engine)
        if pg:  # a session lock: the other starting nodes wait here, then find the database at head
            conn.execute(select(func.pg_advisory_lock(_LOCK_KEY)))
            conn.commit()
        try:
            before = current(conn)  # again: under the lock, another node may have upgraded it meanwhile
            conn.rollback()  # the upgrade starts from no open transaction, as it did before this read
            command.upgrade(alembic_config(conn), "head")
            conn.commit()
            if before != target:
                log.info("store schema upgraded from_revision=%s to_revision=%s", before or "none", target)
        finally:
            if pg:
                conn.rollback()
                conn.execute(select(func.pg_advisory_unlock(_LOCK_KEY)))
                conn.commit()


def main() -> None:
    """Developer entry: `python -m node.store.migrate revision -m MSG --url URL` (autogenerates from the
    models against a database at head) or `... upgrade --url URL`."""
    p = argparse.ArgumentParser(prog="python -m node.store.migrate")
    p.add_argument("action", choices=["revision", "upgrade", "current"])
    p.add_argument("--url", required=True)
    p.add_argument("-m", "--message", default="change")
    args = p.parse_args()
    from node.store.engine import engine_url

    cfg = alembic_config(url=engine_url(args.url))
    if args.action == "revision":
        command.revision(cfg, message=args.message, autogenerate=True)
    elif args.action == "upgrade":
        command.upgrade(cfg, "head")
    else:
        command.current(cfg)


if __name__ == "__main__":
    main()
