"""docker/: Docker does not run on the development and CI machines, so this checks what can be checked here:
the compose file parses and refers to files that exist, every path the Dockerfile copies exists, its entry
point is the installed `ainode` command, and the config baked into the image is valid."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (DOCKER / "Dockerfile").read_text())
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^([A-Za-z]+)\s+(.*)$", text, re.M)]


def test_compose_file_parses_and_its_paths_exist():
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"node", "orthanc"}
    node = compose["services"]["node"]
    context = (DOCKER / node["build"]["context"]).resolve()
    assert context == ROOT and (context / node["build"]["dockerfile"]).is_file()
    for volume in node["volumes"]:
        source = volume.split(":")[0]
        assert source in compose["volumes"] or (DOCKER / source).exists(), volume
    modalities = yaml.safe_load(compose["services"]["orthanc"]["environment"]["ORTHANC__DICOM_MODALITIES"])
    assert modalities["ainode"] == {"AET": "AINODE", "Host": "node", "Port": 11112, "AllowStorageCommitment": True}
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        r = subprocess.run(["docker", "compose", "-f", str(DOCKER / "docker-compose.yml"), "config", "-q"],
                           capture_output=True, text=True, env={**os.environ, "AINODE_API_TOKEN": "x"})
        assert r.returncode == 0, r.stderr


def test_dockerfile_copies_existing_paths_and_runs_the_installed_command():
    steps = _dockerfile()
    for instruction, args in steps:
        if instruction == "COPY":
            *sources, _dest = args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"Dockerfile COPY {source}: no such path in the repository"
    (entry,) = [yaml.safe_load(a) for i, a in steps if i == "ENTRYPOINT"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry[:2] == ["ainode", "serve"] and "ainode" in scripts
    config = entry[entry.index("--config") + 1]
    assert f"COPY docker/node.yaml {config}" in [f"{i} {a}" for i, a in steps]
    assert any(i == "USER" and a != "root" for i, a in steps)
    assert any(i == "HEALTHCHECK" for i, a in steps)


def test_the_config_in_the_image_is_valid_and_admits_the_health_check():
    cfg = yaml.safe_load((DOCKER / "node.yaml").read_text())
    assert "HEALTHCHECK" in cfg["node"]["allowed_calling_aes"]
    health = next(a for i, a in _dockerfile() if i == "HEALTHCHECK")
    assert f"-aec {cfg['node']['ae_title']} 127.0.0.1 {cfg['node']['port']}" in health
    r = subprocess.run([sys.executable, "-m", "node.cli", "check-config", str(DOCKER / "node.yaml")],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "AINODE_API_TOKEN": "x"})
    assert r.returncode == 0, r.stderr
