"""Kedro project settings."""

from kedro.config import OmegaConfigLoader

from lora_pipeline.hooks import ValidateParametersHook

# kedro-mlflow registers its own hook through its plugin entry point.
HOOKS = (ValidateParametersHook(),)

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {"base_env": "base", "default_run_env": "local"}
