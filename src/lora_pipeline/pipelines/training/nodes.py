"""Training node: a thin adapter from catalog entries to ``lora_pipeline.lora.training.train``."""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from lora_pipeline.config import TrainingParams, parse_params
from lora_pipeline.datasets.image_folder import ImageFolder
from lora_pipeline.errors import DataError
from lora_pipeline.lora.cache import DiskCache
from lora_pipeline.lora.export import load_lora_for_training
from lora_pipeline.lora.files import sha256_file
from lora_pipeline.lora.prompts import lora_index
from lora_pipeline.lora.sd import load_sd
from lora_pipeline.lora.training import Example, train
from lora_pipeline.pipelines.metrics import StepMetricsLogger, log_lineage_tags

logger = logging.getLogger(__name__)


def build_examples(images: ImageFolder, metadata: pd.DataFrame) -> list[Example]:
    """One :class:`Example` per ``metadata.csv`` row; every listed file must exist."""
    if metadata.empty:
        raise DataError("metadata.csv lists no images. Run `kedro run --pipelines normalization` first.")
    missing = [name for name in metadata.file_name if not images.path(name).is_file()]
    if missing:
        raise DataError(f"metadata.csv lists {len(missing)} file(s) missing from {images.root}, e.g. "
                        f"{missing[0]}. Re-run the normalization pipeline.")
    return [Example(images.path(row.file_name), str(row.text), int(row.width), int(row.height),
                    sha256_file(images.path(row.file_name))) for row in metadata.itertuples()]


def resolve_init_lora(p: TrainingParams) -> Path:
    """``init_lora: latest`` -> the newest exported version of ``output_name``; else the path as given."""
    if p.init_lora != "latest":
        return Path(p.init_lora)
    found = lora_index([p.export_dir]).get(p.output_name)
    if found is None:
        raise DataError(f"init_lora: latest, but {p.export_dir} has no export of '{p.output_name}' yet. Train and "
                        f"export once (kedro run), or set init_lora: null.")
    return found


def dataset_hash(examples: list[Example]) -> str:
    """Content hash of the training set: image bytes and captions, order-independent."""
    digest = hashlib.sha256()
    for ex in sorted(examples, key=lambda e: (e.sha256, e.text)):
        digest.update(f"{ex.sha256}|{ex.text}\n".encode())
    return digest.hexdigest()


def _log_samples(images: list[Any], step: int) -> None:
    if mlflow.active_run():
        for index, image in enumerate(images):
            mlflow.log_image(image, f"samples/step_{step:06d}_{index}.png")


def train_lora(
    normalized_images: ImageFolder,
    train_metadata: pd.DataFrame,
    dataset_info: dict[str, Any],
    latent_cache: DiskCache,
    params: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train a LoRA; returns the weights (training layout) and a summary for export and the model card."""
    p = parse_params(TrainingParams, params, "training")
    examples = build_examples(normalized_images, train_metadata)
    data_hash = dataset_hash(examples)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    sd = load_sd(p.base_model, p.allow_download, p.single_file_config)
    init_state = None
    if p.init_lora:
        init_path = resolve_init_lora(p)
        init_state = load_lora_for_training(
            init_path, [n for n, _ in sd.unet.named_modules()], [n for n, _ in sd.text_encoder.named_modules()],
            p.alpha, p.lora_rank)
        logger.info("Starting from LoRA %s (%d tensors)", init_path, len(init_state))
        if mlflow.active_run():
            mlflow.set_tag("lora.init_from", str(init_path))
    log_lineage_tags(**{"lora.dataset_hash": data_hash})
    if mlflow.active_run():
        mlflow.log_params({"training.dataset_hash": data_hash, "training.num_images": len(examples)})
    keep_tokens = p.keep_tokens if p.keep_tokens is not None else int(dataset_info.get("keep_tokens", 0))
    with StepMetricsLogger("train") as log_metrics:
        result = train(sd, examples, p, latent_cache, dataset_hash=data_hash, keep_tokens=keep_tokens,
                       init_state=init_state, on_metrics=log_metrics, on_samples=_log_samples)
    if mlflow.active_run():
        mlflow.log_metrics({"train.final_loss": result.losses[-1], "train.peak_memory_mb": result.peak_memory_mb,
                            "train.images_per_second_mean": result.images_per_second,
                            "train.latents_encoded": result.latents_encoded,
                            "train.latents_cached": len(examples) - result.latents_encoded})
    sizes = sorted({(ex.width, ex.height) for ex in examples}, key=lambda s: s[0] * s[1])
    summary = {
        **p.model_dump(include={"base_model", "lora_rank", "alpha", "dropout", "unet_targets", "train_text_encoder",
                                "text_encoder_targets", "learning_rate", "text_encoder_lr", "seed", "output_name"}),
        "steps": result.steps, "epochs": round(result.epochs_done, 3), "num_images": len(examples),
        "resolution": list(sizes[-1]), "trigger": dataset_info.get("trigger", ""),
        "tag_frequency": dataset_info.get("tag_frequency", {}), "dataset_hash": data_hash,
        "started_at": started, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "final_loss": result.losses[-1], "first_loss": result.losses[0] if result.losses else None,
        "images_per_second": result.images_per_second, "peak_memory_mb": result.peak_memory_mb,
        "resumed_from": result.resumed_from, "latents_encoded": result.latents_encoded,
        "mlflow_run_id": mlflow.active_run().info.run_id if mlflow.active_run() else None,
    }
    if mlflow.active_run():
        mlflow.log_dict(summary, "training_summary.json")
    logger.info("Trained %d steps: loss %.4f -> %.4f, %.1f img/s, peak memory %.0f MB", result.steps,
                summary["first_loss"] or 0.0, summary["final_loss"], result.images_per_second, result.peak_memory_mb)
    return {"state": result.lora_state, "metadata": {"format": "lora_pipeline.training"}}, summary
