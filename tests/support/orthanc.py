"""A real Orthanc (Debian package) as the PACS in tests, on free loopback ports.

    with OrthancServer(tmp_path / "orthanc") as o:
        o.upload_files(files)
        o.add_modality("ainode", "AINODE", "127.0.0.1", node_port)
        o.send_study_to_modality("ainode", o.find_study(study_uid))

Each server has its own storage and SQLite index under `workdir`, listens on 127.0.0.1 only
(HTTP and DICOM, ports picked free), and runs in its own process group so that `stop()` leaves
nothing behind. The ports are final once `start()` returns (a port lost to a race between
picking and binding is re-picked).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterable

from orthanc_api_client import OrthancApiClient

from tests.support.net import free_port, wait_for_port

ORTHANC_BIN = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

# Every transfer syntax Orthanc knows (all start with 1.2.840.10008.1.), compressed ones included.
ALL_TRANSFER_SYNTAXES = ["1.2.840.10008.1.*"]


def find_orthanc() -> str:
    binary = shutil.which("Orthanc") or (ORTHANC_BIN if os.access(ORTHANC_BIN, os.X_OK) else None)
    if binary is None:
        raise RuntimeError("Orthanc not found: apt-get install orthanc (.ci/setup installs it)")
    return binary


class OrthancServer:
    def __init__(self, workdir: Path, *, aet: str = "ORTHANC",
                 modalities: dict[str, tuple[str, str, int]] | None = None, dicomweb: bool = False,
                 tcp_nodelay: bool = True, extra_config: dict[str, Any] | None = None) -> None:
        self.binary = find_orthanc()
        if dicomweb and not os.path.exists(DICOMWEB_PLUGIN):
            raise RuntimeError(f"{DICOMWEB_PLUGIN} not found: apt-get install orthanc-dicomweb")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.dicomweb = dicomweb
        self.tcp_nodelay = tcp_nodelay
        self.extra_config = dict(extra_config or {})  # top-level keys added or replaced (DicomTls*, ...)
        # With "AuthenticationEnabled" and "RegisteredUsers" given, the helpers log in as the first user.
        users = self.extra_config.get("RegisteredUsers") if self.extra_config.get("AuthenticationEnabled") else None
        self.credentials: tuple[str, str] | None = next(iter(users.items())) if users else None
        self.log_path = self.workdir / "orthanc.log"
        self.config_path = self.workdir / "orthanc.json"
        self.proc: subprocess.Popen | None = None
        self._log = None
        self._pick_ports()

    # ---- lifecycle -----------------------------------------------------

    def _pick_ports(self) -> None:
        self.dicom_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.client = OrthancApiClient(self.http_url, *(self.credentials or ()))
        self.config = self._config()
        self.config_path.write_text(json.dumps(self.config, indent=2))

    def _config(self) -> dict[str, Any]:
        storage = self.workdir / "storage"
        return {
            "Name": "ainode-test-pacs",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "SyncStorageArea": True,  # Orthanc >= 1.7.4 default: fsync each stored file
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "DicomServerEnabled": True,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,  # binds HTTP for loopback clients only
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,  # any calling AET may C-STORE (the node's results)
            "DicomModalities": {name: list(v) for name, v in self.modalities.items()},
            "DicomModalitiesInDatabase": False,
            "DicomScpTimeout": 30,
            # Orthanc as SCU closes the association right after a store job instead of keeping
            # it open 5 s for reuse, so the receiver sees the study end promptly.
            "DicomAssociationCloseDelay": 0,
            "AcceptedTransferSyntaxes": ALL_TRANSFER_SYNTAXES,
            "DeflatedTransferSyntaxAccepted": True,
            "JpegTransferSyntaxAccepted": True,
            "Jpeg2000TransferSyntaxAccepted": True,
            "JpegLosslessTransferSyntaxAccepted": True,
            "JpipTransferSyntaxAccepted": True,
            "Mpeg2TransferSyntaxAccepted": True,
            "RleTransferSyntaxAccepted": True,
            "Mpeg4TransferSyntaxAccepted": True,
            "H265TransferSyntaxAccepted": True,
            # SEG, Comprehensive/Enhanced SR etc. are standard storage SOP classes: accepted as is.
            "UnknownSopClassAccepted": False,
            "StableAge": 1,
            "OverwriteInstances": True,  # a re-sent result with the same SOP Instance UID replaces the old one
            "ConcurrentJobs": 2,
            "SaveJobs": False,
            "LoadPrivateDictionary": False,
            "Plugins": [DICOMWEB_PLUGIN] if self.dicomweb else [],
            **({"DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True}} if self.dicomweb else {}),
            **self.extra_config,
        }

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.tcp_nodelay:
            # Debian's Orthanc links the system DCMTK, which since 3.6.2 leaves Nagle's algorithm on
            # unless TCP_NODELAY=1 is set; every C-STORE then waits ~40 ms for a delayed ACK on
            # loopback. Upstream Orthanc builds disable Nagle at compile time; this does the same.
            env["TCP_NODELAY"] = "1"
        else:
            env.pop("TCP_NODELAY", None)
        return env

    def _http_alive(self) -> bool:
        # Plain urllib: the api client retries refused connections with back-off, too slow to poll with.
        request = urllib.request.Request(f"{self.http_url}/system")
        if self.credentials:
            token = base64.b64encode(":".join(self.credentials).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def start(self, timeout: float = 60, attempts: int = 3) -> "OrthancServer":
        for attempt in range(attempts):
            if attempt:
                self._pick_ports()  # most likely a port was taken between picking and binding
            self._log = open(self.log_path, "ab")
            self.proc = subprocess.Popen([self.binary, str(self.config_path)], stdout=self._log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, cwd=self.workdir, env=self._env())
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if self._http_alive() and wait_for_port("127.0.0.1", self.dicom_port, 1):
                    return self
                time.sleep(0.1)
            else:
                self.stop()
                raise RuntimeError(f"Orthanc did not answer on {self.http_url} within {timeout}s; "
                                   f"log: {self.log_path}:\n{self._log_tail()}")
            self.stop()
            if "already in use" not in self._log_tail(1000):
                break  # not a port race: retrying will not help
        raise RuntimeError(f"Orthanc exited with {self.proc.returncode} at start; "
                           f"log: {self.log_path}:\n{self._log_tail()}")

    def _log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM to the process group, wait; SIGKILL if it does not exit in `timeout` s."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)
                except ProcessLookupError:
                    pass
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "OrthancServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- helpers -------------------------------------------------------

    def upload_files(self, paths: Iterable[Path | str]) -> list[str]:
        """POST /instances for each file; the Orthanc instance ids."""
        ids: list[str] = []
        for p in paths:
            ids.extend(self.client.upload_file(str(p)))
        return ids

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """PUT /modalities/{name}: register a DICOM peer (the node) at runtime."""
        self.client.modalities.configure(name, {"AET": aet, "Host": host, "Port": port})

    def send_study_to_modality(self, modality_name: str, resources: str | list[str], synchronous: bool = True,
                               timeout: float = 300) -> str | None:
        """C-STORE a study (or any resource id, or a list of them, over one association) to a registered
        modality.

        Synchronous: returns when every instance was acknowledged (raises on failure), None.
        Otherwise: the id of the Orthanc job (GET /jobs/{id} for its State)."""
        if synchronous:
            self.client.modalities.send(modality_name, resources, timeout=timeout)
            return None
        r = self.client.post(f"modalities/{modality_name}/store",
                             json={"Resources": [resources] if isinstance(resources, str) else resources,
                                   "Synchronous": False, "Timeout": int(timeout + 0.5)})
        return r.json()["ID"]

    def job_state(self, job_id: str) -> str:
        return self.client.get_json(f"jobs/{job_id}")["State"]

    def find_study(self, study_instance_uid: str) -> str | None:
        """The Orthanc study id for a Study Instance UID (POST /tools/lookup), or None."""
        return self.client.studies.lookup(study_instance_uid)

    def series_of_study(self, orthanc_study_id: str) -> list[dict]:
        """GET /studies/{id}/series: dicts with ID and MainDicomTags (Modality, SeriesInstanceUID, ...)."""
        return self.client.get_json(f"studies/{orthanc_study_id}/series")

    def instances_of_series(self, orthanc_series_id: str) -> list[dict]:
        """GET /series/{id}/instances: dicts with ID and MainDicomTags (SOPInstanceUID, ...)."""
        return self.client.get_json(f"series/{orthanc_series_id}/instances")

    def get_instance_file(self, orthanc_instance_id: str) -> bytes:
        """The stored DICOM file, byte for byte (GET /instances/{id}/file)."""
        return self.client.instances.get_file(orthanc_instance_id)

    def statistics(self) -> dict:
        return self.client.get_json("statistics")

    def delete_all(self) -> None:
        self.client.delete_all_content()

    def wait_for_series(self, study_instance_uid: str, modality: str, count: int = 1,
                        timeout: float = 60, poll: float = 0.25) -> list[dict]:
        """Wait until the study holds at least `count` series of `modality` (e.g. "SEG", "SR")."""
        deadline = time.monotonic() + timeout
        found: list[dict] = []
        while True:
            study = self.find_study(study_instance_uid)
            if study is not None:
                found = [s for s in self.series_of_study(study)
                         if s["MainDicomTags"].get("Modality") == modality]
                if len(found) >= count:
                    return found
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{len(found)} of {count} {modality} series in study {study_instance_uid} "
                                   f"after {timeout}s")
            time.sleep(poll)
