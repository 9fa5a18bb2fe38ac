"""The base of every config model, in a module of its own so that section models living beside their
feature (node/ris, node/audit, node/config/tls.py) can build on it without importing schema.py."""

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """Unknown keys are errors (a typo names its key path instead of being ignored); values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryPolicy(Strict):
    """How a destination is retried (node/dispatch/dispatcher.py backoff_s): the same keys for a PACS, a
    DICOMweb server, a RIS and a FHIR server."""

    max_attempts: int = Field(5, ge=1)
    backoff_initial_s: float = Field(2.0, gt=0)
    backoff_max_s: float = Field(300.0, gt=0)
