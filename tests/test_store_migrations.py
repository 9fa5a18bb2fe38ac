"""Alembic migrations of the store: old create_all databases are adopted, models and migrations agree,
and several nodes starting at once on one PostgreSQL database do not break the upgrade."""

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

import node.deid.models  # noqa: F401 - the pseudonyms table is on the store's Base
from node.report.readonly import ReadOnlyStore
from node.store import Store
from node.store.engine import StoreError, engine_url
from node.store.migrate import alembic_config, head
from node.store.models import Base

OLD_SCHEMA = Path(__file__).parent / "data" / "store_schema_create_all_v1.sql"

ROWS = [
    "INSERT INTO studies (study_uid, state, instance_count, revision, first_received_at, last_received_at) "
    "VALUES ('1.2.3', 'routed', 1, 0, 1.0, 2.0)",
    "INSERT INTO series (series_uid, study_uid, instance_count) VALUES ('1.2.3.4', '1.2.3', 1)",
    "INSERT INTO instances (sop_instance_uid, series_uid, study_uid, sop_class_uid, transfer_syntax, path, "
    "size_bytes, received_at) VALUES ('1.2.3.4.5', '1.2.3.4', '1.2.3', '1.2', '1.2.840.10008.1.2.1', '/x', 1, 2.0)",
    "INSERT INTO jobs (study_uid, rule, plugin, priority, series_uids, destinations, state, attempts, created_at) "
    "VALUES ('1.2.3', 'lung', 'ct_lung', 1, '[\"1.2.3.4\"]', '[\"pacs\"]', 'running', 1, 3.0)",
    "INSERT INTO pseudonyms (kind, original, pseudonym, study_uid, key_id, created_at) "
    "VALUES ('uid', '1.2.3', '2.25.1', '1.2.3', 'k1', 4.0)",
]


def _schema(path: Path) -> set[str]:
    con = sqlite3.connect(path)
    try:
        return {" ".join(sql.split()) for (sql,) in con.execute(
            "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name != 'alembic_version'")}
    finally:
        con.close()


def _check_upgraded(url: str) -> None:
    store = Store(url)
    try:
        study = store.get_study("1.2.3")
        assert study.state == "routed" and study.instance_count == 1
        assert [i.path for i in store.instances_of("1.2.3.4")] == ["/x"]
        job = store.get_job(1)
        assert job.plugin == "ct_lung" and job.series_uids == ["1.2.3.4"] and job.owner is None
        # The job found running was claimed before node instances existed: a starting node takes it over.
        [taken] = store.take_over(dead_after_s=30, max_attempts=3)
        assert taken.from_instance is None and taken.outcome == "requeued"
        with store.engine.connect() as c:
            assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == head()
            assert c.execute(text("SELECT count(*) FROM pseudonyms")).scalar() == 1
        assert "owner" in {c["name"] for c in inspect(store.engine).get_columns("jobs")}
    finally:
        store.close()


def test_revision_1_is_the_schema_create_all_made(tmp_path):
    db = tmp_path / "r1.db"
    engine = create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        command.upgrade(alembic_config(conn), "0001")
        conn.commit()
    engine.dispose()
    old = tmp_path / "old.db"
    sqlite3.connect(old).executescript(OLD_SCHEMA.read_text())
    assert _schema(db) == _schema(old)


def test_an_old_sqlite_store_made_by_create_all_is_upgraded_with_its_rows(tmp_path):
    old = tmp_path / "old.db"
    con = sqlite3.connect(old)
    con.executescript(OLD_SCHEMA.read_text())
    for sql in ROWS:
        con.execute(sql)
    con.commit()
    con.close()
    _check_upgraded(f"sqlite:///{old}")


