"""The store's operations, one method per state transition.

Every method is one transaction. Writers are serialised by a lock because
SQLite has one writer; with synchronous=FULL a commit is on disk when the
method returns. The one exception is the receiver's instance rows
(add_instances): there the spool file, fsynced before the row is written, is
what lets the receiver answer Success, and start-up reconciliation indexes a
durable file whose row was lost.

On PostgreSQL several node processes share the store, so the lock is not enough: each transition
locks the rows it decides on (SELECT … FOR UPDATE; SKIP LOCKED where a row another process holds is
simply someone else's work: claiming jobs and dispatches). SQLite ignores those clauses, and its
single writer gives the same guarantees.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from sqlalchemy import case, create_engine, delete, event, func, select, text, update
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from node.store.engine import engine_url, is_postgresql, unreachable
from node.store.migrate import upgrade

from node.store.models import (
    PRIORITY,
    Base,
    Commitment,
    CommitmentState,
    CompletionReason,
    Dispatch,
    DispatchState,
    Instance,
    Job,
    JobState,
    ModelVersion,
    NodeInstance,
    Request,
    Series,
    Study,
    StudyState,
)


@dataclass(frozen=True)
class InstanceMeta:
    """What the receiver extracts from a dataset header to index it."""

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax: str
    path: str
    size_bytes: int
    calling_ae: str | None
    patient_id: str | None = None
    accession_number: str | None = None
    study_description: str | None = None
    modality: str | None = None
    body_part: str | None = None
    series_description: str | None = None
    slice_thickness: float | None = None


@dataclass(frozen=True)
class ReceivingStudy:
    study_uid: str
    calling_ae: str | None
    last_received_at: float
    instance_count: int


@dataclass(frozen=True)
class HeldCounts:
    """Instances the node holds of a study: what evidence-based completion compares with the PACS."""

    study_uid: str
    instances: int
    series: dict[str, int]  # SeriesInstanceUID → instances held
    last_received_at: float


@dataclass(frozen=True)
class NewJob:
    rule: str
    plugin: str
    priority: str
    series_uids: list[str]
    destinations: list[str]


@dataclass(frozen=True)
class DispatchItem:
    destination: str
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    path: str


@dataclass
class CommitmentOutcome:
    """What applying a storage commitment report did (for the dispatcher's audit records)."""

    transaction_uid: str
    destination: str
    attempt: int
    failed: list[dict]  # as reported, plus objects the report left out
    late: bool  # the transaction had been superseded or given up before the report came
    committed: list[Dispatch] = field(default_factory=list)
    resent: list[Dispatch] = field(default_factory=list)
    dead: list[Dispatch] = field(default_factory=list)


@dataclass
class TakeOver:
    """A running job taken from a node instance that is gone (for the audit record)."""

    job: Job
    from_instance: str | None  # None: a job claimed before node instances were recorded
    from_host: str | None
    from_pid: int | None
    outcome: str  # "requeued" or "failed" (out of run.max_attempts)


_PROCESS_STARTED = time.time()  # (about) when this process began: see Store._is_dead
_RETRY_CODES = {"40P01", "40001"}  # deadlock detected, serialization failure: run the transaction again


def _retrying(unique: bool = False):  # type: ignore[no-untyped-def]
    """Run a transition again when PostgreSQL aborted it for a conflict with another node's transaction.

    `unique`: also when an insert collided with a row another node committed meanwhile (the retry
    then finds that row). SQLite never raises these here (one writer), so nothing changes for it.
    """
    codes = _RETRY_CODES | ({"23505"} if unique else set())

    def wrap(fn):  # type: ignore[no-untyped-def]
        @functools.wraps(fn)
        def run(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            for attempt in range(8):
                try:
                    return fn(self, *args, **kwargs)
                except (IntegrityError, OperationalError, DBAPIError) as exc:
                    code = getattr(getattr(exc, "orig", None), "sqlstate", None)
                    if not self.postgresql or code not in codes or attempt == 7:
                        raise
                    time.sleep(0.02 * (attempt + 1))
        return run
    return wrap


def pid_alive(pid: int) -> bool:
    """Whether a process of this host is running (a zombie, killed but not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


# The receive path's statements (Store.add_instances): standard SQL plus ON CONFLICT DO NOTHING, which
# SQLite (3.24+) and PostgreSQL both take. In an UPDATE's SET every right-hand side reads the old row.
_INSERT_STUDY = text(
    "INSERT INTO studies (study_uid, patient_id, accession_number, study_description, calling_ae, state, "
    "instance_count, revision, first_received_at, last_received_at) VALUES (:study_uid, :patient_id, "
    f":accession_number, :study_description, :calling_ae, '{StudyState.RECEIVING}', 0, 0, :now, :now) "
    "ON CONFLICT DO NOTHING")
_INSERT_SERIES = text(
    "INSERT INTO series (series_uid, study_uid, modality, body_part, description, slice_thickness, "
    "instance_count) VALUES (:series_uid, :study_uid, :modality, :body_part, :description, :slice_thickness, 0) "
    "ON CONFLICT DO NOTHING")
_INSERT_INSTANCE = text(
    "INSERT INTO instances (sop_instance_uid, series_uid, study_uid, sop_class_uid, transfer_syntax, path, "
    "size_bytes, calling_ae, received_at) VALUES (:sop_instance_uid, :series_uid, :study_uid, :sop_class_uid, "
    ":transfer_syntax, :path, :size_bytes, :calling_ae, :now) ON CONFLICT DO NOTHING")
# New images after completion: the study is assembled and routed again (a new revision).
_COUNT_STUDY = text(
    "UPDATE studies SET instance_count = instance_count + 1, last_received_at = :now, "
    f"revision = revision + CASE WHEN state = '{StudyState.RECEIVING}' THEN 0 ELSE 1 END, "
    f"completed_at = CASE WHEN state = '{StudyState.RECEIVING}' THEN completed_at ELSE NULL END, "
    f"completion_reason = CASE WHEN state = '{StudyState.RECEIVING}' THEN completion_reason ELSE NULL END, "
    f"state = '{StudyState.RECEIVING}' WHERE study_uid = :study_uid")
_COUNT_SERIES = text("UPDATE series SET instance_count = instance_count + 1 WHERE series_uid = :series_uid")
# The store row's descriptive text, cut to its column: a sender's over-long value (an accession number longer
# than SH's 16 characters) would fail the INSERT on PostgreSQL and so refuse the instance at every resend.
# The spool file keeps the whole value.
_TEXT_LIMITS = {name: column.type.length for name, column in (
    ("patient_id", Study.patient_id), ("accession_number", Study.accession_number),
    ("study_description", Study.study_description), ("modality", Series.modality), ("body_part", Series.body_part),
    ("series_description", Series.description), ("calling_ae", Instance.calling_ae))}


def _cut(value: str | None, field: str) -> str | None:
    limit = _TEXT_LIMITS[field]
    return value if value is None or len(value) <= limit else value[:limit]


_HAS_INSTANCE = text("SELECT 1 FROM instances WHERE sop_instance_uid = :uid")
_RECEIVE_SQL = {"study": _INSERT_STUDY, "series": _INSERT_SERIES, "instance": _INSERT_INSTANCE,
                "count_study": _COUNT_STUDY, "count_series": _COUNT_SERIES, "has": _HAS_INSTANCE}


def _driver_sql(statement, postgresql: bool) -> str:  # type: ignore[no-untyped-def]
    """A text() statement in the driver's own parameter style: sqlite3 takes :name, psycopg %(name)s."""
    return re.sub(r"(?<![:\w]):(\w+)", r"%(\1)s", statement.text) if postgresql else statement.text


class Store:
    def __init__(self, url: str, *, instance_id: str | None = None) -> None:
        """Open (and migrate to the newest schema) the store at `url` (storage.database).

        `instance_id` names this process among the nodes sharing the store: jobs it claims record it.
        """
        self.url = url
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(
                url, connect_args={"check_same_thread": False, "timeout": 30}
            )
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            full = engine_url(url)
            args = {"connect_timeout": 10} if full.startswith("postgresql+psycopg://") else {}
            self.engine = create_engine(full, pool_pre_ping=True, connect_args=args)
        self.postgresql = is_postgresql(self.engine)
        try:
            upgrade(self.engine)
        except OperationalError as exc:
            self.engine.dispose()
            if self.postgresql:
                raise unreachable(url, exc) from exc
            raise
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self._write = threading.Lock()
        self._receive_conn: sqlite3.Connection | None = None  # add_instances' own, on SQLite (_receive_cursor)
        self._receive_sql = {k: _driver_sql(v, self.postgresql) for k, v in _RECEIVE_SQL.items()}
        self.instance_id = instance_id or uuid.uuid4().hex[:16]
        self.host = socket.gethostname()

    def _insert_ignore(self, s: Session, model: type, **values: object) -> bool:
        """INSERT … ON CONFLICT DO NOTHING: True if this call made the row (another node may have)."""
        ins = (pg_dialect.insert if self.postgresql else sqlite_dialect.insert)(model)
        return s.execute(ins.values(**values).on_conflict_do_nothing()).rowcount == 1

    @contextmanager
    def startup_lock(self) -> Iterator[None]:
        """Serialise node start-ups on a shared store: registering, looking for live peers and the
        start-up file repairs happen one node at a time (a PostgreSQL advisory lock; nothing on SQLite)."""
        if not self.postgresql:
            yield
            return
        with self.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": 0x41494E4F4446})
            conn.commit()
            try:
                yield
            finally:
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": 0x41494E4F4446})
                conn.commit()

    def session(self) -> Session:
        return self._session()

    def close(self) -> None:
        with self._write:
            if self._receive_conn is not None:
                self._receive_conn.close()
                self._receive_conn = None
        self.engine.dispose()

    # ---- receive -------------------------------------------------------

    def add_instance(self, m: InstanceMeta, now: float | None = None) -> bool:
        """Index a durable spool file. False if the SOP instance was already held."""
        return self.add_instances([m], now)[0]

    @contextmanager
    def _driver_cursor(self) -> Iterator:  # type: ignore[type-arg]
        """A DBAPI cursor on a pooled connection, for the statements run once per received instance:
        SQLAlchemy's execution layer costs about 0.15 ms a statement, the driver's about 0.01 ms. Driver
        errors are raised as SQLAlchemy's (IntegrityError, OperationalError, …), as everywhere else."""
        raw = self.engine.raw_connection()
        try:
            with self._cursor_of(lambda: raw) as cur:
                yield cur
        finally:
            raw.close()  # back to the pool, rolled back if left open

    @contextmanager
    def _cursor_of(self, connection: Callable[[], Any]) -> Iterator:  # type: ignore[type-arg]
        """A cursor on `connection()`, closed after; driver errors (getting the connection included) raised as
        SQLAlchemy's (IntegrityError, OperationalError, …), as everywhere else."""
        dbapi_error = self.engine.dialect.loaded_dbapi.Error
        try:
            cur = connection().cursor()
            try:
                yield cur
            finally:
                cur.close()
        except dbapi_error as exc:
            raise DBAPIError.instance(None, None, exc, dbapi_error, dialect=self.engine.dialect) from exc

    @contextmanager
    def _receive_cursor(self) -> Iterator:  # type: ignore[type-arg]
        """The cursor add_instances writes with (under self._write). On SQLite a connection of its own, kept
        open with synchronous=NORMAL (add_instances says why): on a pooled one each batch also set and reset
        the pragma (two statements) and took the connection from the pool and gave it back."""
        if self.postgresql or self.engine.url.database in (None, "", ":memory:"):  # PostgreSQL commits synchronously
            with self._driver_cursor() as cur:
                yield cur
            return
        with self._cursor_of(self._receive_connection) as cur:
            yield cur

    def _receive_connection(self) -> sqlite3.Connection:
        if self._receive_conn is None:
            conn = sqlite3.connect(self.engine.url.database, timeout=30, check_same_thread=False)
            _sqlite_pragmas(conn, None)
            conn.execute("PRAGMA synchronous=NORMAL")
            self._receive_conn = conn
        return self._receive_conn

    @_retrying(unique=True)
    def add_instances(self, metas: Sequence[InstanceMeta], now: float | None = None) -> list[bool]:
        """Index durable spool files in one transaction (one commit); per file, False if its SOP instance
        was already held (or is earlier in `metas`).

        The receiver's group commit calls this with the instances of every association waiting at that
        moment. Plain SQL that SQLite and PostgreSQL share, run by the driver: this runs for every
        received instance, and building ORM or Core statements cost more than the commit. Two receivers
        may get the same study at once: the counts are incremented in place under the UPDATE's row lock,
        and an instance another node inserts meanwhile makes this INSERT do nothing (so it counts once).

        On SQLite the commit does not wait for the WAL fsync (synchronous=NORMAL for this transaction):
        the row is not what makes a received instance durable, its spool file is (fsynced, with its
        folder, before this runs). A process crash loses no committed row (the WAL is in the page cache);
        a power cut can lose the last ones, but never out of order (the next synchronous=FULL commit of
        any other transition syncs them too), and start-up reconciliation indexes every spool file that
        has no row. PostgreSQL commits synchronously: its node processes skip reconciliation while a
        peer is alive.
        """
        now = time.time() if now is None else now
        sql = self._receive_sql
        out: list[bool] = []
        with self._write, self._receive_cursor() as cur:
            try:
                for m in metas:
                    calling_ae = _cut(m.calling_ae, "calling_ae")
                    cur.execute(sql["study"], {
                        "study_uid": m.study_uid, "patient_id": _cut(m.patient_id, "patient_id"),
                        "accession_number": _cut(m.accession_number, "accession_number"),
                        "study_description": _cut(m.study_description, "study_description"),
                        "calling_ae": calling_ae, "now": now})
                    cur.execute(sql["series"], {
                        "series_uid": m.series_uid, "study_uid": m.study_uid, "modality": _cut(m.modality, "modality"),
                        "body_part": _cut(m.body_part, "body_part"),
                        "description": _cut(m.series_description, "series_description"),
                        "slice_thickness": m.slice_thickness})
                    cur.execute(sql["instance"], {
                        "sop_instance_uid": m.sop_instance_uid, "series_uid": m.series_uid,
                        "study_uid": m.study_uid, "sop_class_uid": m.sop_class_uid,
                        "transfer_syntax": m.transfer_syntax, "path": m.path, "size_bytes": m.size_bytes,
                        "calling_ae": calling_ae, "now": now})
                    new = cur.rowcount == 1
                    if new:
                        cur.execute(sql["count_study"], {"study_uid": m.study_uid, "now": now})
                        cur.execute(sql["count_series"], {"series_uid": m.series_uid})
                    out.append(new)
                cur.connection.commit()
            except BaseException:
                cur.connection.rollback()
                raise
        return out

    def has_instance(self, sop_instance_uid: str) -> bool:
        with self._driver_cursor() as cur:
            cur.execute(self._receive_sql["has"], {"uid": sop_instance_uid})
            return cur.fetchone() is not None

    # ---- assemble ------------------------------------------------------

    def quiet_studies(self, cutoff: float) -> list[str]:
        with self.session() as s:
            q = select(Study.study_uid).where(
                Study.state == StudyState.RECEIVING, Study.last_received_at <= cutoff
            )
            return list(s.scalars(q))

    def mark_complete(self, study_uid: str, reason: str, cutoff: float) -> bool:
        """Receiving → complete, only if no image arrived after `cutoff` meanwhile."""
        with self._write, self.session() as s, s.begin():
            res = s.execute(
                update(Study)
                .where(Study.study_uid == study_uid, Study.state == StudyState.RECEIVING,
                       Study.last_received_at <= cutoff)
                .values(state=StudyState.COMPLETE, completed_at=time.time(), completion_reason=reason)
            )
            return res.rowcount == 1

    def receiving_studies(self, cutoff: float | None) -> list[ReceivingStudy]:
        """Studies still receiving whose last instance arrived at or before `cutoff` (None: all of them)."""
        with self.session() as s:
            q = select(Study.study_uid, Study.calling_ae, Study.last_received_at, Study.instance_count).where(
                Study.state == StudyState.RECEIVING)
            if cutoff is not None:
                q = q.where(Study.last_received_at <= cutoff)
            return [ReceivingStudy(*row) for row in s.execute(q)]

    def held_counts(self, study_uid: str) -> HeldCounts | None:
        """What the node holds of a receiving study: its count, its series' counts, its last arrival.

        The study row is read first, so an instance indexed between the two reads leaves
        `last_received_at` older than that instance, and mark_complete(cutoff=last_received_at) refuses.
        """
        with self.session() as s:
            st = s.get(Study, study_uid)
            if st is None or st.state != StudyState.RECEIVING:
                return None
            series = dict(s.execute(select(Series.series_uid, Series.instance_count)
                                    .where(Series.study_uid == study_uid)).all())
            return HeldCounts(study_uid, st.instance_count, series, st.last_received_at)

    @_retrying()
    def force_complete(self, request_id: int) -> dict | None:
        """Carry out an operator's 'complete' request: receiving → complete (reason 'forced') now.
        None if the request was handled already (by another node sharing the store)."""
        with self._write, self.session() as s, s.begin():
            req = s.get(Request, request_id, with_for_update=True)
            if req is None or req.handled_at is not None:
                return None
            st = s.get(Study, req.study_uid, with_for_update=True) if req.study_uid else None
            if st is None:
                outcome = {"completed": False, "why": "no such study"}
            elif st.state != StudyState.RECEIVING:
                outcome = {"completed": False, "why": f"study is {st.state}, not receiving"}
            else:
                st.state, st.completed_at = StudyState.COMPLETE, time.time()
                st.completion_reason = CompletionReason.FORCED
                outcome = {"completed": True, "instances": st.instance_count, "revision": st.revision}
            req.handled_at = time.time()
            req.outcome = outcome
            return outcome

    def studies_in_state(self, state: str) -> list[str]:
        with self.session() as s:
            return list(s.scalars(select(Study.study_uid).where(Study.state == state)))

    def get_study(self, study_uid: str) -> Study | None:
        with self.session() as s:
            return s.get(Study, study_uid)

    def series_of(self, study_uid: str) -> list[Series]:
        with self.session() as s:
            return list(s.scalars(select(Series).where(Series.study_uid == study_uid)))

    def instances_of(self, series_uid: str) -> list[Instance]:
        with self.session() as s:
            return list(s.scalars(select(Instance).where(Instance.series_uid == series_uid)))

    # ---- route ---------------------------------------------------------

    @_retrying()
    def route(self, study_uid: str, jobs: Sequence[NewJob]) -> list[int]:
        """Complete → routed (with queued jobs) or no-rule-matched."""
        now = time.time()
        with self._write, self.session() as s, s.begin():
            study = s.get(Study, study_uid, with_for_update=True)  # two routers: the second finds it routed
            if study is None or study.state != StudyState.COMPLETE:
                return []
            study.state = StudyState.ROUTED if jobs else StudyState.NO_RULE
            study.routed_at = now
            rows = [
                Job(study_uid=study_uid, rule=j.rule, plugin=j.plugin, priority=PRIORITY[j.priority],
                    series_uids=list(j.series_uids), destinations=list(j.destinations),
                    state=JobState.QUEUED, attempts=0, created_at=now)
                for j in jobs
            ]
            s.add_all(rows)
            s.flush()
            return [r.id for r in rows]

    # ---- run -----------------------------------------------------------

    @staticmethod
    def _queue_order(routine_max_wait_s: float | None):  # type: ignore[no-untyped-def]
        """Queued jobs, most urgent first: stat before routine, oldest first; a routine job queued longer
        than `routine_max_wait_s` counts as stat, so a steady stream of stat work cannot starve it."""
        urgency = Job.priority
        if routine_max_wait_s is not None:
            aged = time.time() - routine_max_wait_s
            urgency = case((Job.created_at <= aged, PRIORITY["stat"]), else_=Job.priority)
        return select(Job).where(Job.state == JobState.QUEUED).order_by(urgency, Job.id)

    def claim_job(self, routine_max_wait_s: float | None = None, *,
                  may_run: Callable[[str], bool] | None = None,
                  admit: Callable[[Job], bool] | None = None) -> Job | None:
        """Take the most urgent queued job this worker may run (by plugin name): queued → running.

        `admit` is asked about that job only, inside the claim; if it says no (its GPU has too little
        memory free) nothing is claimed, so a less urgent job that would fit cannot overtake it.
        On PostgreSQL the job row is locked with SKIP LOCKED: a job another node is claiming right now
        is skipped, never claimed twice. The claim records this instance as the job's owner.
        """
        with self._write, self.session() as s, s.begin():
            plugins = s.scalars(select(Job.plugin).where(Job.state == JobState.QUEUED).distinct())
            allowed = [p for p in plugins if may_run is None or may_run(p)]
            if not allowed:
                return None
            job = s.scalars(self._queue_order(routine_max_wait_s).where(Job.plugin.in_(allowed)).limit(1)
                            .with_for_update(skip_locked=True)).first()
            if job is None or (admit is not None and not admit(job)):
                return None
            job.state = JobState.RUNNING
            job.attempts += 1
            job.started_at = time.time()
            job.owner = self.instance_id
            return job

    def peek_jobs(self, routine_max_wait_s: float | None = None, limit: int = 8) -> list[Job]:
        """The next queued jobs in claim order, without claiming them (for prefetching their input)."""
        with self.session() as s:
            return list(s.scalars(self._queue_order(routine_max_wait_s).limit(limit)))

    def requeue_interrupted(self, max_attempts: int) -> tuple[list[Job], list[Job]]:
        """Jobs found running at start-up were cut off by a stop or crash.

        Queue them again, unless they have already been started `max_attempts` times: a job that
        kills the node every time it runs must not take it down forever. Returns (requeued, failed).
        """
        requeued, failed = [], []
        with self._write, self.session() as s, s.begin():
            for job in s.scalars(select(Job).where(Job.state == JobState.RUNNING).with_for_update()):
                (requeued if self._requeue_cut_off(job, max_attempts) else failed).append(job)
        return requeued, failed

    @staticmethod
    def _requeue_cut_off(job: Job, max_attempts: int) -> bool:
        """A running job whose process is gone: queued again (True), or failed when out of attempts."""
        if job.attempts >= max_attempts:
            job.state = JobState.FAILED
            job.error = (f"interrupted {job.attempts} times (run.max_attempts = {max_attempts}); "
                         "not started again")
            job.finished_at = time.time()
            return False
        job.state = JobState.QUEUED
        return True

    # ---- node instances (several processes on one store) ---------------

    def register_instance(self, name: str, now: float | None = None) -> NodeInstance:
        """Record this process as a running node instance (host, pid), heartbeating from now."""
        now = time.time() if now is None else now
        with self._write, self.session() as s, s.begin():
            row = NodeInstance(id=self.instance_id, name=name, host=self.host, pid=os.getpid(),
                               started_at=now, heartbeat_at=now)
            s.add(row)
            return row

    def heartbeat(self, now: float | None = None) -> str | None:
        """This instance is alive. Returns the id of a peer that had declared it dead (its jobs were taken
        over meanwhile: a stall longer than run.takeover_after_s), else None; the instance is alive again."""
        now = time.time() if now is None else now
        with self._write, self.session() as s, s.begin():
            row = s.get(NodeInstance, self.instance_id, with_for_update=True)
            if row is None:
                return None
            row.heartbeat_at = now
            declared_by, row.stopped_at, row.stopped_by = row.stopped_by, None, None
            return declared_by

    def instance_stopped(self, now: float | None = None) -> None:
        """A clean stop: this instance owns nothing any more."""
        with self._write, self.session() as s, s.begin():
            row = s.get(NodeInstance, self.instance_id, with_for_update=True)
            if row is not None:
                row.stopped_at = time.time() if now is None else now

    def _is_dead(self, row: NodeInstance, now: float, dead_after_s: float) -> bool:
        if row.id == self.instance_id:
            return False
        if row.stopped_at is not None or row.heartbeat_at < now - dead_after_s:
            return True
        # Same host: a process that is gone is dead now (a restart right after kill -9 requeues at once);
        # a row with our own pid, registered before this process began, is an earlier life of this pid
        # (a container restarted: its pid 1 again).
        if row.host != self.host:
            return False
        if row.pid == os.getpid():
            return row.started_at < _PROCESS_STARTED
        return not pid_alive(row.pid)

    def live_peers(self, dead_after_s: float, now: float | None = None) -> list[NodeInstance]:
        """Other node instances on this store that are alive."""
        now = time.time() if now is None else now
        with self.session() as s:
            rows = s.scalars(select(NodeInstance).where(NodeInstance.stopped_at.is_(None),
                                                        NodeInstance.id != self.instance_id))
            return [r for r in rows if not self._is_dead(r, now, dead_after_s)]

    @_retrying()
    def take_over(self, dead_after_s: float, max_attempts: int, now: float | None = None) -> list[TakeOver]:
        """Running jobs whose owner is not a live instance are queued again (or failed, out of attempts);
        the dead owners are marked stopped and their dispatch leases end now.

        Jobs are locked (SKIP LOCKED: two nodes taking over at once share the work) before the instances
        are read, so an owner that registered and claimed meanwhile is seen as alive.
        """
        now = time.time() if now is None else now
        out: list[TakeOver] = []
        with self._write, self.session() as s, s.begin():
            jobs = list(s.scalars(select(Job).where(Job.state == JobState.RUNNING).order_by(Job.id)
                                  .with_for_update(skip_locked=True)))
            rows = {r.id: r for r in s.scalars(select(NodeInstance))}
            dead = {i for i, r in rows.items() if self._is_dead(r, now, dead_after_s)}
            for job in jobs:
                owner = rows.get(job.owner) if job.owner else None
                if job.owner == self.instance_id or (owner is not None and owner.id not in dead):
                    continue
                requeued = self._requeue_cut_off(job, max_attempts)
                out.append(TakeOver(job, job.owner, owner.host if owner else None, owner.pid if owner else None,
                                    "requeued" if requeued else "failed"))
            for i in dead:
                if rows[i].stopped_at is None:
                    rows[i].stopped_at, rows[i].stopped_by = now, self.instance_id
            if dead:
                s.execute(update(Dispatch).where(Dispatch.state == DispatchState.PENDING,
                                                 Dispatch.claimed_by.in_(dead))
                          .values(next_attempt_at=now, claimed_by=None))
        return out

    def _owned(self, s: Session, job_id: int) -> Job | None:
        """The job, locked, if it is still running as this instance's: not taken over by another node
        (that happens only when this one stalled past run.takeover_after_s; the job runs there now)."""
        job = s.get(Job, job_id, with_for_update=True)
        if job is None or job.state != JobState.RUNNING or job.owner not in (None, self.instance_id):
            return None
        return job

    def release_job(self, job_id: int) -> None:
        """Running → queued without using up an attempt: a graceful stop cut the job off."""
        with self._write, self.session() as s, s.begin():
            job = self._owned(s, job_id)
            if job is not None:
                job.state = JobState.QUEUED
                job.attempts = max(0, job.attempts - 1)

    def job_failed(self, job_id: int, error: str, timings: dict | None = None) -> bool:
        """Running → failed. False if the job is no longer this instance's (taken over)."""
        with self._write, self.session() as s, s.begin():
            job = self._owned(s, job_id)
            if job is None:
                return False
            job.state = JobState.FAILED
            job.error = error
            job.finished_at = time.time()
            if timings is not None:
                job.timings = timings
            return True

    @_retrying()
    def job_results_built(
        self, job_id: int, plugin_version: str, summary: str, timings: dict, items: Iterable[DispatchItem],
        output: dict | None = None, shadow: bool = False,
    ) -> bool:
        """Running → results-built, with one pending dispatch per object and destination, and the job's
        output statistics (node/monitor/stats.py) in the same transaction. False (nothing recorded) if
        the job is no longer this instance's: another node took it over and runs it."""
        now = time.time()
        with self._write, self.session() as s, s.begin():
            job = self._owned(s, job_id)
            if job is None:
                return False
            items = list(items)
            job.plugin_version = plugin_version
            job.summary = summary
            job.timings = timings
            job.state = JobState.RESULTS_BUILT if items else JobState.DONE_LOCAL
            if not items:
                job.finished_at = now
            s.add_all(
                Dispatch(job_id=job_id, study_uid=job.study_uid, destination=i.destination, kind=i.kind,
                         sop_class_uid=i.sop_class_uid, sop_instance_uid=i.sop_instance_uid, path=i.path,
                         state=DispatchState.PENDING, attempts=0, next_attempt_at=now)
                for i in items
            )
            if output is not None:
                from node.monitor.records import add_output_rows

                add_output_rows(s, job, output, shadow, now)
            return True

    def add_dispatches(self, job_id: int, items: Iterable[DispatchItem]) -> None:
        """More objects for a job that already has results (a result returned by an external service)."""
        now = time.time()
        with self._write, self.session() as s, s.begin():
            job = s.get(Job, job_id)
            s.add_all(
                Dispatch(job_id=job_id, study_uid=job.study_uid, destination=i.destination, kind=i.kind,
                         sop_class_uid=i.sop_class_uid, sop_instance_uid=i.sop_instance_uid, path=i.path,
                         state=DispatchState.PENDING, attempts=0, next_attempt_at=now)
                for i in items
            )

    def forward_job_for(self, study_uid: str, destination: str) -> int | None:
        """The newest job of `study_uid` that sent copies to `destination` (what a returned result belongs to)."""
        with self.session() as s:
            return s.scalar(select(Dispatch.job_id).where(Dispatch.study_uid == study_uid,
                                                          Dispatch.destination == destination,
                                                          Dispatch.kind == "FWD")
                            .order_by(Dispatch.job_id.desc()).limit(1))

    def get_job(self, job_id: int) -> Job | None:
        with self.session() as s:
            return s.get(Job, job_id)

    # ---- dispatch ------------------------------------------------------

    def due_dispatches(self, now: float) -> list[Dispatch]:
        with self.session() as s:
            q = (select(Dispatch)
                 .where(Dispatch.state == DispatchState.PENDING, Dispatch.next_attempt_at <= now)
                 .order_by(Dispatch.id))
            return list(s.scalars(q))

    @_retrying()
    def claim_dispatches(self, now: float, lease_s: float) -> list[Dispatch]:
        """Due pending dispatches, leased to this instance for `lease_s`: their next_attempt_at moves
        forward, so another node's dispatcher does not send them at the same time (SKIP LOCKED skips those
        it is leasing right now). Sent, retried or given up, a row leaves the lease; a dispatcher that dies
        with a lease loses it when its instance is taken over, or when the lease runs out."""
        with self._write, self.session() as s, s.begin():
            rows = list(s.scalars(select(Dispatch)
                                  .where(Dispatch.state == DispatchState.PENDING, Dispatch.next_attempt_at <= now)
                                  .order_by(Dispatch.id).with_for_update(skip_locked=True)))
            for d in rows:
                d.next_attempt_at, d.claimed_by = now + lease_s, self.instance_id
            return rows

    def release_dispatches(self, dispatch_ids: Sequence[int], now: float | None = None) -> None:
        """End this instance's lease on rows it could not handle (a dispatcher error): due again now."""
        now = time.time() if now is None else now
        with self._write, self.session() as s, s.begin():
            s.execute(update(Dispatch).where(Dispatch.id.in_(dispatch_ids), Dispatch.state == DispatchState.PENDING,
                                             Dispatch.claimed_by == self.instance_id)
                      .values(next_attempt_at=now, claimed_by=None))

    @_retrying()
    def dispatch_sent(self, dispatch_ids: Sequence[int]) -> None:
        now = time.time()
        with self._write, self.session() as s, s.begin():
            s.execute(update(Dispatch).where(Dispatch.id.in_(dispatch_ids))
                      .values(state=DispatchState.SENT, sent_at=now, attempts=Dispatch.attempts + 1))
            self._roll_up_jobs(s, dispatch_ids)

    @_retrying()
    def dispatch_retry(self, dispatch_id: int, error: str, next_attempt_at: float, give_up: bool) -> None:
        with self._write, self.session() as s, s.begin():
            d = s.get(Dispatch, dispatch_id, with_for_update=True)
            d.attempts += 1
            d.last_error = error
            d.next_attempt_at = next_attempt_at
            if give_up:
                d.state = DispatchState.DEAD_LETTER
            self._roll_up_jobs(s, [dispatch_id])

    def _roll_up_jobs(self, s: Session, dispatch_ids: Sequence[int]) -> None:
        """A job is dispatched when all its objects are sent; dead-letter when any has given up."""
        job_ids = sorted(set(s.scalars(select(Dispatch.job_id).where(Dispatch.id.in_(dispatch_ids)))))
        for job_id in job_ids:
            # Locked before its dispatches' states are read: two dispatchers sending objects of one job
            # roll it up one after the other, so the second sees the first's rows sent.
            job = s.get(Job, job_id, with_for_update=True)
            states = list(s.scalars(select(Dispatch.state).where(Dispatch.job_id == job_id)))
            if all(st == DispatchState.SENT for st in states):
                job.state = JobState.DISPATCHED
                job.finished_at = time.time()
            elif DispatchState.DEAD_LETTER in states and not {DispatchState.PENDING,
                                                               DispatchState.SENT_UNCOMMITTED} & set(states):
                job.state = JobState.DEAD_LETTER
                job.error = "dispatch gave up: " + "; ".join(
                    sorted(set(filter(None, s.scalars(select(Dispatch.last_error).where(
                        Dispatch.job_id == job_id, Dispatch.state == DispatchState.DEAD_LETTER))))))
                job.finished_at = time.time()

    # ---- storage commitment --------------------------------------------

    @_retrying()
    def dispatch_sent_uncommitted(self, dispatch_ids: Sequence[int], transaction_uid: str, destination: str,
                                  next_check_at: float, now: float | None = None) -> None:
        """Sent, but the PACS has not yet taken responsibility: the objects wait under a new transaction.

        Recorded before the N-ACTION goes out, so a report that comes back at once finds its transaction.
        """
        now = time.time() if now is None else now
        with self._write, self.session() as s, s.begin():
            s.execute(update(Dispatch).where(Dispatch.id.in_(dispatch_ids))
                      .values(state=DispatchState.SENT_UNCOMMITTED, sent_at=now, attempts=Dispatch.attempts + 1))
            s.add(Commitment(transaction_uid=transaction_uid, destination=destination,
                             dispatch_ids=list(dispatch_ids), attempt=1, requested_at=now,
                             next_check_at=next_check_at, state=CommitmentState.WAITING))

    @_retrying()
    def commitment_renew(self, old_uid: str, new_uid: str, next_check_at: float,
                         now: float | None = None) -> list[Dispatch]:
        """No report for `old_uid` in time: its objects still uncommitted move to a new transaction
        (one more attempt). Returns them; [] if there are none (the old one is then simply expired)."""
        now = time.time() if now is None else now
        with self._write, self.session() as s, s.begin():
            old = s.get(Commitment, old_uid, with_for_update=True)
            if old is None or old.state != CommitmentState.WAITING:
                return []
            old.state, old.expired_at = CommitmentState.EXPIRED, now
            rows = list(s.scalars(select(Dispatch).where(Dispatch.id.in_(old.dispatch_ids),
                                                         Dispatch.state == DispatchState.SENT_UNCOMMITTED)
                                  .order_by(Dispatch.id)))
            if rows:
                s.add(Commitment(transaction_uid=new_uid, destination=old.destination,
                                 dispatch_ids=[d.id for d in rows], attempt=old.attempt + 1, requested_at=now,
                                 next_check_at=next_check_at, state=CommitmentState.WAITING))
            return rows

    def commitment_request_failed(self, transaction_uid: str, error: str, next_check_at: float) -> None:
        """The N-ACTION did not get through: keep waiting, but only until `next_check_at` (the retry)."""
        with self._write, self.session() as s, s.begin():
            c = s.get(Commitment, transaction_uid, with_for_update=True)
            if c is not None and c.state == CommitmentState.WAITING:
                c.error, c.next_check_at = error, next_check_at

    @_retrying()
    def commitment_give_up(self, transaction_uid: str, error: str, now: float | None = None) -> list[Dispatch]:
        """Out of attempts: the objects still uncommitted become dead-letter. Returns them."""
        now = time.time() if now is None else now
        with self._write, self.session() as s, s.begin():
            c = s.get(Commitment, transaction_uid, with_for_update=True)
            if c is None or c.state != CommitmentState.WAITING:
                return []
            c.state, c.expired_at, c.error = CommitmentState.EXPIRED, now, error
            rows = list(s.scalars(select(Dispatch).where(Dispatch.id.in_(c.dispatch_ids),
                                                         Dispatch.state == DispatchState.SENT_UNCOMMITTED)))
            for d in rows:
                d.state, d.last_error = DispatchState.DEAD_LETTER, error
            self._roll_up_jobs(s, [d.id for d in rows])
            return rows

    def commitment_reported(self, transaction_uid: str, committed: Sequence[str], failed: Sequence[dict],
                            reported_by: str, now: float | None = None) -> str | None:
        """Record a PACS's N-EVENT-REPORT (the dispatcher applies it). Returns the transaction's state
        before the report, or None for a transaction this node never asked for. A repeat is ignored."""
        now = time.time() if now is None else now
        with self._write, self.session() as s, s.begin():
            c = s.get(Commitment, transaction_uid, with_for_update=True)
            if c is None:
                return None
            before = c.state
            if before in (CommitmentState.WAITING, CommitmentState.EXPIRED):
                c.state, c.reported_at, c.reported_by = CommitmentState.REPORTED, now, reported_by
                c.committed, c.failed = list(committed), [dict(f) for f in failed]
            return before

    def commitment_state(self, transaction_uid: str) -> str | None:
        with self.session() as s:
            return s.scalar(select(Commitment.state).where(Commitment.transaction_uid == transaction_uid))

    def get_commitment(self, transaction_uid: str) -> Commitment | None:
        with self.session() as s:
            return s.get(Commitment, transaction_uid)

    def reported_commitments(self) -> list[Commitment]:
        with self.session() as s:
            return list(s.scalars(select(Commitment).where(Commitment.state == CommitmentState.REPORTED)
                                  .order_by(Commitment.reported_at)))

    def overdue_commitments(self, now: float) -> list[Commitment]:
        """Transactions still waiting for a report at `now`: to be requested again, or given up."""
        with self.session() as s:
            return list(s.scalars(select(Commitment).where(Commitment.state == CommitmentState.WAITING,
                                                           Commitment.next_check_at <= now)
                                  .order_by(Commitment.requested_at)))

    @_retrying()
    def commitment_apply(self, transaction_uid: str, *, error_prefix: str, max_attempts: int,
                         retry_at: Callable[[int], float]) -> CommitmentOutcome | None:
        """Apply a recorded report: committed objects are sent (their jobs roll up to dispatched); the others
        go back to pending (attempts made → `retry_at`) or, out of attempts, dead-letter.

        An object the report leaves out counts as failed. For a transaction already superseded (expired),
        only its confirmations count: the newer request decides about the rest.
        """
        with self._write, self.session() as s, s.begin():
            c = s.get(Commitment, transaction_uid, with_for_update=True)
            if c is None or c.state != CommitmentState.REPORTED:
                return None
            committed = set(c.committed or [])
            reasons = {f["sop_instance_uid"]: f.get("reason", "") for f in c.failed or []}
            out = CommitmentOutcome(transaction_uid=transaction_uid, destination=c.destination, attempt=c.attempt,
                                    failed=list(c.failed or []), late=c.expired_at is not None)
            rows = list(s.scalars(select(Dispatch).where(Dispatch.id.in_(c.dispatch_ids)).order_by(Dispatch.id)))
            for d in rows:
                uid = d.sop_instance_uid
                if uid in committed and uid not in reasons:
                    if d.state == DispatchState.SENT_UNCOMMITTED:
                        d.state = DispatchState.SENT
                    out.committed.append(d)
                    continue
                if uid not in reasons:
                    out.failed.append({"sop_instance_uid": uid, "reason": "not in the report"})
                if d.state != DispatchState.SENT_UNCOMMITTED or out.late:
                    continue
                d.last_error = f"{error_prefix}: {reasons.get(uid) or 'not in the report'}"
                if d.attempts >= max_attempts:
                    d.state = DispatchState.DEAD_LETTER
                    out.dead.append(d)
                else:
                    d.state, d.next_attempt_at = DispatchState.PENDING, retry_at(d.attempts)
                    out.resent.append(d)
            c.state = CommitmentState.FAILED if out.failed else CommitmentState.COMMITTED
            self._roll_up_jobs(s, [d.id for d in rows])
            return out

    # ---- operator requests ---------------------------------------------

    def add_request(self, action: str, *, job_id: int | None = None, study_uid: str | None = None,
                    requested_by: str | None = None) -> int:
        with self._write, self.session() as s, s.begin():
            r = Request(action=action, job_id=job_id, study_uid=study_uid, requested_by=requested_by,
                        requested_at=time.time())
            s.add(r)
            s.flush()
            return r.id

    def pending_requests(self) -> list[Request]:
        with self.session() as s:
            return list(s.scalars(select(Request).where(Request.handled_at.is_(None)).order_by(Request.id)))

    def get_request(self, request_id: int) -> Request | None:
        with self.session() as s:
            return s.get(Request, request_id)

    @_retrying()
    def requeue(self, request_id: int) -> dict | None:
        """Carry out a requeue request: dead-letter sends go out again, failed jobs run again.

        Which jobs: the request's job, or all of its study's, or (neither given) every job in
        dead-letter or failed. Attempts start from zero. Returns the outcome recorded on the request,
        or None if another node handled it first.
        """
        now = time.time()
        with self._write, self.session() as s, s.begin():
            req = s.get(Request, request_id, with_for_update=True)
            if req is None or req.handled_at is not None:
                return None  # handled already, by another node sharing the store
            q = select(Job).where(Job.state.in_((JobState.DEAD_LETTER, JobState.FAILED)))
            if req.job_id is not None:
                q = select(Job).where(Job.id == req.job_id)
            elif req.study_uid is not None:
                q = q.where(Job.study_uid == req.study_uid)
            resent, rerun, skipped = [], [], []
            for job in s.scalars(q.order_by(Job.id).with_for_update()):
                dead = list(s.scalars(select(Dispatch).where(Dispatch.job_id == job.id,
                                                             Dispatch.state == DispatchState.DEAD_LETTER)))
                if job.state == JobState.DEAD_LETTER and dead:
                    for d in dead:
                        d.state, d.attempts, d.next_attempt_at, d.last_error = DispatchState.PENDING, 0, now, None
                    job.state, job.error, job.finished_at = JobState.RESULTS_BUILT, None, None
                    resent.append({"job_id": job.id, "study_uid": job.study_uid, "objects": len(dead)})
                elif job.state == JobState.FAILED:
                    s.execute(delete(Dispatch).where(Dispatch.job_id == job.id))
                    job.state, job.error, job.finished_at, job.attempts = JobState.QUEUED, None, None, 0
                    rerun.append({"job_id": job.id, "study_uid": job.study_uid})
                else:
                    skipped.append({"job_id": job.id, "state": job.state})
            req.handled_at = now
            req.outcome = {"resent": resent, "rerun": rerun, "skipped": skipped}
            return req.outcome

    # ---- retention -----------------------------------------------------

    @staticmethod
    def _purgeable(cutoff: float):  # type: ignore[no-untyped-def]
        """Studies whose every job ended with its results dispatched (or had nowhere to go) before `cutoff`,
        and studies no rule matched that were routed before `cutoff`. A failed or dead-letter job keeps
        its study, so it can still be requeued."""
        not_done = case((Job.state.in_((JobState.DISPATCHED, JobState.DONE_LOCAL))
                         & (Job.finished_at <= cutoff), 0), else_=1)
        routed = (select(Job.study_uid).join(Study, Study.study_uid == Job.study_uid)
                  .where(Study.state == StudyState.ROUTED)
                  .group_by(Job.study_uid).having(func.sum(not_done) == 0))
        unmatched = select(Study.study_uid).where(Study.state == StudyState.NO_RULE, Study.routed_at <= cutoff)
        return routed.union(unmatched)

    def purgeable_studies(self, cutoff: float) -> list[str]:
        with self.session() as s:
            return list(s.scalars(self._purgeable(cutoff)))

    @_retrying()
    def purge_study(self, study_uid: str, cutoff: float) -> list[str]:
        """Delete the study's instance rows (state → purged) and return the files to delete.

        Rows go first: a crash before the files are deleted leaves files without rows, which the
        start-up reconciler deletes because their study is purged. Jobs and dispatches are kept as history.
        Returns [] if the study is no longer purgeable (a new instance arrived meanwhile).
        """
        with self._write, self.session() as s, s.begin():
            # Locked first: of two nodes purging at once, the second finds the study purged.
            study = s.get(Study, study_uid, with_for_update=True)
            if study is None or study.state == StudyState.PURGED:
                return []
            eligible = self._purgeable(cutoff).subquery()
            if s.scalar(select(eligible.c[0]).where(eligible.c[0] == study_uid)) is None:
                return []
            paths = list(s.scalars(select(Instance.path).where(Instance.study_uid == study_uid)))
            s.execute(delete(Instance).where(Instance.study_uid == study_uid))
            s.execute(delete(Series).where(Series.study_uid == study_uid))
            study.state = StudyState.PURGED
            study.instance_count = 0
            return paths

    def result_paths(self, study_uid: str) -> list[str]:
        with self.session() as s:
            return list(s.scalars(select(Dispatch.path).where(Dispatch.study_uid == study_uid).distinct()))

    # ---- reconcile -----------------------------------------------------

    def instance_paths(self) -> dict[str, str]:
        """{path: SOP Instance UID} of every indexed instance."""
        with self.session() as s:
            return dict(s.execute(select(Instance.path, Instance.sop_instance_uid)).all())

    def study_states(self) -> dict[str, str]:
        with self.session() as s:
            return dict(s.execute(select(Study.study_uid, Study.state)).all())

    def job_states(self) -> dict[int, str]:
        with self.session() as s:
            return dict(s.execute(select(Job.id, Job.state)).all())

    def unsent_dispatch_paths(self) -> list[tuple[int, str]]:
        """(id, path) of dispatches that may still be sent: pending, dead-letter, sent but uncommitted."""
        with self.session() as s:
            return list(s.execute(select(Dispatch.id, Dispatch.path)
                                  .where(Dispatch.state.in_((DispatchState.PENDING, DispatchState.DEAD_LETTER,
                                                             DispatchState.SENT_UNCOMMITTED))))
                        .all())

    # ---- model versions ------------------------------------------------

    def lock_model_version(self, name: str, version: str, digest: str) -> ModelVersion | None:
        """Record a model version's digest on first use. Returns the earlier record if the digest differs.
        Nodes starting at once on one store: the first insert wins, the others compare with it."""
        with self._write, self.session() as s, s.begin():
            if self._insert_ignore(s, ModelVersion, name=name, version=version, digest=digest,
                                   first_used_at=time.time()):
                return None
            row = s.get(ModelVersion, (name, version))
            return None if row.digest == digest else row

    # ---- status --------------------------------------------------------

    def status_rows(self, limit: int = 50) -> list[dict]:
        """Studies, newest first, each with its jobs and their dispatch outcome."""
        with self.session() as s:
            studies = list(s.scalars(select(Study).order_by(Study.first_received_at.desc()).limit(limit)))
            out = []
            for st in studies:
                jobs = list(s.scalars(select(Job).where(Job.study_uid == st.study_uid).order_by(Job.id)))
                job_rows = []
                for j in jobs:
                    counts = dict(s.execute(
                        select(Dispatch.state, func.count()).where(Dispatch.job_id == j.id).group_by(Dispatch.state)
                    ).all())
                    dests = sorted(set(s.scalars(select(Dispatch.destination).where(Dispatch.job_id == j.id))))
                    job_rows.append({"job": j, "dispatch_counts": counts, "destinations": dests})
                out.append({"study": st, "jobs": job_rows})
            return out
