"""Shared fixtures: tiny offline models (built once per session) and fresh demo image folders."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from lora_pipeline.demo import build_demo_images  # noqa: E402
from lora_pipeline.lora.tiny_models import build_all  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    return build_all(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def _demo_images_template(tmp_path_factory) -> Path:
    return build_demo_images(tmp_path_factory.mktemp("demo_template") / "images")


@pytest.fixture
def demo_images(_demo_images_template, tmp_path) -> Path:
    """A private copy of the demo raw folder that a test may modify."""
    target = tmp_path / "raw" / "images"
    shutil.copytree(_demo_images_template, target)
    return target
