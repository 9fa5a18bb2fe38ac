"""Plugins that misbehave on purpose, loaded by tests through `plugins.<name>.entry`."""

from __future__ import annotations

import ctypes
import time

import numpy as np

from node.plugin_api import Plugin, PluginResult, StudyInput


class HangPlugin(Plugin):
    """Sleeps `options.seconds` (default: an hour), then returns no findings."""

    name, version = "hang", "1"

    def run(self, study: StudyInput) -> PluginResult:
        time.sleep(float(self.options.get("seconds", 3600)))
        return PluginResult(summary="slept")


class HogPlugin(Plugin):
    """Takes memory 64 MB at a time (and touches it, so it is resident) until it is stopped."""

    name, version = "hog", "1"

    def run(self, study: StudyInput) -> PluginResult:
        held = []
        while True:
            held.append(np.ones(8 * 2**20, dtype=np.float64))
            time.sleep(0.01)


class CrashPlugin(Plugin):
    """Crashes the interpreter (a segfault, as a broken native extension would)."""

    name, version = "crash", "1"

    def run(self, study: StudyInput) -> PluginResult:
        ctypes.string_at(0)
        return PluginResult()
