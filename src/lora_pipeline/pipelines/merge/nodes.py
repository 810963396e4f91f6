"""Merge node: fuse LoRAs at given weights into the base model and save it for diffusers and WebUI."""

from __future__ import annotations

import logging

import torch

from lora_pipeline.core.config import GenerationParams, MergeParams
from lora_pipeline.core.models import DTYPES
from lora_pipeline.core.spec import PretrainedFolder
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.prompts import LoraRef, resolve_loras
from lora_pipeline.diffusion.single_file import pipeline_to_ldm
from lora_pipeline.diffusion.stack import merge_into_base

logger = logging.getLogger(__name__)


def merge_loras(p: MergeParams, g: GenerationParams) -> tuple[PretrainedFolder, dict[str, torch.Tensor]]:
    """Base model + LoRAs (resolved like prompt tags, in ``generation.lora_dirs``) -> the merged model twice:
    a diffusers folder (``merged_model``) and the original-layout single file WebUI loads (``merged_checkpoint``).
    """
    files = resolve_loras([LoraRef(e.name, e.weight) for e in p.loras], g.lora_dirs)
    components = load_diffusion_model(g.base_model, g.base_model_family, g.allow_download, g.single_file_config)
    for module in components.modules().values():
        # Merge in fp32, save in p.precision: a base saved in fp16/bf16 loads its text encoders in that dtype.
        module.to(torch.float32)
    merge_into_base(components.modules(), components.family, [(files[e.name], e.weight) for e in p.loras])
    pipe = components.pipeline().to(dtype=DTYPES[p.precision])
    logger.info("Merged %s into %s (%s)", ", ".join(f"{e.name}:{e.weight:g}" for e in p.loras), g.base_model,
                p.precision)
    return PretrainedFolder((pipe,)), pipeline_to_ldm(pipe, components.family)
