"""Loads a model package and proves it is the one that was validated: every file's sha256 is checked.

A package is `models/<name>/<version>/` holding `manifest.yaml` and the weight files it lists. A
weight file whose hash differs from the manifest is refused; so is a file in the folder that the
manifest does not list. The node also records each version's digest the first time it uses it
(Store.lock_model_version): a version folder whose content later changes is refused, so weights
cannot be updated silently under a version number that results already cite.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ModelError(Exception):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodeSpec(_Strict):
    value: str
    scheme: str
    meaning: str


class WeightFile(_Strict):
    file: str = Field(pattern=r"^[\w.-]+$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class InputSpec(_Strict):
    spacing_mm: tuple[float, float, float] = Field(description="(slice, row, column) spacing the model expects")
    patch_size: tuple[int, int, int]
    hu_window: tuple[float, float] = Field(description="HU range clipped and scaled to 0..1")


class OutputLabel(_Strict):
    value: int = Field(ge=1)
    label: str
    category: CodeSpec
    type: CodeSpec


class Manifest(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    version: str = Field(pattern=r"^[0-9]+\.[0-9]+\.[0-9]+$")
    description: str
    intended_use: str
    not_for_clinical_use: bool
    format: Literal["torchscript", "onnx"]
    weights: tuple[WeightFile, ...] = Field(min_length=1)
    input: InputSpec
    labels: tuple[OutputLabel, ...] = Field(min_length=1)
    training: dict = Field(default_factory=dict, description="script, data and date, for traceability")
    metrics: dict = Field(default_factory=dict, description="held-out figures reported by the training script")


@dataclass(frozen=True)
class LoadedModel:
    manifest: Manifest
    path: Path
    digest: str  # sha256 over the manifest and every weight file: the identity results cite

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def weights_sha256(self) -> str:
        return self.manifest.weights[0].sha256

    def weight_path(self, index: int = 0) -> Path:
        return self.path / self.manifest.weights[index].file


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def package_digest(manifest_path: Path, weights: dict[str, str]) -> str:
    h = hashlib.sha256(manifest_path.read_bytes())
    for name in sorted(weights):
        h.update(f"{name}:{weights[name]}\n".encode())
    return h.hexdigest()


def read_manifest(path: Path) -> Manifest:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ModelError(f"{path}: cannot read the manifest: {exc}") from exc
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        lines = [f"{path}: {'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors()]
        raise ModelError("\n".join(lines)) from exc


def load_model(root: Path, name: str, version: str) -> LoadedModel:
    """The verified package `name`/`version` under `root`. Raises ModelError naming the file at fault."""
    folder = Path(root) / name / version
    manifest_path = folder / "manifest.yaml"
    if not manifest_path.is_file():
        have = sorted(p.name for p in (Path(root) / name).glob("*") if p.is_dir()) if (Path(root) / name).is_dir() else []
        raise ModelError(f"{manifest_path}: no such model package (versions of '{name}' under {root}: "
                         f"{', '.join(have) or 'none'})")
    manifest = read_manifest(manifest_path)
    if (manifest.name, manifest.version) != (name, version):
        raise ModelError(f"{manifest_path}: declares {manifest.name} {manifest.version}, but lives in "
                         f"{name}/{version}; the folder must match the manifest")
    listed = {w.file for w in manifest.weights}
    extra = sorted(p.name for p in folder.iterdir() if p.name not in listed | {"manifest.yaml"})
    if extra:
        raise ModelError(f"{folder}: files not listed in the manifest: {', '.join(extra)}; a version folder holds "
                         "only its manifest and weights")
    hashes = {}
    for w in manifest.weights:
        path = folder / w.file
        if not path.is_file():
            raise ModelError(f"{path}: weight file listed in the manifest is missing")
        actual = sha256_file(path)
        if actual != w.sha256:
            raise ModelError(f"{path}: sha256 {actual} does not match the manifest ({w.sha256}); refusing to "
                             "load it. A version is immutable: publish changed weights as a new version.")
        hashes[w.file] = actual
    return LoadedModel(manifest, folder, package_digest(manifest_path, hashes))
