"""The node's configuration. Names are loaded on first use, so that node.config.base can be imported by
section models elsewhere (node/ris, node/audit) without pulling in schema.py, which imports them."""

from typing import Any

__all__ = ["ConfigError", "LoadedConfig", "NodeConfig", "load_config"]


def __getattr__(name: str) -> Any:
    if name in ("ConfigError", "LoadedConfig", "load_config"):
        from node.config import load

        return getattr(load, name)
    if name == "NodeConfig":
        from node.config.schema import NodeConfig

        return NodeConfig
    raise AttributeError(f"module 'node.config' has no attribute {name!r}")
