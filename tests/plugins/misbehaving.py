"""Plugins that misbehave on purpose, loaded by tests through `plugins.<name>.entry`."""

from __future__ import annotations

import ctypes
import time

import numpy as np

from node.plugin_api import Plugin, PluginResult, StudyInput


def leave_scratch(study: StudyInput, options: dict) -> None:
    """Write a file into the job's scratch folder, as a plugin staging its input would, and note the folder
    in `options.record` (a file), so a test can check the node removed it after killing the plugin."""
    (study.scratch_dir / "input.raw").write_bytes(b"\0" * 4096)
    if options.get("record"):
        with open(options["record"], "a") as f:
            f.write(f"{study.scratch_dir}\n")


class HangPlugin(Plugin):
    """Sleeps `options.seconds` (default: an hour), then returns no findings."""

    name, version = "hang", "1"

    def run(self, study: StudyInput) -> PluginResult:
        leave_scratch(study, self.options)
        time.sleep(float(self.options.get("seconds", 3600)))
        return PluginResult(summary="slept")


class HogPlugin(Plugin):
    """Takes memory 64 MB at a time (and touches it, so it is resident) until it is stopped."""

    name, version = "hog", "1"

    def run(self, study: StudyInput) -> PluginResult:
        leave_scratch(study, self.options)
        held = []
        while True:
            held.append(np.ones(8 * 2**20, dtype=np.float64))
            time.sleep(0.01)


class CrashPlugin(Plugin):
    """Crashes the interpreter (a segfault, as a broken native extension would)."""

    name, version = "crash", "1"

    def run(self, study: StudyInput) -> PluginResult:
        leave_scratch(study, self.options)
        ctypes.string_at(0)
        return PluginResult()
