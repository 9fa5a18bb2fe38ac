"""ct_lung, declared as needing a model package: lets tests check model locking and provenance."""

from plugins.ct_lung import CtLungPlugin


class LungWithModel(CtLungPlugin):
    model_name = "demo"
    model_version = "1.0.0"
