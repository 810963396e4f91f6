"""Export nodes: thin adapters over ``lora_pipeline.diffusion.lora_files`` and ``model_card``."""

from __future__ import annotations

import logging
from pathlib import Path

from lora_pipeline.core.config import ExportParams
from lora_pipeline.core.spec import DiffusersLora, ImageTrainingSummary, LoraFile
from lora_pipeline.datasets.files import disk_full_is_one_message
from lora_pipeline.diffusion.lora_files import (
    build_kohya_file,
    project_identity,
    save_lora_file,
    stringify_metadata,
    webui_copy_path,
)
from lora_pipeline.diffusion.model_card import model_card
from lora_pipeline.pipelines import tracking
from lora_pipeline.pipelines.tracking import log_lineage_tags

logger = logging.getLogger(__name__)


def _base_name(summary: ImageTrainingSummary, p: ExportParams) -> str:
    return p.base_model_name or Path(summary.base_model).name


def export_kohya(lora_weights: LoraFile, training_summary: ImageTrainingSummary, p: ExportParams) -> LoraFile:
    """The WebUI/ComfyUI file: the family's kohya names, training alpha, ``ss_*``/``modelspec.*`` header."""
    title = training_summary.output_name
    state, metadata = build_kohya_file(lora_weights.state, training_summary, training_summary.unet_config(),
                                       p.precision, title, _base_name(training_summary, p))
    metadata["lora_pipeline.training_run_id"] = training_summary.mlflow_run_id
    metadata["lora_pipeline.subject"] = title  # with the project: this checkout's export of this subject
    metadata["lora_pipeline.project"] = project_identity(Path.cwd())  # Kedro runs nodes at the project root
    # `lora-pipeline lineage <file>` finds this run from the file's sshs_model_hash.
    log_lineage_tags(**{f"lora.{title}.sshs_model_hash": metadata["sshs_model_hash"],
                        f"lora.{title}.dataset_hash": training_summary.dataset_hash})
    if p.webui_lora_dir:
        target, note = webui_copy_path(p.webui_lora_dir, title, metadata["sshs_model_hash"],
                                       metadata["lora_pipeline.project"])
        if note:
            logger.warning(note)
        with disk_full_is_one_message():  # a node's error reaches the console as is: one message, no traceback
            save_lora_file(target, state, metadata)
        logger.info("Copied the LoRA into %s: use <lora:%s:0.8> in a prompt", target, target.stem)
    size_mb = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
    logger.info("kohya LoRA %s (%s): %d modules, %.2f MB (%s), hash %s", title, training_summary.family,
                len(state) // 3, size_mb, p.precision, metadata["sshs_model_hash"][:12])
    return LoraFile(state, stringify_metadata(metadata))  # the header as the file holds it: strings


def export_diffusers(lora_weights: LoraFile, training_summary: ImageTrainingSummary) -> DiffusersLora:
    """diffusers' ``pytorch_lora_weights.safetensors`` with adapter metadata (alpha survives a reload)."""
    return DiffusersLora(lora_weights, training_summary)


def write_model_card(training_summary: ImageTrainingSummary, p: ExportParams) -> str:
    """README.md for the LoRA: base model, trigger, tags, parameters, usage in WebUI, ComfyUI, diffusers."""
    title = training_summary.output_name
    card = model_card(training_summary, title, f"{title}.safetensors", _base_name(training_summary, p), [])
    tracking.log_text(card, f"lora/{title}_README.md")
    return card
