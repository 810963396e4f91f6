"""Kedro project settings."""

from pathlib import Path

from lora_pipeline.hooks import SubjectFingerprintHook, SubjectStageRunsHook, ValidateParametersHook
from lora_pipeline.subjects import SubjectsConfigLoader

# kedro-mlflow registers its own hook through its plugin entry point.
HOOKS = (ValidateParametersHook(), SubjectFingerprintHook(), SubjectStageRunsHook())

# Kedro's OmegaConfigLoader plus per-subject parameters from conf/<env>/subjects.yml (see subjects.py).
CONFIG_LOADER_CLASS = SubjectsConfigLoader
# `kedro` commands run from the project root, so the working folder is the project path. An absolute
# sqlite URI keeps MLflow's per-URI store cache from mixing up two projects used in one process.
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "custom_resolvers": {"project_path": lambda: Path.cwd().as_posix()},
}
