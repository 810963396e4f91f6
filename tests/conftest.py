"""Shared fixtures: tiny offline models, demo image folders, a two-bucket dataset, a trained tiny LoRA."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from train_helpers import make_params, model_outputs, summary_for  # noqa: E402

from lora_pipeline.core.cache import DiskCache  # noqa: E402
from lora_pipeline.core.files import sha256_file  # noqa: E402
from lora_pipeline.demo import build_demo_images  # noqa: E402
from lora_pipeline.demo.tiny_models import build_all  # noqa: E402
from lora_pipeline.diffusion.loading import load_diffusion_model  # noqa: E402
from lora_pipeline.diffusion.training import Example, train  # noqa: E402

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


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing in the suite may open a network connection: only loopback and local sockets are allowed."""
    import socket

    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and self.family in (socket.AF_INET, socket.AF_INET6) and host not in (
                "127.0.0.1", "localhost", "::1"):
            raise RuntimeError(f"test tried to open a network connection to {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    yield


CAPTIONS = ["sks, red circle", "sks, blue square", "sks, green stripes", "sks, yellow circle"]


@pytest.fixture(scope="session")
def tiny_examples(tmp_path_factory) -> list[Example]:
    folder = tmp_path_factory.mktemp("dataset")
    rng = np.random.default_rng(0)
    examples = []
    for index in range(8):
        size = (64, 64) if index < 6 else (96, 64)  # two aspect buckets
        pixels = (rng.random((size[1], size[0], 3)) * 64 + index * 20).astype(np.uint8)
        path = folder / f"img_{index}.png"
        Image.fromarray(pixels).save(path)
        examples.append(Example(path, CAPTIONS[index % 4], size[0], size[1], sha256_file(path)))
    return examples


@pytest.fixture(scope="session")
def trained(tiny_models, tiny_examples, tmp_path_factory):
    """A LoRA trained on UNet and text encoder (alpha != rank), with its model and outputs."""
    tmp = tmp_path_factory.mktemp("trained")
    params = make_params(tiny_models, tmp, train_text_encoder=True, max_steps=8, text_encoder_lr=1e-3)
    components = load_diffusion_model(params.base_model)
    result = train(components, tiny_examples, params, DiskCache(tmp / "cache"), dataset_hash="d")
    summary = summary_for(params, result.spec)
    return {"components": components, "result": result, "params": params, "summary": summary,
            "outputs": model_outputs(components), "tmp": tmp}
