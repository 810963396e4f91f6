"""Helpers shared by the training and export tests."""

from __future__ import annotations

import torch

from lora_pipeline.config import TrainingParams


def make_params(tiny_models, tmp_path, **overrides) -> TrainingParams:
    values = dict(base_model=str(tiny_models["tiny-sd"]), device="cpu", lora_rank=4, alpha=8, batch_size=2,
                  max_steps=6, learning_rate=1e-3, checkpoint_dir=str(tmp_path / "checkpoints"), resume="none",
                  output_name="test_lora")
    values.update(overrides)
    return TrainingParams(**values)


def unet_inputs(sd, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    hidden = torch.randn(2, 77, sd.unet.config.cross_attention_dim, generator=generator)
    return sample, torch.tensor([10, 500]), hidden


def te_inputs(sd):
    return sd.tokenizer(["sks, red circle", "a photo of a dog"], padding="max_length", max_length=77,
                        return_tensors="pt").input_ids


@torch.no_grad()
def model_outputs(sd) -> tuple[torch.Tensor, torch.Tensor]:
    unet = getattr(sd.unet, "module", sd.unet)
    unet.eval()
    sd.text_encoder.eval()
    return unet(*unet_inputs(sd)).sample, sd.text_encoder(te_inputs(sd))[0]
