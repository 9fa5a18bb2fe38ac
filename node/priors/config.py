"""The `priors:` section of a rule: which PACS to ask for the patient's earlier studies, and how many."""

from __future__ import annotations

from pydantic import Field

from node.config.base import Strict


class PriorsSpec(Strict):
    """Ask `source` (a name under `sources:`) for the patient's `count` newest earlier studies."""

    source: str = Field(description="The PACS to query and retrieve from: a name under `sources:`.")
    count: int = Field(1, ge=1, le=5, description="How many prior studies, newest first.")
    same_modality: bool = Field(True, description="Only studies holding the job's modality, and only their "
                                "series of that modality. false: every image series of the newest studies.")
    max_age_days: int | None = Field(3650, ge=1, description="Older studies are not priors. null: any age.")
    required: bool = Field(False, description="true: a PACS that cannot be asked or fails the retrieve fails "
                           "the job (requeue it once the PACS is back). false: the job runs without priors and "
                           "a warning. A patient with no earlier study is never an error.")
    timeout_s: float = Field(120.0, gt=0, description="Upper bound for finding and fetching one job's priors.")
