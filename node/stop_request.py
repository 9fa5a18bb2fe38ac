"""SIGTERM and SIGINT as a plain flag that `ainode serve`'s main thread polls.

A Python signal handler runs in the main thread between two bytecodes, possibly while that thread holds a
lock. The handler used to call `threading.Event.set()` on the Event the main thread was waiting on; when the
signal landed just as `Event.wait` had taken the Event's own lock back, `set()` waited for that lock forever
and the node ignored SIGTERM (a CI run hung on it). So the handler here only stores the signal number.
"""

from __future__ import annotations

import signal
import time
from types import FrameType


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = signum  # no lock, no I/O: see the module docstring

    def wait(self, poll_s: float = 0.2) -> int:
        """Block until SIGTERM or SIGINT arrives; return its number. `poll_s` bounds how late we notice."""
        while self.signum is None:
            time.sleep(poll_s)
        return self.signum
