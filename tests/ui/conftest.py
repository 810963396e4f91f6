"""A temp copy of the project for the workbench tests (never /work/main/data)."""

from __future__ import annotations

from pathlib import Path

import pytest
from kedro_helpers import build_project


@pytest.fixture
def data_project(tmp_path, _demo_images_template, monkeypatch) -> Path:
    """The demo conf and data without the tiny models: enough for captions, paths and the token (no training)."""
    root = build_project(tmp_path / "project", {}, _demo_images_template)
    monkeypatch.chdir(root)
    monkeypatch.setenv("KEDRO_ENV", "demo")
    return root
