"""`run.ray`: where the run stage's Ray backend (node/run/ray_executor.py) finds its cluster.

A section of its own beside the backend, so schema.py only names it. The slot plan (run.workers,
run.gpu) still says how many actors run and which jobs each takes; this says where and how data travels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from node.config.base import Strict


class RaySection(Strict):
    address: str = Field(
        description="The Ray cluster to join: 'host:port' of its head node (GCS port, as `ray start --head "
        "--port` prints), or 'auto' for the cluster started on this machine.")
    namespace: str = Field("ainode", min_length=1, description="Ray namespace of the node's actors.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs each worker actor reserves on the cluster.")
    data: Literal["object_store", "shared_path"] = Field(
        "object_store", description="How series reach the actors and results come back: 'object_store' (the "
        "node ships the files' bytes through Ray's object store; no shared disk needed) or 'shared_path' (the "
        "actors read and write the node's spool directly; storage.root must lie under `shared_path`, mounted "
        "at the same path on every Ray node).")
    shared_path: Path | None = Field(
        None, description="With data: shared_path, the folder every Ray node mounts at the same path.")
    connect_timeout_s: float = Field(60, gt=0, description="How long the node waits for the cluster at start.")

    @model_validator(mode="after")
    def _shared(self) -> "RaySection":
        if self.data == "shared_path" and self.shared_path is None:
            raise ValueError("data: shared_path needs run.ray.shared_path (the folder every Ray node mounts)")
        if self.data == "object_store" and self.shared_path is not None:
            raise ValueError("run.ray.shared_path is only used with data: shared_path; remove it or set data")
        if self.shared_path is not None and not self.shared_path.is_absolute():
            raise ValueError("run.ray.shared_path must be an absolute path (the same on every Ray node)")
        return self
