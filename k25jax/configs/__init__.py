"""Configs: presets (`get_config`), validation (`validate`) and command-line overrides."""

from k25jax.configs.presets import PRESETS, get_config
from k25jax.configs.validate import ConfigError, validate

__all__ = ["PRESETS", "ConfigError", "get_config", "validate"]
