"""Training node: a thin adapter from catalog entries to ``lora_pipeline.diffusion.training.train``."""

from __future__ import annotations

import contextlib
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from accelerate import PartialState

from lora_pipeline.core.cache import DiskCache
from lora_pipeline.core.config import TrainingParams
from lora_pipeline.core.lock import subject_lock
from lora_pipeline.core.spec import DatasetInfo, ImageTrainingSummary, LoraFile
from lora_pipeline.core.trainer import throughput
from lora_pipeline.datasets.image_folder import ImageFolder
from lora_pipeline.diffusion.dataset import build_examples, dataset_hash, resolve_init_lora
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.lora_files import read_lora_modules, to_peft_state
from lora_pipeline.diffusion.training import lora_spec, train
from lora_pipeline.pipelines import tracking
from lora_pipeline.pipelines.tracking import StepMetricsLogger, log_lineage_tags

logger = logging.getLogger(__name__)


def _sample_logger(subject: str):
    def log_samples(images: list[Any], step: int) -> None:
        for index, image in enumerate(images):
            tracking.log_image(image, f"samples/{subject}/step_{step:06d}_{index}.png")
    return log_samples


def train_lora(
    normalized_images: ImageFolder,
    train_metadata: pd.DataFrame,
    dataset_info: DatasetInfo,
    latent_cache: DiskCache,
    p: TrainingParams,
) -> tuple[LoraFile, ImageTrainingSummary]:
    """Train a LoRA; returns the weights (training layout) and the typed summary export and the rest read."""
    # Taken before the base model loads, so a second run of this subject stops at once; train() holds it too.
    # Under `accelerate launch` only the main process holds it (the others write no checkpoints).
    lock = subject_lock(Path(p.checkpoint_dir) / p.output_name, p.output_name) if PartialState().is_main_process \
        else contextlib.nullcontext()
    with lock:
        return _train_locked(p, normalized_images, train_metadata, dataset_info, latent_cache)


def _train_locked(p: TrainingParams, normalized_images: ImageFolder, train_metadata: pd.DataFrame,
                  dataset_info: DatasetInfo, latent_cache: DiskCache) -> tuple[LoraFile, ImageTrainingSummary]:
    s = p.output_name  # the subject
    examples = build_examples(normalized_images.root, train_metadata)
    data_hash = dataset_hash(examples)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    components = load_diffusion_model(p.base_model, p.base_model_family, p.allow_download, p.single_file_config,
                                      base_quantization=p.base_quantization, device=p.device)
    init_state = None
    if p.init_lora:
        init_path = resolve_init_lora(p.init_lora, p.export_dir, p.output_name)
        init_state = to_peft_state(read_lora_modules(init_path, components.family, components.modules()),
                                   target_scale=lora_spec(p, components.family).scale)
        logger.info("Starting from LoRA %s (%d tensors)", init_path, len(init_state))
        tracking.set_tags({f"lora.{s}.init_from": str(init_path)})
    # One MLflow run holds every subject of a `kedro run`: each key carries the subject.
    log_lineage_tags(**{f"lora.{s}.dataset_hash": data_hash, f"lora.{s}.family": components.family.name})
    tracking.log_params({f"{s}.training.dataset_hash": data_hash, f"{s}.training.num_images": len(examples),
                         f"{s}.training.family": components.family.name,
                         f"{s}.training.optimizer_effective": p.optimizer,
                         f"{s}.training.clip_skip_effective": p.clip_skip})
    keep_tokens = p.keep_tokens if p.keep_tokens is not None else dataset_info.keep_tokens
    with StepMetricsLogger(f"{s}.train") as log_metrics:
        result = train(components, examples, p, latent_cache, dataset_hash=data_hash, keep_tokens=keep_tokens,
                       init_state=init_state, on_metrics=log_metrics, on_samples=_sample_logger(s))
    tracking.log_metrics({f"{s}.train.final_loss": result.losses[-1],
                          f"{s}.train.peak_memory_mb": result.peak_memory_mb,
                          f"{s}.train.images_per_second_mean": result.images_per_second,
                          f"{s}.train.latents_encoded": result.latents_encoded,
                          f"{s}.train.latents_cached": len(examples) - result.latents_encoded})
    if result.sample_error:  # the trainer logged it; the run's record says it too
        tracking.set_tags({f"lora.{s}.sample_error": result.sample_error[:1000]})
    sizes = sorted({(ex.width, ex.height) for ex in examples}, key=lambda s: s[0] * s[1])
    summary = ImageTrainingSummary(
        spec=result.spec, base_model=p.base_model, output_name=p.output_name, steps=result.steps,
        epochs=round(result.epochs_done, 3), seed=p.seed, learning_rate=p.learning_rate,
        text_encoder_lr=p.text_encoder_lr if p.train_text_encoder else None, dataset_hash=data_hash,
        started_at=started, finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        first_loss=result.losses[0] if result.losses else None, final_loss=result.losses[-1],
        peak_memory_mb=result.peak_memory_mb, resumed_from=result.resumed_from,
        mlflow_run_id=tracking.active_run_id(),
        num_images=sum(1 for ex in examples if not ex.is_reg), resolution=list(sizes[-1]), trigger=dataset_info.trigger,
        tag_frequency=dataset_info.tag_frequency, images_per_second=result.images_per_second,
        latents_encoded=result.latents_encoded, clip_skip=p.clip_skip, optimizer=result.optimizer,
        flip_aug=p.flip_aug, prior_loss_weight=p.prior_loss_weight,
        num_reg_images=sum(1 for ex in examples if ex.is_reg), folders=[f.model_dump() for f in dataset_info.folders],
        unet_layout=components.family.naming_layout(components.denoiser.config),
        recipe=components.family.recipe(p, components.denoiser.config),
    )
    tracking.log_dict(summary.to_json(), f"{s}/training_summary.json")
    logger.info("Trained %d steps: loss %.4f -> %.4f, %s, peak memory %.0f MB", result.steps,
                summary.first_loss or 0.0, summary.final_loss, throughput(result.images_per_second, "img"),
                result.peak_memory_mb)
    return LoraFile(result.lora_state, {"format": "lora_pipeline.training"}), summary
