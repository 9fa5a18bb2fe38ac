"""Config errors: one line each, naming the file and the key path."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from node.config import ConfigError, load_config
from node.config.schema import RunSection

EXAMPLE = Path(__file__).resolve().parents[1] / "conf" / "node.example.yaml"


def check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_example_config_is_valid():
    r = check(EXAMPLE)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


def test_embedded_defaults_are_valid():
    loaded = load_config(None)
    assert loaded.config.node.ae_title == "AINODE"
    assert loaded.storage.database_url.startswith("sqlite:///")
    assert [r.plugin for r in loaded.config.rules] == ["ct_lung"]


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("node: {port: not-a-number}\n", "node.port: Input should be a valid integer"),
        ("node: {ae_titel: X}\n", "node.ae_titel: unknown key"),
        ("rules:\n  - {name: r1, plugin: ct_lung, destinations: [pacs2]}\n",
         "rules.0.destinations.0: unknown destination 'pacs2'"),
        ("destinations:\n  pacs: {ae_title: ORTHANC, host: 127.0.0.1}\n", "destinations.pacs.port: Field required"),
        ("node: {ae_title: WAY-TOO-LONG-AE-TITLE}\n", "node.ae_title: "),
        ("rules:\n  - {name: r1, plugin: no_such_plugin}\n", "rules.0.plugin: plugin 'no_such_plugin' is not configured"),
        ("rules:\n  - {name: r1, plugin: ct_lung, series: {series_description: '(['}}\n",
         "rules.0.series.series_description: invalid regular expression"),
        ("destinations:\n  cloud: {ae_title: C, host: h, port: 1, external: true}\n",
         "destinations.cloud.external: an external destination gets de-identified copies; add a deid: section"),
        ("deid: {key_env: K}\ndestinations:\n  cloud: {ae_title: C, host: h, port: 1, external: true, "
         "return_to: [cloud]}\n", "destinations.cloud.return_to.0: 'cloud' must be a hospital (not external)"),
        ("dicomweb:\n  web: {url: 'http://h/dicom-web'}\nrules:\n  - {name: r1, plugin: forward, destinations: [web]}\n",
         "rules.0.destinations.0: 'plugin: forward' sends by C-STORE, so 'web' must be under destinations"),
        ("destinations:\n  pacs: {ae_title: P, host: h, port: 1}\nris:\n  pacs: {host: h, port: 2}\n",
         "ris.pacs: the name is also used under destinations"),
        ("node: {allowed_calling_aes: [CT1]}\ndestinations:\n  pacs: {ae_title: PACS, host: h, port: 1, "
         "storage_commitment: true}\n", "destinations.pacs.storage_commitment: the PACS reports commitments from "
         "AE 'PACS', which node.allowed_calling_aes rejects"),
    ],
)
def test_each_error_is_one_line_with_key_path(tmp_path, yaml_text, expected):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    r = check(cfg)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"{cfg}: "), lines[0]
    assert expected in lines[0], lines[0]


def test_all_errors_are_reported_at_once(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("node: {port: 0, colour: blue}\nassemble: {quiet_period_s: -1}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    paths = sorted(e.split(": ")[1] for e in exc.value.errors)
    assert paths == ["assemble.quiet_period_s", "node.colour", "node.port"]


def test_yaml_syntax_error_names_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("node:\n  port: [1, 2\n")
    r = check(cfg)
    assert r.returncode != 0
    assert "line " in r.stderr and "not valid YAML" in r.stderr


def test_relative_storage_paths_are_relative_to_the_file(tmp_path):
    cfg = tmp_path / "sub" / "node.yaml"
    cfg.parent.mkdir()
    cfg.write_text("storage: {root: data}\n")
    loaded = load_config(cfg)
    assert loaded.storage.spool_dir == cfg.parent.resolve() / "data" / "spool"


@pytest.mark.parametrize(("allowed", "expected"), [({0}, False), ({0, 1}, True)])
def test_the_sr_process_follows_the_cpus_this_node_may_use_not_the_hosts(monkeypatch, allowed, expected):
    """On a 64-core host with the node pinned to one CPU (a container, taskset), a second process for the SR
    would only take turns with the SEG on that CPU."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: allowed)
    assert RunSection().use_sr_process() is expected
    assert RunSection(sr_process=True).use_sr_process() is True
