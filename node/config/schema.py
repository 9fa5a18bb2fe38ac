"""The node's one configuration file, as a pydantic schema.

Every model forbids unknown keys, so a typo is an error with its key path
instead of a silently ignored setting.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

AE_TITLE = r"^[\x20-\x5b\x5d-\x7e]{1,16}$"  # ASCII, no backslash, max 16


BUNDLED_MODELS = Path(__file__).resolve().parents[2] / "models"


from node.audit.atna_config import AtnaSection  # noqa: E402
from node.config.base import RetryPolicy, Strict  # noqa: E402
from node.cpus import usable_cpus  # noqa: E402
from node.config.tls import TlsSettings  # noqa: E402
from node.deid.config import DeidSettings  # noqa: E402
from node.config.dicomweb import DicomWebDestination  # noqa: E402
from node.monitor.config import MonitoringSection  # noqa: E402
from node.priors.config import PriorsSpec  # noqa: E402
from node.ris.config import FhirDestination, RisDestination  # noqa: E402
from node.report.config import DepartmentsSection  # noqa: E402
from node.api.config import ApiSection  # noqa: E402
from node.run.ray_config import RaySection  # noqa: E402


def _ae_title(value: str) -> str:
    stripped = value.strip()
    if not stripped or not re.match(AE_TITLE, value) or len(value) > 16:
        raise ValueError(f"'{value}' is not a valid AE title (1-16 ASCII characters, no backslash)")
    return stripped


AUTO_RECEIVE_PROCESSES_MAX = 4  # the node process writes every row and audit record: more add little


class NodeSection(Strict):
    ae_title: str = "AINODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    allowed_calling_aes: list[str] = Field(
        default_factory=list, description="Empty: any calling AE title is accepted."
    )
    allowed_ips: list[str] = Field(
        default_factory=list, description="Addresses or CIDR networks. Empty: any address."
    )
    max_associations: int = Field(10, ge=1, le=200)
    receive_processes: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        "auto", description="Processes taking associations on node.port, in turns (the one with the fewest open "
        "takes the next). More than 1 spreads parallel associations over the cores; the node process still "
        "writes every store row and audit record. auto: one per usable CPU, at most "
        f"{AUTO_RECEIVE_PROCESSES_MAX} (1 with deid). Not above 1 with deid (returned results are handled in "
        "the node process only).")
    max_dataset_mb: float = Field(2048, gt=0, description="A larger data set is refused (0xA700), not stored.")
    receive_to_disk_mb: float = Field(
        16, gt=0, description="A data set larger than this is received straight into its file on the spool disk "
        "instead of memory (multi-frame images: tomosynthesis, whole-slide); smaller ones are gathered in memory "
        "and written at once, the fastest way for single slices.")
    network_timeout_s: float = Field(60, gt=0)
    tls: TlsSettings | None = Field(None, description="DICOM TLS on node.port (then TLS only). Default: plain TCP.")

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, value: str) -> str:
        return _ae_title(value)

    @field_validator("allowed_calling_aes")
    @classmethod
    def _check_aes(cls, values: list[str]) -> list[str]:
        return [_ae_title(v) for v in values]

    @field_validator("allowed_ips")
    @classmethod
    def _check_ips(cls, values: list[str]) -> list[str]:
        for v in values:
            try:
                ipaddress.ip_network(v, strict=False)
            except ValueError as exc:
                raise ValueError(f"'{v}' is not an IP address or CIDR network") from exc
        return values


class StorageSection(Strict):
    root: Path = Path("var")
    spool_dir: Path | None = None
    results_dir: Path | None = None
    database: str | None = Field(
        None, description="SQLAlchemy URL or a path to a SQLite file. Default: <root>/ainode.db"
    )
    audit_log: Path | None = None
    models_dir: Path | None = Field(None, description="Model packages. Default: the models/ folder shipped "
                                    "with the node.")
    min_free_mb: int = Field(
        1024, ge=0, description="Below this much free space on the spool's disk, C-STORE answers 0xA700."
    )
    retention_hours: float = Field(
        168, ge=0, description="Spool files of a study are deleted this long after all its results were "
        "dispatched. Studies with a failed or dead-letter job are kept until requeued."
    )
    purge_interval_s: float = Field(600, gt=0, description="How often the retention purge runs.")

    def resolved(self, base: Path) -> "ResolvedStorage":
        root = self.root if self.root.is_absolute() else base / self.root

        def under(p: Path | None, default: str) -> Path:
            if p is None:
                return root / default
            return p if p.is_absolute() else base / p

        db = self.database
        if db is None:
            db_url = f"sqlite:///{root / 'ainode.db'}"
        elif "://" in db:
            db_url = db
        else:
            p = Path(db)
            db_url = f"sqlite:///{p if p.is_absolute() else base / p}"
        return ResolvedStorage(
            spool_dir=under(self.spool_dir, "spool"),
            results_dir=under(self.results_dir, "results"),
            database_url=db_url,
            audit_log=under(self.audit_log, "audit.jsonl"),
            models_dir=(BUNDLED_MODELS if self.models_dir is None
                        else self.models_dir if self.models_dir.is_absolute() else base / self.models_dir),
        )


class ResolvedStorage(Strict):
    spool_dir: Path
    results_dir: Path
    database_url: str
    audit_log: Path
    models_dir: Path


class AssembleSection(Strict):
    quiet_period_s: float = Field(
        10.0, gt=0, description="Seconds without a new instance before a study is complete: the fallback when "
        "the sender cannot be asked, and the upper bound when it can.")
    poll_interval_s: float = Field(
        0.25, gt=0, description="How often receiving studies are checked (one indexed query each time).")
    evidence_check_s: float = Field(
        0.4, gt=0, description="Seconds without a new instance before the sending PACS (a `sources` entry with "
        "query: true) is asked how many instances the study has. Instances of one send arrive milliseconds "
        "apart, so a gap this long means the send has most likely ended; a busy receive never queries. A sender "
        "that releases its association after the study is asked at once, without this wait.")
    evidence_min_interval_s: float = Field(
        5.0, gt=0, description="A study's PACS is asked again no sooner than this (unless the node has since "
        "received as many instances as the last answer said), so a study arriving in bursts cannot hammer it.")


class GpuSection(Strict):
    devices: Literal["auto"] | list[int] = Field(
        "auto", description="GPU indexes to use; 'auto': every GPU nvidia-smi lists; []: none (CPU only).")
    slots_per_gpu: Annotated[int, Field(ge=1, le=16)] | Literal["auto"] = Field(
        "auto", description="Worker processes per GPU, each with the GPU memory of the jobs it runs reserved "
        "from the GPU's budget. Each slot's series read and results build run on the CPU while another slot's "
        "model runs on the GPU. auto: one per 4 usable CPUs per GPU, at most 4, and no more than the GPU's "
        "budget and 70% of the host's memory hold with every slot running its largest plugin (at least 1; 1 with "
        "run.executor ray; `ainode check-config` says which limit decided).")
    memory_mb: int | None = Field(
        None, ge=256, description="GPU memory budget per GPU. Default: the GPU's total (nvidia-smi) less "
        "reserve_mb. Required with a devices list when nvidia-smi is not installed.")
    reserve_mb: int = Field(512, ge=0, description="Kept free on each GPU for the display, drivers, "
                            "other processes.")


class RunSection(Strict):
    workers: int = Field(1, ge=1, le=64, description="CPU worker processes. They run the plugins that need "
                         "no GPU, and every plugin when there is no GPU.")
    gpu: GpuSection = Field(default_factory=GpuSection)
    max_attempts: int = Field(3, ge=1, description="Runs of one job (a crash mid-run counts) before it fails.")
    timeout_s: float = Field(1800, gt=0, description="A job running longer is stopped and failed.")
    routine_max_wait_s: float = Field(
        900, gt=0, description="A routine job queued this long goes ahead as if it were stat (no starvation).")
    takeover_after_s: float = Field(
        30, gt=0, description="Several nodes on one PostgreSQL store: a node whose heartbeat is older than this "
        "is dead, and another takes over its running jobs (on the same host, a node whose process is gone at once).")
    shutdown_grace_s: float = Field(
        30, ge=0, description="On SIGTERM, how long running jobs may finish; then they are queued again.")
    memory_limit_mb: int | None = Field(
        None, ge=64, description="A job's worker process using more memory is stopped and the job failed. "
        "Default: 70% of physical memory shared among the workers. It counts the worker process, not its SR "
        "process (run.sr_process) or the processes that decode a compressed series for it."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gpu_decode: Literal["auto"] | bool = Field(
        "auto", description="A worker whose plugin runs on a GPU decodes JPEG 2000, HTJ2K and JPEG slices on that "
        "GPU (NVIDIA nvImageCodec's pydicom plugin: pip install 'nvidia-nvimgcodec-cu12[all]'), not in one process "
        "per CPU. auto: wherever nvImageCodec is installed. true: the same, and a warning where it cannot be "
        "used. false: always the CPU decoders. The worker's log says which it uses, and why not the GPU.")
    sr_process: bool | None = Field(
        None, description="Each worker process keeps a second process (about 100 MB) that builds a job's SR while "
        "the worker builds its SEG, so the two overlap on two cores. Default: on with 2 or more CPU cores.")
    read_ahead_mb: int = Field(
        512, ge=0, description="An idle worker process reads the files of an arriving study that a rule could take, "
        "up to this much (and a quarter of run.memory_limit_mb at most), so that the job finds its series read "
        "when the study completes. 0: off.")
    prefault_mb: int = Field(
        1024, ge=0, description="Each local worker process touches this much memory once when it starts, before it "
        "takes a job, and keeps it (half of run.memory_limit_mb at most), so that its first job does not wait for "
        "fresh memory: a new worker's first ct_lung job on a 300-slice CT took about 2 s longer without it. The "
        "worker's resident size starts at about this much. 0: off.")
    executor: Literal["local", "ray"] = Field(
        "local", description="Where jobs run: 'local' (worker processes of this node) or 'ray' (actors on the "
        "Ray cluster of run.ray; pip install '.[ray]').")
    ray: RaySection | None = Field(None, description="The Ray cluster, with executor: ray.")

    def use_sr_process(self) -> bool:
        """Unset: a second process only with a second CPU this node may use (a container's or taskset's
        limit, not the host's count: on one allowed CPU the two would only take turns)."""
        return self.sr_process if self.sr_process is not None else usable_cpus() >= 2

    @model_validator(mode="after")
    def _executor(self) -> "RunSection":
        if self.executor == "ray" and self.ray is None:
            raise ValueError("run.executor is ray: add run.ray with at least `address` (the Ray head, host:port)")
        if self.executor == "local" and self.ray is not None:
            raise ValueError("run.ray is set but run.executor is local: set run.executor: ray or remove run.ray")
        return self


class Destination(RetryPolicy):
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str | None = Field(None, description="Our AE title toward this PACS. Default: node.ae_title")
    timeout_s: float = Field(30.0, gt=0)
    tls: TlsSettings | None = Field(None, description="C-STORE to this PACS over DICOM TLS. Default: plain TCP.")
    accepts: list[Literal["SEG", "SR", "GSPS", "SC"]] = Field(
        default_factory=lambda: ["SEG", "SR"], min_length=1,
        description="What this PACS and its viewers take. Without SEG, list GSPS (an overlay of the outlines on "
        "the CT) and/or SC (key images with the outlines burned in, marked 'AI RESULT - NOT FOR DIAGNOSIS').")
    max_key_images: int = Field(1, ge=1, le=20, description="SC key images per finding (its largest cross-sections).")
    external: bool = Field(
        False, description="Outside the hospital (e.g. a cloud second-read service): a rule with `plugin: forward` "
        "sends it de-identified copies (the deid: section), never the originals.")
    return_ae_titles: list[str] = Field(
        default_factory=list, description="External only: calling AE titles the service sends its results back "
        "from; those are re-identified and sent to `return_to`, not processed as new studies.")
    return_to: list[str] = Field(default_factory=list, description="Destinations that get the re-identified results.")
    storage_commitment: bool = Field(
        False, description="Ask this PACS (N-ACTION) to commit what was sent; a job is dispatched only once it "
        "reports the objects committed. The PACS must know the node's AE title as a modality to report back.")
    commitment_timeout_s: float = Field(
        600.0, gt=0, description="No commitment report after this long: ask again (a new transaction), "
        "up to max_attempts, then dead-letter.")

    @field_validator("ae_title", "calling_ae_title")
    @classmethod
    def _check_ae(cls, value: str | None) -> str | None:
        return None if value is None else _ae_title(value)

    @field_validator("return_ae_titles")
    @classmethod
    def _check_aes(cls, values: list[str]) -> list[str]:
        return [_ae_title(v) for v in values]


class Source(Strict):
    """A PACS that sends studies to the node and may be asked (C-FIND) how many instances they have."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str | None = Field(None, description="Our AE title toward this PACS. Default: node.ae_title")
    query: bool = Field(True, description="Ask it for instance counts to complete studies early.")
    match_calling_ae: list[str] = Field(
        default_factory=list, description="Calling AE titles whose studies this PACS holds. Default: [ae_title]")
    timeout_s: float = Field(5.0, gt=0, description="Connect, association and C-FIND response timeout.")

    @field_validator("ae_title", "calling_ae_title")
    @classmethod
    def _check_ae(cls, value: str | None) -> str | None:
        return None if value is None else _ae_title(value)

    @field_validator("match_calling_ae", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @field_validator("match_calling_ae")
    @classmethod
    def _check_aes(cls, values: list[str]) -> list[str]:
        return [_ae_title(v) for v in values]

    def senders(self) -> set[str]:
        """Upper-case calling AE titles whose studies are checked against this PACS."""
        return {a.upper() for a in (self.match_calling_ae or [self.ae_title])}


def _one_source_per_sender(sources: dict[str, Source]) -> dict[str, Source]:
    owner: dict[str, str] = {}
    for name, src in sources.items():
        for ae in src.senders() if src.query else ():
            if ae in owner:
                raise ValueError(f"calling AE '{ae}' is matched by both sources '{owner[ae]}' and '{name}'; "
                                 "give each sender to one source (match_calling_ae)")
            owner[ae] = name
    return sources


Sources = Annotated[dict[str, Source], AfterValidator(_one_source_per_sender)]


class PluginSection(Strict):
    enabled: bool = True
    options: dict = Field(default_factory=dict)
    model_version: str | None = Field(
        None, description="Pin the plugin's model package version (models/<model>/<version>/). "
        "Default: the version the plugin declares.")
    gpu_memory_mb: int | None = Field(
        None, ge=0, description="GPU memory a job of this plugin needs. Default: the plugin's own estimate "
        "(Resources.gpu_memory_mb). A job waits until its GPU has this much of its budget free.")
    entry: str | None = Field(
        None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="'package.module:Class' of a plugin not installed as a package (one under development). "
        "Default: the installed 'ainode.plugins' entry point of this name.")


class SeriesMatch(Strict):
    modality: list[str] = Field(default_factory=list, description="Any of these (empty: any)")
    body_part: list[str] = Field(default_factory=list, description="BodyPartExamined, any of these, case-insensitive")
    series_description: str | None = Field(None, description="Regular expression, searched case-insensitively")
    slice_thickness: tuple[float, float] | None = Field(None, description="[min, max] in mm, inclusive")
    min_instances: int = Field(1, ge=1)

    @field_validator("modality", "body_part", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @field_validator("series_description")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {v!r}: {exc}") from exc
        return v

    @field_validator("slice_thickness")
    @classmethod
    def _range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and v[0] > v[1]:
            raise ValueError(f"range [{v[0]}, {v[1]}] has min > max")
        return v


class StudyMatch(Strict):
    calling_ae: list[str] = Field(default_factory=list, description="Sender AE titles (empty: any)")
    study_description: str | None = None

    @field_validator("calling_ae", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v


class Rule(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    study: StudyMatch = Field(default_factory=StudyMatch)
    series: SeriesMatch = Field(default_factory=SeriesMatch)
    requires: list[SeriesMatch] = Field(
        default_factory=list, description="Series the study must also hold (any series, each entry its own), "
        "e.g. a thin-slice lung-kernel series; without one the rule does not fire and says which is missing.")
    plugin: str
    priority: Literal["stat", "routine"] = "routine"
    destinations: list[str] = Field(default_factory=list)
    priors: PriorsSpec | None = Field(None, description="Also hand the plugin the patient's prior studies, "
                                      "fetched (C-GET) from a PACS under `sources`.")
    shadow_of: str | None = Field(None, description="Shadow mode: the name of the primary rule this rule runs "
                                  "beside. Its jobs build results but dispatch nothing; their agreement with the "
                                  "primary rule's job on the same study is recorded (`ainode monitor`).")


FORWARD = "forward"  # the built-in rule action (`plugin: forward`): no plugin, run by node/run/forward.py


class NodeConfig(Strict):
    node: NodeSection = Field(default_factory=NodeSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    assemble: AssembleSection = Field(default_factory=AssembleSection)
    run: RunSection = Field(default_factory=RunSection)
    destinations: dict[str, Destination] = Field(default_factory=dict)
    sources: Sources = Field(default_factory=dict, description="Sending PACS the node may query (C-FIND).")
    dicomweb: dict[str, DicomWebDestination] = Field(
        default_factory=dict, description="PACS reached by DICOMweb STOW-RS instead of C-STORE; rules name them in "
        "`destinations` like a PACS.")
    ris: dict[str, RisDestination] = Field(
        default_factory=dict, description="RIS receiving an HL7 ORU^R01 per finished job (MLLP); rules name them "
        "in `destinations` like a PACS.")
    fhir: dict[str, FhirDestination] = Field(
        default_factory=dict, description="FHIR R4 servers receiving a DiagnosticReport Bundle per finished job.")
    deid: DeidSettings | None = Field(None, description="De-identification for external destinations: keyed "
                                      "pseudonyms, PS3.15 Basic Profile with the options set here.")
    atna: AtnaSection | None = Field(None, description="Audit records also sent as DICOM PS3.15 A.5 messages "
                                     "to this syslog receiver (IHE ATNA).")
    monitoring: MonitoringSection = Field(default_factory=MonitoringSection,
                                          description="Model output drift per model version and scanner.")
    departments: DepartmentsSection = Field(default_factory=DepartmentsSection, description="Department of each "
                                            "study for `ainode report usage` (calling AE / InstitutionalDepartmentName).")
    api: ApiSection | None = Field(None, description="HTTP API, IT page and /metrics (node/api). Default: off.")
    plugins: dict[str, PluginSection] = Field(default_factory=lambda: {"ct_lung": PluginSection()})
    rules: list[Rule] = Field(
        default_factory=lambda: [
            Rule(
                name="chest-ct-lung-volumes",
                series=SeriesMatch(modality=["CT"], body_part=["CHEST", "LUNG", "THORAX"], min_instances=20),
                plugin="ct_lung",
            )
        ]
    )

    def receive_process_count(self) -> int:
        """node.receive_processes, with auto resolved for this machine (and this config's deid)."""
        if self.node.receive_processes != "auto":
            return self.node.receive_processes
        return 1 if self.deid is not None else min(usable_cpus(), AUTO_RECEIVE_PROCESSES_MAX)

    @model_validator(mode="after")
    def _receive_processes_without_deid(self) -> "NodeConfig":
        if self.node.receive_processes != "auto" and self.node.receive_processes > 1 and self.deid is not None:
            raise ValueError("node.receive_processes > 1 cannot be combined with deid yet (results returned by "
                             "an external service are handled in the node process): set node.receive_processes: 1")
        return self

    @field_validator("rules")
    @classmethod
    def _shadow_targets(cls, rules: list[Rule]) -> list[Rule]:
        by_name = {r.name: r for r in rules}
        for r in rules:
            if r.shadow_of is None:
                continue
            primary = by_name.get(r.shadow_of)
            if primary is None or primary.shadow_of is not None or primary is r:
                raise ValueError(f"rule {r.name!r}: shadow_of {r.shadow_of!r} must name another, non-shadow rule "
                                 f"(rules: {', '.join(by_name)})")
            if r.destinations:
                raise ValueError(f"rule {r.name!r} is a shadow rule (shadow_of) and dispatches nothing: remove "
                                 f"its destinations")
        return rules

    def rule_plugins(self) -> list[str]:
        """The plugins the rules run (not the built-in forward action), sorted: what the node preloads,
        verifies the models of, and plans worker slots for."""
        return sorted({r.plugin for r in self.rules} - {FORWARD})
