"""Merge node: fuse LoRAs at given weights into the base model and save it for diffusers and WebUI."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from lora_pipeline.core.config import GenerationParams, MergeParams, parse_params
from lora_pipeline.core.files import atomic_folder
from lora_pipeline.core.models import DTYPES
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.prompts import LoraRef, resolve_loras
from lora_pipeline.diffusion.single_file import write_ldm_checkpoint
from lora_pipeline.diffusion.stack import merge_into_base

logger = logging.getLogger(__name__)

MERGED_DIR = Path("data/06_models/merged")


def merge_loras(params: dict[str, Any], generation: dict[str, Any]) -> str:
    """Base model + LoRAs (resolved like prompt tags) -> ``<output_name>/`` (diffusers) + ``<output_name>.safetensors``.

    Returns the folder written, as a string, for the log and the lineage graph.
    """
    p = parse_params(MergeParams, params, "merge")
    g = parse_params(GenerationParams, generation, "generation")
    files = resolve_loras([LoraRef(e.name, e.weight) for e in p.loras], g.lora_dirs)
    sd = load_diffusion_model(g.base_model, g.base_model_family, g.allow_download, g.single_file_config)
    for module in sd.modules().values():
        # Merge in fp32, save in p.precision: a base saved in fp16/bf16 loads its text encoders in that dtype.
        module.to(torch.float32)
    merge_into_base(sd.modules(), sd.family, [(files[e.name], e.weight) for e in p.loras])
    pipe = sd.pipeline()
    dtype = DTYPES[p.precision]
    folder = MERGED_DIR / p.output_name
    with atomic_folder(folder) as tmp:
        pipe.to(dtype=dtype).save_pretrained(tmp)
    single = write_ldm_checkpoint(pipe, MERGED_DIR / f"{p.output_name}.safetensors", sd.family)
    logger.info("Merged %s into %s (diffusers) and %s (WebUI checkpoint)",
                ", ".join(f"{e.name}:{e.weight:g}" for e in p.loras), folder, single)
    return str(folder)
