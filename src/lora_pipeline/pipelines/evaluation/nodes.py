"""Evaluation node: base vs base+LoRA on fixed seeds, timesteps and noise, so the figures are reproducible."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from PIL import Image

from lora_pipeline.config import EvaluationParams, PromptSpec, parse_params
from lora_pipeline.datasets.image_folder import ImageFolder
from lora_pipeline.lora.cache import DiskCache
from lora_pipeline.lora.evaluation import ClipScorer, holdout_examples
from lora_pipeline.lora.generation import render
from lora_pipeline.lora.sd import load_sd
from lora_pipeline.lora.stack import merge_state_into_base
from lora_pipeline.lora.training import denoising_loss, encode_latents
from lora_pipeline.pipelines.metrics import as_mlflow_metrics
from lora_pipeline.pipelines.training.nodes import build_examples

logger = logging.getLogger(__name__)


def evaluate_lora(
    normalized_images: ImageFolder,
    train_metadata: pd.DataFrame,
    latent_cache: DiskCache,
    lora_kohya: dict[str, Any],
    training_summary: dict[str, Any],
    params: dict[str, Any],
) -> tuple[str, dict[str, dict[str, float]]]:
    """Denoising loss (train and held-out images) and optional CLIP figures, base vs LoRA; a markdown report."""
    p = parse_params(EvaluationParams, params, "evaluation")
    sd = load_sd(training_summary["base_model"])
    device = torch.device("cpu")
    train_examples = build_examples(normalized_images, train_metadata)
    sets = {"train": train_examples}
    if p.holdout_dir:
        buckets = sorted({(ex.width, ex.height) for ex in train_examples})
        trigger = training_summary.get("trigger", "")
        sets["holdout"] = holdout_examples(p.holdout_dir, buckets, 8, trigger,
                                           Path(tempfile.mkdtemp(prefix="holdout-")))
    keys = {}
    for examples in sets.values():
        keys.update(encode_latents(sd, examples, latent_cache, device)[0])
    sd.vae.to("cpu")

    clip = None
    if p.clip_model and p.eval_prompts:
        references = [Image.open(ex.path).convert("RGB") for ex in train_examples[:32]]
        clip = (ClipScorer(p.clip_model, device), references)
    figures: dict[str, float] = {}
    for label in ("base", "lora"):  # one base model, evaluated, then merged with the LoRA and evaluated again
        if label == "lora":
            merge_state_into_base(sd, lora_kohya["state"], 1.0, training_summary["output_name"])
        for name, examples in sets.items():
            figures[f"loss_{name}_{label}"] = denoising_loss(sd, examples, latent_cache, keys, p.seed, p.timesteps)
        if clip is not None:
            figures.update(_clip_figures(p, sd, *clip, label))
    for name in sets:
        figures[f"loss_{name}_change_pct"] = 100 * (figures[f"loss_{name}_lora"] / figures[f"loss_{name}_base"] - 1)
    report = _report(training_summary, figures, {k: len(v) for k, v in sets.items()})
    if mlflow.active_run():
        if training_summary.get("mlflow_run_id"):
            mlflow.set_tag("training_run_id", training_summary["mlflow_run_id"])
        mlflow.log_text(report, "evaluation/report.md")
    logger.info("Evaluation: %s", ", ".join(f"{k}={v:.4f}" for k, v in figures.items()))
    return report, as_mlflow_metrics({f"{k}": v for k, v in figures.items()})


def _clip_figures(p: EvaluationParams, sd, scorer: ClipScorer, references, label: str) -> dict[str, float]:
    """CLIP score of images generated with fixed seeds, and their similarity to the training images."""
    pipe = sd.pipeline()
    pipe.set_progress_bar_config(disable=True)
    spec = PromptSpec(prompt="-", steps=p.eval_steps, width=p.eval_size, height=p.eval_size)
    images = [render(pipe, prompt, spec, p.seed + i) for i, prompt in enumerate(p.eval_prompts)]
    return {f"clip_score_{label}": scorer.clip_score(images, p.eval_prompts),
            f"style_similarity_{label}": scorer.similarity(images, references)}


def _report(summary: dict[str, Any], figures: dict[str, float], sizes: dict[str, int]) -> str:
    rows = "\n".join(f"| {name} | {value:.5f} |" for name, value in figures.items())
    return f"""# Evaluation of {summary['output_name']}

Base model `{summary['base_model']}`, LoRA rank {summary['lora_rank']} / alpha {summary['alpha']},
{summary['steps']} steps. Images: {', '.join(f'{k} {v}' for k, v in sizes.items())}.

Denoising loss: mean MSE at fixed timesteps with fixed noise (lower is better; identical on every run).
`*_change_pct` is the LoRA's change against the base model.

| figure | value |
| --- | --- |
{rows}

Training run: `{summary.get('mlflow_run_id')}` (MLflow). Comparison grid: see the generation stage's
`comparison_grid.png`.
"""
