"""IOD validation with dicom3tools' dciodvfy before anything is sent."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def validate_with_dciodvfy(path: Path) -> list[str]:
    """The 'Error' lines dciodvfy reports for `path` (empty: valid)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        raise RuntimeError("dciodvfy not found: apt-get install dicom3tools")
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
