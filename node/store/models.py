"""Tables of the store: the single source of truth for recovery after a crash.

Times are UNIX epoch seconds (float) so timing arithmetic needs no conversions.
"""

from __future__ import annotations

from sqlalchemy import JSON, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class StudyState:
    RECEIVING = "receiving"
    COMPLETE = "complete"
    ROUTED = "routed"
    NO_RULE = "no-rule-matched"
    PURGED = "purged"  # results dispatched and the retention time passed: spool files deleted


class CompletionReason:
    """Why a study was declared complete (studies.completion_reason, `ainode status`, the audit record)."""

    COUNTS_MATCHED = "counts-matched"  # the sending PACS's C-FIND counts were all held
    QUIET_PERIOD = "quiet-period"  # no new instance for assemble.quiet_period_s
    FORCED = "forced"  # an operator's request


class JobState:
    QUEUED = "queued"
    RUNNING = "running"
    RESULTS_BUILT = "results-built"
    DISPATCHED = "dispatched"
    DONE_LOCAL = "done-no-destination"
    FAILED = "failed"  # the plugin or the results build failed; `ainode requeue` runs it again
    DEAD_LETTER = "dead-letter"  # results built, but a send gave up; `ainode requeue` sends again


class DispatchState:
    PENDING = "pending"
    SENT = "sent"
    DEAD_LETTER = "dead-letter"  # gave up after the destination's max_attempts
    # C-STOREd to a destination with storage_commitment: the PACS has not yet said it took responsibility
    SENT_UNCOMMITTED = "sent-uncommitted"


class CommitmentState:
    """A Storage Commitment transaction (one N-ACTION) toward a destination."""

    WAITING = "waiting"  # N-ACTION sent (or being sent); no N-EVENT-REPORT yet
    REPORTED = "reported"  # the PACS's N-EVENT-REPORT is recorded; the dispatcher has not applied it yet
    COMMITTED = "committed"  # applied: every instance committed
    FAILED = "failed"  # applied: some instances failed (sent again or dead-letter)
    EXPIRED = "expired"  # no report in time: a new transaction took its instances, or they gave up


PRIORITY = {"stat": 0, "routine": 1}


class Study(Base):
    __tablename__ = "studies"
    study_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(32), default=StudyState.RECEIVING, index=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    revision: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[float] = mapped_column(Float)
    last_received_at: Mapped[float] = mapped_column(Float)
    completed_at: Mapped[float | None] = mapped_column(Float)
    completion_reason: Mapped[str | None] = mapped_column(String(32))
    routed_at: Mapped[float | None] = mapped_column(Float)


class Series(Base):
    __tablename__ = "series"
    series_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_uid"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    description: Mapped[str | None] = mapped_column(String(64))
    slice_thickness: Mapped[float | None] = mapped_column(Float)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)


class Instance(Base):
    __tablename__ = "instances"
    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    series_uid: Mapped[str] = mapped_column(ForeignKey("series.series_uid"), index=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[float] = mapped_column(Float)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_uid"), index=True)
    rule: Mapped[str] = mapped_column(String(64))
    plugin: Mapped[str] = mapped_column(String(64))
    plugin_version: Mapped[str | None] = mapped_column(String(32))
    priority: Mapped[int] = mapped_column(Integer, default=PRIORITY["routine"])
    series_uids: Mapped[list] = mapped_column(JSON)
    destinations: Mapped[list] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(32), default=JobState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    summary: Mapped[str | None] = mapped_column(Text)
    timings: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    owner: Mapped[str | None] = mapped_column(String(64))  # node_instances.id of the process running it

    __table_args__ = (Index("ix_jobs_claim", "state", "priority", "id"),)


class Dispatch(Base):
    __tablename__ = "dispatches"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    study_uid: Mapped[str] = mapped_column(String(64))
    destination: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default=DispatchState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[float | None] = mapped_column(Float)
    # The node instance whose dispatcher leased it (moved next_attempt_at forward to send it): a takeover
    # of a dead instance makes its leased rows due at once instead of waiting for the lease to run out.
    claimed_by: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index("ix_dispatch_due", "state", "next_attempt_at"),)


