from node.config.load import ConfigError, LoadedConfig, load_config
from node.config.schema import NodeConfig

__all__ = ["ConfigError", "LoadedConfig", "NodeConfig", "load_config"]
