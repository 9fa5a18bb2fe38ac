"""Alembic environment of the store.

The node runs it programmatically (node.store.migrate.upgrade passes its connection in
`config.attributes["connection"]`), so no alembic.ini is needed at runtime. For a developer making a
new revision: `python -m node.store.migrate revision -m "what" --url sqlite:///var/ainode.db`.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

import node.deid.models  # noqa: F401 - the pseudonyms table lives on the same Base
from node.store.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    # render_as_batch: SQLite cannot ALTER most things, so changes are made by copying the table.
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as conn:
        _run(conn)
        conn.commit()
    engine.dispose()
