"""IOD validation with dicom3tools' dciodvfy before anything is sent.

dciodvfy runs as its own process, so a job can start validating one object and build the next meanwhile
(`start_dciodvfy`); the job still waits for every verdict before it hands its objects on.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

TIMEOUT_S = 120


def _exe() -> str:
    exe = shutil.which("dciodvfy")
    if exe is None:
        raise RuntimeError("dciodvfy not found: apt-get install dicom3tools")
    return exe


class PendingValidation:
    """dciodvfy running on one file; `errors()` waits for its verdict."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # Output goes to files, not pipes: a long report must not stall dciodvfy until someone reads it.
        self._out = tempfile.TemporaryFile()
        self._err = tempfile.TemporaryFile()
        self._proc = subprocess.Popen([_exe(), str(path)], stdout=self._out, stderr=self._err)

    def errors(self, timeout: float = TIMEOUT_S) -> list[str]:
        """The 'Error' lines dciodvfy reports (empty: valid)."""
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.cancel()
            raise
        try:
            chunks = []
            for f in (self._out, self._err):  # stdout then stderr, as before
                f.seek(0)
                chunks.append(f.read())
        finally:
            self._close()
        text = b"".join(chunks).decode(errors="replace")
        return [line for line in text.splitlines() if line.startswith("Error")]

    def cancel(self) -> None:
        """Stop it (the job failed elsewhere): no dciodvfy outlives its job."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._close()

    def _close(self) -> None:
        self._out.close()
        self._err.close()


def start_dciodvfy(path: Path) -> PendingValidation:
    """Start validating `path` in the background."""
    return PendingValidation(path)


def validate_with_dciodvfy(path: Path) -> list[str]:
    """The 'Error' lines dciodvfy reports for `path` (empty: valid)."""
    return start_dciodvfy(path).errors()
