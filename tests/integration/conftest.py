"""A temp copy of the project (conf + demo data + tiny models) and a helper that runs it through Kedro."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from kedro.framework.startup import bootstrap_project

from lora_pipeline.demo import (
    build_demo_holdout,
    build_demo_stripes,
    write_demo_llm_data,
    write_demo_prompts,
    write_demo_review,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path, tiny_models, _demo_images_template, monkeypatch) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO_ROOT / "pyproject.toml", root)
    shutil.copytree(REPO_ROOT / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf" / "local").mkdir()
    (root / "src").mkdir()  # Kedro checks it exists; the package itself is installed
    for name, path in tiny_models.items():
        shutil.copytree(path, root / "data" / "06_models" / name)
    shutil.copytree(_demo_images_template, root / "data" / "01_raw" / "demo_lora" / "images")
    write_demo_review(root / "data" / "01_raw" / "demo_lora" / "reviewed_captions.csv")
    build_demo_stripes(root / "data" / "01_raw" / "demo_stripes" / "images")
    write_demo_prompts(root / "data" / "01_raw" / "prompts.yml")
    build_demo_holdout(root / "data" / "01_raw" / "holdout")
    write_demo_llm_data(root / "data" / "01_raw" / "llm" / "conversations.jsonl")
    monkeypatch.chdir(root)  # the sqlite tracking URI and model paths are project-relative
    monkeypatch.setenv("KEDRO_ENV", "demo")  # the subjects the pipelines are registered for (conf/demo/subjects.yml)
    bootstrap_project(root)
    return root
