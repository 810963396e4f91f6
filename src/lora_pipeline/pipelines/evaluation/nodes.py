"""Evaluation node: base vs base+LoRA on fixed seeds, timesteps and noise, so the figures are reproducible."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from lora_pipeline.core.cache import DiskCache
from lora_pipeline.core.config import EvaluationParams, PromptSpec, TrainingParams
from lora_pipeline.core.models import pick_device
from lora_pipeline.core.spec import ImageTrainingSummary, LoraFile
from lora_pipeline.datasets.image_folder import ImageFolder
from lora_pipeline.diffusion.dataset import build_examples
from lora_pipeline.diffusion.evaluation import ClipScorer, holdout_examples
from lora_pipeline.diffusion.generation import inference_pipeline, render
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.lora_files import lora_modules_from_state
from lora_pipeline.diffusion.stack import merge_modules
from lora_pipeline.diffusion.training import denoising_loss, encode_latents
from lora_pipeline.pipelines import tracking
from lora_pipeline.pipelines.tracking import as_mlflow_metrics

logger = logging.getLogger(__name__)


def evaluate_lora(
    normalized_images: ImageFolder,
    train_metadata: pd.DataFrame,
    latent_cache: DiskCache,
    lora_kohya: LoraFile,
    training_summary: ImageTrainingSummary,
    p: EvaluationParams,
    t: TrainingParams,
) -> tuple[str, dict[str, dict[str, float]], dict[str, float]]:
    """Denoising loss (train and held-out images) and optional CLIP figures, base vs LoRA: a markdown report,
    the figures for MLflow, and the same figures as plain numbers for the subjects report.

    The base model is the summary's; ``t`` (the training parameters) says only how to load it (download,
    single-file config)."""
    components = load_diffusion_model(training_summary.base_model, training_summary.family, t.allow_download,
                              t.single_file_config)
    components.clip_skip = training_summary.clip_skip  # condition as the LoRA was trained
    with tempfile.TemporaryDirectory(prefix="holdout-") as scratch:
        return _evaluate(components, p, normalized_images, train_metadata, latent_cache, lora_kohya, training_summary,
                         Path(scratch))


def _evaluate(components, p: EvaluationParams, normalized_images: ImageFolder, train_metadata: pd.DataFrame,
              latent_cache: DiskCache, lora_kohya: LoraFile, training_summary: ImageTrainingSummary,
              scratch: Path) -> tuple[str, dict[str, dict[str, float]], dict[str, float]]:
    device = pick_device(p.device)
    for module in (components.denoiser, *components.text_encoders):
        # One compute dtype, the UNet's: a base saved in fp16/bf16 loads its text encoders in that dtype.
        module.to(device, components.denoiser.dtype)
    train_examples = build_examples(normalized_images.root, train_metadata)
    sets = {"train": train_examples}
    if p.holdout_dir:
        buckets = sorted({(ex.width, ex.height) for ex in train_examples})
        trigger = training_summary.trigger
        sets["holdout"] = holdout_examples(p.holdout_dir, buckets, 8, trigger, scratch)
    keys = {}
    for examples in sets.values():
        keys.update(encode_latents(components, examples, latent_cache, device)[0])
    components.vae.to("cpu")

    clip = None
    if p.clip_model and p.eval_prompts:
        references = [Image.open(ex.path).convert("RGB") for ex in train_examples[:32]]
        clip = (ClipScorer(p.clip_model, device), references)
    figures: dict[str, float] = {}
    for label in ("base", "lora"):  # one base model, evaluated, then merged with the LoRA and evaluated again
        if label == "lora":
            lora = lora_modules_from_state(lora_kohya.state, lora_kohya.metadata, components.family,
                                           components.modules(), training_summary.output_name)
            merge_modules(components.modules(), lora, 1.0, training_summary.output_name)
        for name, examples in sets.items():
            figures[f"loss_{name}_{label}"] = denoising_loss(components, examples, latent_cache, keys, p.seed,
                                                             p.timesteps)
        if clip is not None:
            figures.update(_clip_figures(p, components, *clip, label))
    for name in sets:
        figures[f"loss_{name}_change_pct"] = 100 * (figures[f"loss_{name}_lora"] / figures[f"loss_{name}_base"] - 1)
    report = _report(training_summary, figures, {k: len(v) for k, v in sets.items()})
    tracking.set_tags({f"{training_summary.output_name}.training_run_id": training_summary.mlflow_run_id})
    tracking.log_text(report, f"evaluation/{training_summary.output_name}/report.md")
    logger.info("Evaluation: %s", ", ".join(f"{k}={v:.4f}" for k, v in figures.items()))
    return report, as_mlflow_metrics({f"{k}": v for k, v in figures.items()}), figures


def _clip_figures(p: EvaluationParams, components, scorer: ClipScorer, references, label: str) -> dict[str, float]:
    """CLIP score of images generated with fixed seeds, and their similarity to the training images."""
    pipe = inference_pipeline(components.pipeline(), next(components.denoiser.parameters()).device)
    spec = PromptSpec(prompt="-", steps=p.eval_steps, width=p.eval_size, height=p.eval_size,
                      clip_skip=components.clip_skip)
    images = [render(pipe, prompt, spec, p.seed + i)
              for i, prompt in enumerate(tqdm(p.eval_prompts, desc=f"CLIP prompts ({label})", unit="img"))]
    return {f"clip_score_{label}": scorer.clip_score(images, p.eval_prompts),
            f"style_similarity_{label}": scorer.similarity(images, references)}


def _report(summary: ImageTrainingSummary, figures: dict[str, float], sizes: dict[str, int]) -> str:
    rows = "\n".join(f"| {name} | {value:.5f} |" for name, value in figures.items())
    return f"""# Evaluation of {summary.output_name}

Base model `{summary.base_model}` ({summary.family}), LoRA rank {summary.spec.rank} / alpha {summary.spec.alpha},
{summary.steps} steps. Images: {', '.join(f'{k} {v}' for k, v in sizes.items())}.

Denoising loss: mean MSE at fixed timesteps with fixed noise (lower is better; identical on every run).
`*_change_pct` is the LoRA's change against the base model.

| figure | value |
| --- | --- |
{rows}

Training run: `{summary.mlflow_run_id}` (MLflow). Comparison grid: see the generation stage's
`comparison_grid.png`.
"""
