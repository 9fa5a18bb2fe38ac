"""A slow plugin with a result to send: sleeps `options.seconds` (default 3), then reports one measurement,
so the node builds an SR. Lets tests catch a job mid-run (kill -9, takeover) and see its result in the PACS."""

from __future__ import annotations

import time

from node.plugin_api import Code, Finding, Measurement, Plugin, PluginResult, StudyInput

LUNG = Code("39607008", "SCT", "Lung")
VOLUME = Code("118565006", "SCT", "Volume")
MILLILITER = Code("mL", "UCUM", "milliliter")


class SlowSrPlugin(Plugin):
    name, version = "slow_sr", "1"

    def run(self, study: StudyInput) -> PluginResult:
        time.sleep(float(self.options.get("seconds", 3)))
        vol = study.series[0]
        ml = float(vol.pixels.shape[0] * vol.pixels.shape[1] * vol.pixels.shape[2]) / 1000.0
        return PluginResult(findings=[Finding("volume", LUNG, [Measurement(VOLUME, round(ml, 1), MILLILITER)])],
                            summary="slept")
