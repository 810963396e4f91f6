"""llm_training node: a thin adapter over ``lora_pipeline.llm.training``."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

from tqdm.auto import tqdm

from lora_pipeline.core.config import LLMDataParams, LLMTrainingParams
from lora_pipeline.core.files import json_sha256
from lora_pipeline.core.spec import LLMTrainingSummary, LoraFile
from lora_pipeline.llm.training import (
    llm_lora_spec,
    load_causal_lm,
    load_init_adapter,
    resolve_init_adapter,
    train_causal_lm,
)
from lora_pipeline.pipelines import tracking
from lora_pipeline.pipelines.tracking import StepMetricsLogger, log_lineage_tags
from lora_pipeline.prep.llm_data import parse_record, tokenize

logger = logging.getLogger(__name__)


def tokenized(records: list[dict[str, Any]], tokenizer, data: LLMDataParams) -> list[dict[str, Any]]:
    return [tokenize(tokenizer, parse_record(record, record["line"]), data.template, data.max_length, "truncate")
            for record in tqdm(records, desc="tokenizing", unit="line", leave=False)]


def records_hash(records: list[dict[str, Any]]) -> str:
    return json_sha256(records, ensure_ascii=False)


def train_llm_lora(train: list[dict[str, Any]], validation: list[dict[str, Any]], data: LLMDataParams,
                   p: LLMTrainingParams) -> tuple[LoraFile, LLMTrainingSummary]:
    """Fine-tune; returns the adapter weights and the typed summary (LoRA spec, losses, tokens/s)."""
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    model, tokenizer = load_causal_lm(p.base_model, p.allow_download, p.quantize_4bit)
    train_items, val_items = tokenized(train, tokenizer, data), tokenized(validation, tokenizer, data)
    data_hash = records_hash(train + validation)
    init_state, init_from = None, None
    if p.init_adapter:
        folder = resolve_init_adapter(p.init_adapter, p.export_dir, p.output_name)
        init_state, init_from = load_init_adapter(folder, llm_lora_spec(p), p.base_model), str(folder)
        logger.info("Continuing from adapter %s (%d tensors)", folder, len(init_state))
    truncated = sum(1 for item in train_items + val_items if item["truncated_from"])
    log_lineage_tags(**{"llm.dataset_hash": data_hash, "llm.init_from": init_from})
    tracking.log_params({"llm.dataset_hash": data_hash, "llm.train_samples": len(train_items),
                         "llm.validation_samples": len(val_items), "llm.truncated_samples": truncated})
    # every effective setting, defaults included (kedro-mlflow logs only what the YAML lists)
    tracking.log_params({f"llm.effective.{k}": v for k, v in {**p.model_dump(), **{
        f"data.{k}": v for k, v in data.model_dump().items()}}.items()})
    base_eval = None
    if val_items:
        from lora_pipeline.llm.training import eval_loss

        base_eval = eval_loss(model, val_items, tokenizer.pad_token_id)
    with StepMetricsLogger("llm") as log_metrics:
        result = train_causal_lm(model, tokenizer, train_items, val_items, p, dataset_hash=data_hash,
                                 on_metrics=log_metrics, init_state=init_state, init_from=init_from)
    summary = LLMTrainingSummary(
        spec=result.spec, base_model=p.base_model, output_name=p.output_name, steps=result.steps,
        epochs=round(result.steps * p.batch_size * p.gradient_accumulation_steps / max(len(train_items), 1), 3),
        seed=p.seed, learning_rate=p.learning_rate, dataset_hash=data_hash, started_at=started,
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), first_loss=result.losses[0],
        final_loss=result.losses[-1], peak_memory_mb=result.peak_memory_mb, resumed_from=result.resumed_from,
        mlflow_run_id=tracking.active_run_id(),
        train_samples=len(train_items), validation_samples=len(val_items), eval_loss_base=base_eval,
        eval_losses=result.eval_losses, tokens_per_second=result.tokens_per_second, init_from=init_from,
        truncated_samples=truncated,
    )
    tracking.log_metrics({"llm.tokens_per_second_mean": result.tokens_per_second,
                          "llm.peak_memory_mb": result.peak_memory_mb})
    tracking.log_dict(summary.to_json(), "llm_training_summary.json")
    logger.info("LLM LoRA: eval loss %s -> %s, %.0f tokens/s", base_eval,
                result.eval_losses[-1] if result.eval_losses else None, result.tokens_per_second)
    return LoraFile(result.adapter, {"format": "peft"}), summary
