"""Generation node: a thin adapter over ``lora_pipeline.diffusion.generation`` and ``lora.stack``."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image

from lora_pipeline.core.config import GenerationParams, PromptSpec
from lora_pipeline.core.models import pick_device
from lora_pipeline.core.spec import LoraFile
from lora_pipeline.diffusion.generation import (
    LoraSource,
    comparison_grid,
    contact_sheet,
    generate,
    inference_pipeline,
    read_prompts_file,
)
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.prompts import parse_prompt, resolve_loras
from lora_pipeline.diffusion.stack import load_stack
from lora_pipeline.pipelines import tracking

logger = logging.getLogger(__name__)


def load_generation_pipeline(p: GenerationParams, files: dict[str, Path]):
    """The base model (one loader for every stage) with each referenced LoRA loaded as an adapter."""
    components = load_diffusion_model(p.base_model, p.base_model_family, p.allow_download, p.single_file_config)
    pipe = inference_pipeline(components.pipeline(), pick_device(p.device))
    load_stack(pipe, components.family, files)
    return pipe


def generate_images(
    p: GenerationParams, *latest_exports: LoraFile
) -> tuple[dict[str, Image.Image], Image.Image, Image.Image]:
    """Render the prompts file (or ``generation.prompt``); every LoRA name is resolved before any model loads.

    ``latest_exports`` are the subjects' newest exported LoRAs: names resolve in ``lora_dirs`` (which hold
    them), and taking them as inputs orders this stage after every export and shows the links in ``kedro viz``.
    """
    for export in latest_exports:
        logger.info("Newest export: %s (hash %s)", export.metadata.get("ss_output_name"),
                    export.metadata.get("sshs_model_hash", "")[:12])
    if p.prompt:
        specs = [PromptSpec.model_validate({**p.defaults.model_dump(), "prompt": p.prompt})]
    else:
        specs = read_prompts_file(p.prompts_file, p.defaults)
    refs = [ref for spec in specs for ref in parse_prompt(spec.prompt)[1]]
    files = resolve_loras(refs, p.lora_dirs)
    logger.info("%d prompt(s), LoRAs: %s", len(specs), ", ".join(f"{n} ({f})" for n, f in files.items()) or "none")
    pipe = load_generation_pipeline(p, files)
    named = generate(pipe, specs, Path(p.base_model).name, {name: LoraSource.of(path) for name, path in files.items()})
    sheet = contact_sheet([image for _, image in named], p.thumbnail)
    with_loras = next((spec for spec in specs if parse_prompt(spec.prompt)[1]), specs[0])
    grid = comparison_grid(pipe, with_loras, parse_prompt(with_loras.prompt)[1], p.comparison_weights, p.thumbnail)
    tracking.log_image(sheet, "generation/contact_sheet.png")
    tracking.log_image(grid, "generation/comparison_grid.png")
    return dict(named), sheet, grid
