"""A real Orthanc (Debian package) as the PACS in tests, on free loopback ports."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterable

from orthanc_api_client import OrthancApiClient

from tests.support.net import free_port

ORTHANC_BIN = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class OrthancServer:
    def __init__(self, workdir: Path, *, aet: str = "ORTHANC",
                 modalities: dict[str, tuple[str, str, int]] | None = None, dicomweb: bool = False) -> None:
        binary = shutil.which("Orthanc") or (ORTHANC_BIN if os.path.exists(ORTHANC_BIN) else None)
        if binary is None:
            raise RuntimeError("Orthanc not found: apt-get install orthanc (.ci/setup installs it)")
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.log_path = self.workdir / "orthanc.log"
        self.config_path = self.workdir / "orthanc.json"
        config = {
            "Name": "ainode-test-pacs",
            "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"),
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
            "DicomModalitiesInDatabase": False,
            "StableAge": 1,
            "OverwriteInstances": True,  # a re-sent result with the same UID replaces the old one
            "ConcurrentJobs": 2,
            "DicomScpTimeout": 30,
            "LoadPrivateDictionary": False,
            "Plugins": [DICOMWEB_PLUGIN] if dicomweb else [],
        }
        self.config_path.write_text(json.dumps(config, indent=2))
        self.proc: subprocess.Popen | None = None
        self.client = OrthancApiClient(self.http_url)

    def start(self, timeout: float = 60) -> "OrthancServer":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([self.binary, str(self.config_path)], stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; log: {self.log_path}:\n"
                                   f"{self.log_path.read_text()[-3000:]}")
            if self.client.is_alive(timeout=1):
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on {self.http_url} within {timeout}s; log: {self.log_path}")

    def stop(self, timeout: float = 20) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        self._log.close()

    def __enter__(self) -> "OrthancServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- helpers -------------------------------------------------------

    def upload_files(self, paths: Iterable[Path | str]) -> list[str]:
        ids: list[str] = []
        for p in paths:
            ids.extend(self.client.upload_file(str(p)))
        return ids

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        self.client.modalities.configure(name, {"AET": aet, "Host": host, "Port": port})

    def send_study_to_modality(self, modality: str, orthanc_study_id: str, timeout: float = 300) -> None:
        self.client.modalities.send(modality, orthanc_study_id, timeout=timeout)

    def find_study(self, study_instance_uid: str) -> str | None:
        return self.client.studies.lookup(study_instance_uid)

    def series_of_study(self, orthanc_study_id: str) -> list[dict]:
        return self.client.get_json(f"studies/{orthanc_study_id}/series")

    def instances_of_series(self, orthanc_series_id: str) -> list[dict]:
        return self.client.get_json(f"series/{orthanc_series_id}/instances")

    def get_instance_file(self, orthanc_instance_id: str) -> bytes:
        return self.client.instances.get_file(orthanc_instance_id)
