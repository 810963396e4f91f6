"""Stable Diffusion 1.x components: load from a diffusers folder, a hub id or one single-file checkpoint."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_pipeline.lora.models import resolve_model

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass
class SDComponents:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any  # DDPM noise schedule for training
    source: str
    inference_scheduler: Any = None  # the base model's own sampler, for images

    def pipeline(self, **overrides: Any):
        """A StableDiffusionPipeline over these very modules (LoRA layers included), for images."""
        from diffusers import StableDiffusionPipeline

        parts = dict(unet=self.unet, vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                     scheduler=self.inference_scheduler or self.scheduler, safety_checker=None,
                     feature_extractor=None, requires_safety_checker=False)
        parts.update(overrides)
        return StableDiffusionPipeline(**parts)


def load_sd(base_model: str, allow_download: bool = False, single_file_config: str | None = None) -> SDComponents:
    """The one loader for SD1.x bases: folder or hub id via ``from_pretrained``, or a single checkpoint file.

    A single file (``v1-5-pruned.safetensors`` from WebUI) goes through diffusers' ``from_single_file`` with a
    local ``single_file_config`` folder (a diffusers SD1.x folder holding model_index.json and the component
    configs), so nothing is fetched.
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    source = resolve_model(base_model, allow_download)
    if source.endswith(SINGLE_FILE_SUFFIXES) and Path(source).is_file():
        if single_file_config is None:
            raise ValueError(
                f"'{source}' is a single-file checkpoint; set training.single_file_config to a local diffusers "
                f"SD1.x folder (configs only are enough) so that nothing has to be downloaded."
            )
        config = resolve_model(single_file_config, allow_download=False)
        pipe = StableDiffusionPipeline.from_single_file(
            source, config=config, local_files_only=True, safety_checker=None, requires_safety_checker=False
        )
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            source, local_files_only=not allow_download, safety_checker=None, requires_safety_checker=False
        )
    # Training always uses a DDPM noise schedule with the base model's betas.
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return SDComponents(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler, source, pipe.scheduler)


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's config and weights: the identity a cache key needs (same weights = same key)."""
    digest = hashlib.sha256(repr(getattr(module, "config", "")).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        # The numpy view is hashed in place (no copy): a UNet is 3.4 GB in fp32.
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:24]
