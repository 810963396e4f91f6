"""The registered pipelines of the demo project, for the tests of the registry."""

from __future__ import annotations

import pytest
from kedro_helpers import REPO_ROOT


@pytest.fixture(scope="session")  # registering every pipeline takes seconds; the tests only read them
def registered():
    import os

    from lora_pipeline.pipeline_registry import register_pipelines
    from lora_pipeline.project import subjects

    cwd, env = os.getcwd(), subjects._session_env
    os.chdir(REPO_ROOT)  # the registry reads the subjects of the project in the working folder
    try:  # a loader for env demo is what the registry's subjects follow
        loader = subjects.SubjectsConfigLoader(conf_source="conf", env="demo", base_env="base", default_run_env="local")
        return register_pipelines(), loader["parameters"]
    finally:
        os.chdir(cwd)
        subjects._session_env = env
