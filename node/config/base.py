"""The base of every config model, in a module of its own so that section models living beside their
feature (node/ris, node/audit, node/config/tls.py) can build on it without importing schema.py."""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Unknown keys are errors (a typo names its key path instead of being ignored); values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
