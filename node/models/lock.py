"""Which model package each enabled plugin uses, verified and locked before the node runs a job."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from node.config.schema import NodeConfig
from node.models.package import LoadedModel, ModelError, load_model
from node.plugin_api import plugin_class


@dataclass(frozen=True)
class ModelUse:
    plugin: str
    model: str
    version: str


def models_in_use(cfg: NodeConfig) -> list[ModelUse]:
    """Model packages of the plugins that rules use: the plugin's declared version unless the config pins one."""
    out = []
    for name in cfg.rule_plugins():
        section = cfg.plugins.get(name)
        cls = plugin_class(name, section.entry if section else None)
        if cls.model_name:
            version = (section.model_version if section else None) or cls.model_version
            if not version:
                raise ModelError(f"plugins.{name}.model_version: plugin '{name}' needs model '{cls.model_name}' "
                                 "but declares no version; pin one in the config")
            out.append(ModelUse(name, cls.model_name, version))
    return out


def verify_models(cfg: NodeConfig, models_dir: Path, store=None) -> list[LoadedModel]:  # type: ignore[no-untyped-def]
    """Hash-check every package in use; with a store, also refuse a version whose content changed since
    its first use. Raises ModelError naming the package and what to do."""
    loaded = []
    for use in models_in_use(cfg):
        model = load_model(models_dir, use.model, use.version)
        if store is not None:
            earlier = store.lock_model_version(model.name, model.version, model.digest)
            if earlier is not None:
                first = datetime.fromtimestamp(earlier.first_used_at).isoformat(timespec="seconds")
                raise ModelError(
                    f"{model.path}: content changed since this node first used {model.name} {model.version} "
                    f"on {first} (package digest {earlier.digest[:16]}…, now {model.digest[:16]}…). A version is "
                    "immutable: restore the original files, or give the changed package a new version.")
        loaded.append(model)
    return loaded
