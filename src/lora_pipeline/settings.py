"""Kedro project settings."""

from pathlib import Path

from lora_pipeline.project.hooks import SubjectFingerprintHook, SubjectStageRunsHook, ValidateParametersHook
from lora_pipeline.project.quiet import install as install_quiet
from lora_pipeline.project.subjects import SubjectsConfigLoader

install_quiet()  # known third-party warnings off, catalog lines at DEBUG (see quiet.py)

# kedro-mlflow registers its own hook through its plugin entry point.
HOOKS = (ValidateParametersHook(), SubjectFingerprintHook(), SubjectStageRunsHook())

# Kedro's OmegaConfigLoader plus per-subject parameters from conf/<env>/subjects.yml (see subjects.py).
CONFIG_LOADER_CLASS = SubjectsConfigLoader


def project_root() -> str:
    """The Kedro project this command runs in: the nearest folder up from the working folder whose
    pyproject.toml has [tool.kedro] (``kedro run`` works from a sub-folder too; the tracking store must not
    follow it there)."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        config = folder / "pyproject.toml"
        if config.is_file() and "[tool.kedro]" in config.read_text(encoding="utf-8", errors="replace"):
            return folder.as_posix()
    return here.as_posix()


# An absolute sqlite URI at the project root keeps MLflow's per-URI store cache from mixing up two projects
# used in one process, and one store per project whatever folder `kedro run` starts in.
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "custom_resolvers": {"project_path": project_root},
}