class Commitment(Base):
    """One Storage Commitment request (PS3.4 Annex J) and the PACS's answer.

    A table of its own (not columns on dispatches): create_all adds new tables to an existing SQLite
    file but never new columns. The SCP records a report here; the dispatcher applies it.
    """

    __tablename__ = "commitments"
    transaction_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    destination: Mapped[str] = mapped_column(String(64))
    dispatch_ids: Mapped[list] = mapped_column(JSON)
    attempt: Mapped[int] = mapped_column(Integer, default=1)  # N-ACTIONs so far for these objects
    requested_at: Mapped[float] = mapped_column(Float)
    next_check_at: Mapped[float] = mapped_column(Float)  # no report by then: request again or give up
    state: Mapped[str] = mapped_column(String(16), default=CommitmentState.WAITING)
    error: Mapped[str | None] = mapped_column(Text)  # why the N-ACTION itself failed
    expired_at: Mapped[float | None] = mapped_column(Float)  # superseded or given up: a late report only commits
    reported_at: Mapped[float | None] = mapped_column(Float)
    reported_by: Mapped[str | None] = mapped_column(String(64))  # calling AE and address of the report
    committed: Mapped[list | None] = mapped_column(JSON)  # SOP Instance UIDs the PACS committed
    failed: Mapped[list | None] = mapped_column(JSON)  # [{"sop_instance_uid", "sop_class_uid", "reason"}] not committed

    __table_args__ = (Index("ix_commitments_state", "state", "next_check_at"),)


class Request(Base):
    """An operator's request (from the CLI) that the running node carries out and audits.

    The node is the audit log's only writer, so the CLI leaves requests here instead of acting itself.
    """

    __tablename__ = "requests"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    action: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[int | None] = mapped_column(Integer)
    study_uid: Mapped[str | None] = mapped_column(String(64))
    requested_by: Mapped[str | None] = mapped_column(String(64))
    requested_at: Mapped[float] = mapped_column(Float)
    handled_at: Mapped[float | None] = mapped_column(Float, index=True)
    outcome: Mapped[dict | None] = mapped_column(JSON)


class ModelVersion(Base):
    """The digest of each model package version when the node first used it: later changes are refused."""

    __tablename__ = "model_versions"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(32), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64))
    first_used_at: Mapped[float] = mapped_column(Float)


class JobOutputStats(Base):
    """Structured outputs of one job (node/monitor/stats.py): what drift and shadow agreement are computed from."""

    __tablename__ = "job_outputs"
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    rule: Mapped[str] = mapped_column(String(64))
    plugin: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(100), index=True)  # "model:version", or "plugin:version"
    scanner: Mapped[str] = mapped_column(String(200))  # Manufacturer / ManufacturerModelName / StationName
    shadow: Mapped[int] = mapped_column(Integer, default=0)  # 1: a shadow rule's job (never dispatched)
    finding_count: Mapped[int] = mapped_column(Integer)
    recorded_at: Mapped[float] = mapped_column(Float)


class FindingStats(Base):
    """One finding of a job: confidence and measurements [{concept, value, unit}]. `number` is 1-based."""

    __tablename__ = "findings"
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    tracking_id: Mapped[str] = mapped_column(String(64))
    finding_type: Mapped[str] = mapped_column(String(64))
    confidence: Mapped[float | None] = mapped_column(Float)
    measurements: Mapped[list] = mapped_column(JSON)


class ShadowAgreement(Base):
    """How a shadow rule's job agreed with the primary rule's job on the same study."""

    __tablename__ = "shadow_agreements"
    shadow_job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    primary_job_id: Mapped[int] = mapped_column(Integer, index=True)
    study_uid: Mapped[str] = mapped_column(String(64))
    shadow_model: Mapped[str] = mapped_column(String(100))
    primary_model: Mapped[str] = mapped_column(String(100))
    counts_equal: Mapped[int] = mapped_column(Integer)
    max_abs_diff: Mapped[float | None] = mapped_column(Float)
    max_rel_diff: Mapped[float | None] = mapped_column(Float)
    details: Mapped[list] = mapped_column(JSON)
    recorded_at: Mapped[float] = mapped_column(Float)


class FindingFeedback(Base):
    """A radiologist's verdict on one finding: accept, reject, or correct (with the corrected value)."""

    __tablename__ = "finding_feedback"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    finding_number: Mapped[int] = mapped_column(Integer)
    verdict: Mapped[str] = mapped_column(String(16))
    value: Mapped[float | None] = mapped_column(Float)
    reviewer: Mapped[str | None] = mapped_column(String(64))
    recorded_at: Mapped[float] = mapped_column(Float)
    audited_at: Mapped[float | None] = mapped_column(Float, index=True)  # the node wrote its audit record


class NodeInstance(Base):
    """One running node process (several may share a PostgreSQL store): who it is, and whether it is alive.

    It heartbeats; another instance takes over its running jobs once the heartbeat is older than
    run.takeover_after_s, or at once when it ran on the same host and its process is gone.
    """

    __tablename__ = "node_instances"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))  # node.ae_title
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float, index=True)
    stopped_at: Mapped[float | None] = mapped_column(Float)  # a clean stop, or declared dead by a peer
    stopped_by: Mapped[str | None] = mapped_column(String(64))  # the instance that declared it dead