def test_an_upgrade_is_one_line_of_the_store_s_and_a_start_at_head_is_none(tmp_path, caplog):
    from node.logs import setup_logging
    import logging
    import warnings

    old = tmp_path / "old.db"
    sqlite3.connect(old).executescript(OLD_SCHEMA.read_text())
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("alembic").level)
    setup_logging("INFO")  # alembic's chatter is cut there
    root.addHandler(caplog.handler)
    try:
        Store(f"sqlite:///{old}").close()
        upgraded = [r.getMessage() for r in caplog.records]
        caplog.clear()
        Store(f"sqlite:///{old}").close()
        again = [r.getMessage() for r in caplog.records]
    finally:
        logging.captureWarnings(False)
        warnings.resetwarnings()
        root.handlers[:], root.level = saved[:2]
        logging.getLogger("alembic").setLevel(saved[2])
    assert upgraded == [f"store schema upgraded from_revision=none to_revision={head()}"]
    assert again == []


def test_an_old_store_lacking_a_table_gets_it(tmp_path):
    """create_all made a table only once its model was imported: an old store may lack pseudonyms."""
    old = tmp_path / "old.db"
    con = sqlite3.connect(old)
    con.executescript(OLD_SCHEMA.read_text())
    con.execute("DROP TABLE pseudonyms")
    con.execute(ROWS[0])
    con.commit()
    con.close()
    store = Store(f"sqlite:///{old}")
    assert store.get_study("1.2.3").state == "routed"
    assert "pseudonyms" in inspect(store.engine).get_table_names()
    store.close()


def test_an_old_postgresql_store_is_upgraded_with_its_rows(pg_url):
    engine = create_engine(engine_url(pg_url))
    with engine.connect() as conn:  # revision 1 = create_all's schema; without alembic_version = an old store
        command.upgrade(alembic_config(conn), "0001")
        conn.execute(text("DROP TABLE alembic_version"))
        for sql in ROWS:
            conn.execute(text(sql))
        conn.commit()
    engine.dispose()
    _check_upgraded(pg_url)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_models_and_migrations_agree(backend, tmp_path, request):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    store = Store(url)
    try:
        with store.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == []
    finally:
        store.close()


def test_nodes_starting_at_once_on_one_postgresql_database(pg_url):
    errors, stores = [], []
    barrier = threading.Barrier(6)

    def start() -> None:
        barrier.wait()
        try:
            stores.append(Store(pg_url))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == [] and len(stores) == 6
        with stores[0].engine.connect() as c:
            assert c.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head()]
    finally:
        for s in stores:
            s.close()


def test_the_read_only_store_reads_postgresql_and_writes_nothing(pg_url):
    store = Store(pg_url)
    from node.store import InstanceMeta

    store.add_instance(InstanceMeta("1.9", "1.2", "1.8", "1.7", "1.2.840.10008.1.2.1", "/x", 1, "A"), now=time.time())
    store.close()
    ro = ReadOnlyStore(pg_url)
    try:
        assert ro.get_study("1.7").instance_count == 1
        assert [s.series_uid for s in ro.series_of("1.7")] == ["1.8"]
        with pytest.raises(Exception, match="read-only transaction"), ro.session() as s, s.begin():
            s.execute(text("DELETE FROM studies"))
    finally:
        ro.close()


def test_postgresql_unreachable_names_the_address_and_the_key():
    from tests.support.net import free_port

    port = free_port()
    with pytest.raises(StoreError, match=rf"127\.0\.0\.1:{port}/nodb \(storage\.database\)"):
        Store(f"postgresql://postgres@127.0.0.1:{port}/nodb")


def test_postgresql_without_psycopg_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "psycopg" else real(name, *a))
    with pytest.raises(StoreError, match=r"storage\.database .*pip install 'ainode\[postgresql\]'"):
        engine_url("postgresql://u@h/db")


def test_serve_refuses_to_start_when_postgresql_is_unreachable(tmp_path):
    import subprocess
    import sys

    import yaml

    from tests.support.net import free_port

    port = free_port()
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"node": {"ae_title": "AINODE", "host": "127.0.0.1", "port": free_port()},
                                   "storage": {"root": str(tmp_path / "var"),
                                               "database": f"postgresql://ainode@127.0.0.1:{port}/ainode"}}))
    r = subprocess.run([sys.executable, "-m", "node.cli", "serve", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert f"cannot connect to the PostgreSQL store at 127.0.0.1:{port}/ainode (storage.database)" in r.stderr
