"""The receiver's group commit: every waiting association's row in one transaction, none answered early."""

import threading

import pytest

from node.receive.group_commit import GroupCommit
from node.store import Store
from node.store.db import InstanceMeta
from node.store.models import Series, StudyState


def meta(i: int, study: str = "1.2.3", series: str = "1.2.3.1") -> InstanceMeta:
    return InstanceMeta(f"{series}.{i}", "1.2.840.10008.5.1.4.1.1.2", series, study, "1.2.840.10008.1.2.1",
                        f"/spool/{i}.dcm", 100, "PACS")


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    yield s
    s.close()


def test_rows_of_concurrent_associations_share_commits_and_all_count(store):
    gc = GroupCommit(store)
    results: dict[int, bool] = {}

    def association(k: int) -> None:
        for i in range(k * 50, k * 50 + 50):
            results[i] = gc.add(meta(i))

    threads = [threading.Thread(target=association, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 200 and all(results.values())
    assert gc.rows == 200 and gc.batches <= 200
    st = store.get_study("1.2.3")
    assert st.instance_count == 200
    assert store.held_counts("1.2.3").series == {"1.2.3.1": 200}
    assert gc.add(meta(7)) is False  # held already: not counted again
    assert store.get_study("1.2.3").instance_count == 200


def test_a_duplicate_within_one_batch_counts_once(store):
    assert store.add_instances([meta(1), meta(1), meta(2)]) == [True, False, True]
    assert store.get_study("1.2.3").instance_count == 2


def test_an_instance_after_completion_reopens_the_study_as_a_new_revision(store):
    store.add_instance(meta(1), now=10.0)
    assert store.mark_complete("1.2.3", "quiet-period", 20.0)
    store.add_instance(meta(2), now=30.0)
    st = store.get_study("1.2.3")
    assert (st.state, st.revision, st.completed_at, st.completion_reason, st.instance_count,
            st.last_received_at) == (StudyState.RECEIVING, 1, None, None, 2, 30.0)


def test_a_failed_commit_fails_every_waiter_of_its_batch(store):
    gc = GroupCommit(store)
    store.close()
    store.add_instances = lambda metas, now=None: (_ for _ in ()).throw(OSError("disk gone"))
    with pytest.raises(OSError, match="disk gone"):
        gc.add(meta(1))
    assert gc._busy is False  # the next association leads again


def test_receive_commits_leave_every_connection_synchronous(store, tmp_path):
    """Instance rows commit without waiting for the WAL fsync on SQLite (their spool files are the durable
    record); every other transition must still find synchronous=FULL on whatever pooled connection it gets."""
    metas = [meta(i) for i in range(5)]
    assert store.add_instances(metas) == [True] * 5
    raws = [store.engine.raw_connection() for _ in range(3)]  # the one add_instances used, and fresh ones
    try:
        for raw in raws:
            cur = raw.cursor()
            if store.postgresql:
                cur.execute("SELECT setting = reset_val FROM pg_settings WHERE name = 'synchronous_commit'")
                assert cur.fetchone()[0]  # the server's own setting (the test server's is off)
            else:
                cur.execute("PRAGMA synchronous")
                assert cur.fetchone()[0] == 2  # FULL
            cur.close()
    finally:
        for raw in raws:
            raw.close()
    assert store.has_instance("1.2.3.1.0") and not store.has_instance("1.2.3.1.9")


def test_on_sqlite_receive_commits_have_a_connection_of_their_own_that_commits_without_the_wal_fsync(store):
    if store.postgresql:
        pytest.skip("SQLite only: PostgreSQL commits receive rows synchronously on a pooled connection")
    assert store.add_instances([meta(1)]) == [True]
    conn = store._receive_conn
    assert conn is not None and conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1  # as every pooled connection
    assert store.add_instances([meta(1), meta(2)]) == [False, True]
    assert store._receive_conn is conn  # kept: no pragma set and reset, no pool, per batch
    with store.session() as s:  # committed: seen at once on the pool's connections
        assert s.get(Series, "1.2.3.1").instance_count == 2
    store.close()
    assert store._receive_conn is None


def test_a_database_error_on_the_receive_connection_is_sqlalchemys(store, tmp_path):
    if store.postgresql:
        pytest.skip("SQLite only")
    from sqlalchemy.exc import DBAPIError

    assert store.add_instances([meta(1)]) == [True]
    store._receive_conn.execute("DROP TABLE instances")  # a broken database: the error a caller sees
    with pytest.raises(DBAPIError):
        store.add_instances([meta(2)])
