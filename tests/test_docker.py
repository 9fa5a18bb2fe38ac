"""docker/: Docker does not run on the development and CI machines, so this checks what can be checked here:
the compose file parses and refers to files that exist, every path the Dockerfile copies exists, its entry
point ends in the installed `ainode serve`, and the configs baked into the image are valid."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (DOCKER / "Dockerfile").read_text())
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^([A-Za-z]+)\s+(.*)$", text, re.M)]


def test_compose_file_parses_and_its_paths_exist():
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"node", "orthanc", "postgres", "ray-head", "ray-worker"}
    assert [n for n, s in services.items() if "ray" in s.get("profiles", [])] == ["ray-head", "ray-worker"]
    node = services["node"]
    context = (DOCKER / node["build"]["context"]).resolve()
    assert context == ROOT and (context / node["build"]["dockerfile"]).is_file()
    for volume in node["volumes"]:
        source = volume.split(":")[0]
        assert source in compose["volumes"] or (DOCKER / source).exists(), volume
    for volume in services["postgres"]["volumes"]:
        assert volume.split(":")[0] in compose["volumes"], volume
    assert node["depends_on"]["postgres"] == {"condition": "service_healthy"} and "healthcheck" in services["postgres"]
    for ray in ("ray-head", "ray-worker"):  # the node's image, so Ray and Python match the node's
        assert services[ray]["image"] == node["image"] and services[ray]["entrypoint"][:2] == ["ray", "start"]
    modalities = yaml.safe_load(services["orthanc"]["environment"]["ORTHANC__DICOM_MODALITIES"])
    assert modalities["ainode"] == {"AET": "AINODE", "Host": "node", "Port": 11112, "AllowStorageCommitment": True}
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        r = subprocess.run(["docker", "compose", "-f", str(DOCKER / "docker-compose.yml"), "--profile", "ray",
                            "config", "-q"], capture_output=True, text=True,
                           env={**os.environ, "AINODE_API_TOKEN": "x", "AINODE_DB_PASSWORD": "x"})
        assert r.returncode == 0, r.stderr


def test_dockerfile_copies_existing_paths_and_runs_the_installed_command():
    steps = _dockerfile()
    copied = {}
    for instruction, args in steps:
        if instruction == "COPY":
            *sources, dest = args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"Dockerfile COPY {source}: no such path in the repository"
                copied[source] = dest
    (entry,) = [yaml.safe_load(a) for i, a in steps if i == "ENTRYPOINT"]
    (cmd,) = [yaml.safe_load(a) for i, a in steps if i == "CMD"]
    script = ROOT / next(src for src, dest in copied.items() if dest.endswith("/" + entry[0]))
    assert os.access(script, os.X_OK) and 'exec ainode serve "$@"' in script.read_text()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "ainode" in scripts
    config = Path(cmd[cmd.index("--config") + 1])
    assert copied[f"docker/{config.name}"] == f"{config.parent}/"
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    assert compose["services"]["node"]["command"] == ["--config", "/etc/ainode/${AINODE_CONFIG:-node.yaml}"]
    assert any(i == "USER" and a != "root" for i, a in steps)
    assert any(i == "HEALTHCHECK" for i, a in steps)


@pytest.mark.parametrize("name", ["node.yaml", "node-ray.yaml"])
def test_the_configs_in_the_image_are_valid_and_admit_the_health_check(name):
    cfg = yaml.safe_load((DOCKER / name).read_text())
    assert "HEALTHCHECK" in cfg["node"]["allowed_calling_aes"]
    assert cfg["storage"]["database"].startswith("postgresql://ainode@postgres:5432/")  # no password in the file
    health = next(a for i, a in _dockerfile() if i == "HEALTHCHECK")
    assert f"-aec {cfg['node']['ae_title']} 127.0.0.1 {cfg['node']['port']}" in health
    r = subprocess.run([sys.executable, "-m", "node.cli", "check-config", str(DOCKER / name)],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "AINODE_API_TOKEN": "x"})
    assert r.returncode == 0, r.stderr
    if name == "node-ray.yaml":
        assert "executor: ray at ray-head:6379" in r.stdout
