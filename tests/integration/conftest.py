"""A temp copy of the project (conf + demo data + tiny models) and a helper that runs it through Kedro."""

from __future__ import annotations

from pathlib import Path

import pytest
from kedro.framework.startup import bootstrap_project
from kedro_helpers import build_project


@pytest.fixture
def project(tmp_path, tiny_models, _demo_images_template, monkeypatch) -> Path:
    root = build_project(tmp_path / "project", tiny_models, _demo_images_template)
    monkeypatch.chdir(root)  # the sqlite tracking URI and model paths are project-relative
    monkeypatch.setenv("KEDRO_ENV", "demo")  # the subjects the pipelines are registered for (conf/demo/subjects.yml)
    bootstrap_project(root)
    return root
