"""A plugin that reports the prior studies the node handed it, in its summary, for tests of `priors:`."""

from __future__ import annotations

from node.plugin_api import Plugin, PluginResult, StudyInput


class PriorProbePlugin(Plugin):
    """Summary: `priors=N` and, per prior series, `<study UID>/<series UID>:<slices>:<StudyDate>`."""

    name, version = "prior_probe", "1"

    def run(self, study: StudyInput) -> PluginResult:
        parts = [f"{v.headers[0].StudyInstanceUID}/{v.series_uid}:{v.pixels.shape[0]}:{v.headers[0].StudyDate}"
                 for v in study.priors]
        return PluginResult(summary=" ".join([f"priors={len(study.priors)}", *parts]))
