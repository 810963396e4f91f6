"""Fixtures for the training/export tests: a tiny two-bucket dataset and a trained tiny LoRA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lora_pipeline.lora.cache import DiskCache
from lora_pipeline.lora.files import sha256_file
from lora_pipeline.lora.sd import load_sd
from lora_pipeline.lora.training import Example, train
from train_helpers import make_params, model_outputs

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
    sd = load_sd(params.base_model)
    result = train(sd, tiny_examples, params, DiskCache(tmp / "cache"), dataset_hash="d")
    summary = {"lora_rank": 4, "alpha": 8.0, "dropout": 0.0, "unet_targets": params.unet_targets,
               "text_encoder_targets": params.text_encoder_targets, "train_text_encoder": True,
               "num_images": len(tiny_examples), "epochs": 2, "steps": 8, "learning_rate": 1e-3,
               "text_encoder_lr": 1e-3, "resolution": [96, 64], "seed": 42, "trigger": "sks",
               "tag_frequency": {"sks": 8}, "dataset_hash": "d", "started_at": "t0", "finished_at": "t1",
               "base_model": params.base_model, "output_name": "test_lora"}
    return {"sd": sd, "result": result, "params": params, "summary": summary, "outputs": model_outputs(sd),
            "tmp": tmp}
