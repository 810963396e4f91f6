"""Generation node: a thin adapter over ``lora_pipeline.diffusion.generation`` and ``lora.stack``."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from PIL import Image

from lora_pipeline.core.config import GenerationParams, PromptSpec
from lora_pipeline.core.models import pick_device
from lora_pipeline.core.spec import LoraFile
from lora_pipeline.diffusion.evaluation import cell_statistics
from lora_pipeline.diffusion.generation import (
    LoraSource,
    comparison_cells,
    contact_sheet,
    generate,
    grid_image,
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
    """The images, the contact sheet and the comparison grid (:func:`generate_and_measure` without the grid's
    statistics)."""
    return generate_and_measure(p, *latest_exports)[:3]


def generate_and_measure(
    p: GenerationParams, *latest_exports: LoraFile
) -> tuple[dict[str, Image.Image], Image.Image, Image.Image, pd.DataFrame, str]:
    """Render the prompts file (or ``generation.prompt``); every LoRA name is resolved before any model loads.
    Then the comparison grid of the first prompt with LoRAs, and ``comparison_statistics`` measured on each of its
    cells (a table, a markdown report and MLflow metrics ``comparison.<cell>.<statistic>``).

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
    cells = comparison_cells(pipe, with_loras, parse_prompt(with_loras.prompt)[1], p.comparison_weights)
    grid = grid_image(cells, p.thumbnail)
    table = pd.DataFrame(cell_statistics(cells, p.comparison_statistics, p.stripe_cycles))
    report = _comparison_report(with_loras, table, p)
    tracking.log_image(sheet, "generation/contact_sheet.png")
    tracking.log_image(grid, "generation/comparison_grid.png")
    tracking.log_text(report, "generation/comparison_report.md")
    tracking.log_metrics({f"comparison.{_metric_name(row['label'])}.{name}": row[name]
                          for row in table.to_dict("records") for name in p.comparison_statistics})
    if p.comparison_statistics:
        logger.info("Comparison grid: %s", "; ".join(
            f"{row['label']}: " + ", ".join(f"{name} {row[name]:.3f}" for name in p.comparison_statistics)
            for row in table.to_dict("records")))
    return dict(named), sheet, grid, table, report


def _metric_name(label: str) -> str:
    """A grid label as an MLflow metric name part: ``demo_lora 0.5`` -> ``demo_lora_0.5``, the stacked cell
    ``all: a 0.6, b 0.8`` -> ``all_a_0.6_b_0.8``."""
    return "_".join(label.replace(":", " ").replace(",", " ").replace("+", " ").split())


STATISTIC_TEXT = {"red_share": "share of red pixels (hue within 20 degrees of red, saturation >= 0.5, value >= 0.35)",
                  "stripe_energy": "share of the brightness variation in vertical stripes of {cycles} periods"}


def _comparison_report(spec: PromptSpec, table: pd.DataFrame, p: GenerationParams) -> str:
    columns = [c for c in table.columns if c not in ("row", "column")]
    lines = ["# Comparison grid", "",
             f"Prompt `{spec.prompt}`, seed {spec.seed}, {spec.steps} steps, guidance {spec.guidance:g}, "
             f"{spec.width}x{spec.height}; every cell at the same seed (image: `comparison_grid.png`).", ""]
    lines += [f"- `{name}`: {STATISTIC_TEXT[name].format(cycles=p.stripe_cycles)}" for name in p.comparison_statistics]
    lines += ["", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in table[columns].itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"
