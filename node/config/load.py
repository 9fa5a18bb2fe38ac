"""Reading and checking the config file; every error names its key path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from node.config.schema import FORWARD, NodeConfig, ResolvedStorage
import importlib.util

from node.plugin_api import available_plugins


class ConfigError(Exception):
    """One or more config errors, each a single line 'FILE: key.path: message'."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class LoadedConfig:
    config: NodeConfig
    storage: ResolvedStorage
    source: str  # file path, or "<embedded defaults>"


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _pydantic_errors(source: str, exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (remove it or check its spelling)"
        elif err["type"] != "missing" and "input" in err:
            msg = f"{msg} (got {_describe(err['input'])})"
        lines.append(f"{source}: {path}: {msg}")
    return lines


def reference_errors(cfg: NodeConfig) -> list[str]:
    """Errors between sections: rules naming plugins or destinations that do not exist."""
    errors: list[str] = []
    installed = available_plugins()
    for name, section in cfg.plugins.items():
        if section.entry:
            module = section.entry.split(":")[0]
            try:
                found = importlib.util.find_spec(module) is not None
            except ImportError:
                found = False
            if not found:
                errors.append(f"plugins.{name}.entry: module '{module}' cannot be found on the Python path")
        elif name not in installed:
            errors.append(
                f"plugins.{name}: plugin '{name}' is not installed "
                f"(installed: {', '.join(sorted(installed)) or 'none'})"
            )
    seen: set[str] = set()
    for i, rule in enumerate(cfg.rules):
        if rule.name in seen:
            errors.append(f"rules.{i}.name: duplicate rule name '{rule.name}'")
        seen.add(rule.name)
        if rule.plugin == FORWARD:  # built in: send the matched series itself
            if FORWARD in cfg.plugins:
                errors.append("plugins.forward: 'forward' is the built-in rule action; rename the plugin")
            for j, dest in enumerate(rule.destinations):
                if dest not in cfg.destinations:
                    errors.append(f"rules.{i}.destinations.{j}: 'plugin: forward' sends by C-STORE, so '{dest}' "
                                  "must be under destinations")
        elif rule.plugin not in cfg.plugins:
            errors.append(
                f"rules.{i}.plugin: plugin '{rule.plugin}' is not configured under 'plugins' "
                f"(configured: {', '.join(sorted(cfg.plugins)) or 'none'})"
            )
        elif not cfg.plugins[rule.plugin].enabled:
            errors.append(f"rules.{i}.plugin: plugin '{rule.plugin}' is disabled under 'plugins'")
        if rule.priors is not None and rule.priors.source not in cfg.sources:
            errors.append(f"rules.{i}.priors.source: unknown source '{rule.priors.source}' "
                          f"(defined under sources: {', '.join(sorted(cfg.sources)) or 'none'})")
        known = {*cfg.destinations, *cfg.dicomweb, *cfg.ris, *cfg.fhir}
        for j, dest in enumerate(rule.destinations):
            if dest not in known:
                errors.append(
                    f"rules.{i}.destinations.{j}: unknown destination '{dest}' "
                    f"(defined under destinations, dicomweb, ris or fhir: {', '.join(sorted(known)) or 'none'})"
                )
    allowed = {a.upper() for a in cfg.node.allowed_calling_aes}
    for name, d in cfg.destinations.items():
        if allowed and d.storage_commitment and d.ae_title.upper() not in allowed:
            errors.append(f"destinations.{name}.storage_commitment: the PACS reports commitments from AE "
                          f"'{d.ae_title}', which node.allowed_calling_aes rejects; add it there")
        for ae in d.return_ae_titles:
            if allowed and ae.upper() not in allowed:
                errors.append(f"destinations.{name}.return_ae_titles: '{ae}' is not in node.allowed_calling_aes, "
                              "so its returned results would be rejected; add it there")
        if d.external and cfg.deid is None:
            errors.append(f"destinations.{name}.external: an external destination gets de-identified copies; "
                          "add a deid: section with its key (key_file or key_env)")
        if (d.return_ae_titles or d.return_to) and not d.external:
            errors.append(f"destinations.{name}: return_ae_titles/return_to apply to external destinations only")
        for j, to in enumerate(d.return_to):
            if to not in cfg.destinations or cfg.destinations[to].external:
                errors.append(f"destinations.{name}.return_to.{j}: '{to}' must be a hospital (not external) "
                              "destination under destinations")
    sections = (("destinations", cfg.destinations), ("dicomweb", cfg.dicomweb), ("ris", cfg.ris), ("fhir", cfg.fhir))
    for section, names in sections[1:]:
        for name in names:
            other = [o for o, m in sections if o != section and name in m]
            if other:
                errors.append(f"{section}.{name}: the name is also used under {other[0]}; rules name "
                              "destinations by name, so give each a name of its own")
    return errors


def load_config(path: Path | None) -> LoadedConfig:
    """Load and validate; raise ConfigError listing every problem found."""
    if path is None:
        cfg = NodeConfig()
        return LoadedConfig(cfg, cfg.storage.resolved(Path.cwd()), "<embedded defaults>")
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read the file: {exc.strerror}"]) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"{source}: {where}not valid YAML: {getattr(exc, 'problem', exc)}"]) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: (top level): expected a mapping of sections, got {type(data).__name__}"])
    try:
        cfg = NodeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_pydantic_errors(source, exc)) from exc
    errors = [f"{source}: {e}" for e in reference_errors(cfg)]
    if errors:
        raise ConfigError(errors)
    # Relative paths in the file are relative to the file, so a service can start from any cwd.
    return LoadedConfig(cfg, cfg.storage.resolved(Path(path).resolve().parent), source)
