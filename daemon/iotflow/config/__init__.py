"""Configuration: the TOML file, validated into typed models."""

from iotflow.config.load import Provisioned, Settings, default_path, load_settings
from iotflow.config.model import Config

__all__ = ["Config", "Provisioned", "Settings", "default_path", "load_settings"]
