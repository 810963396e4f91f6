"""llm_eval node: the exported adapter (reloaded with PeftModel.from_pretrained) against its base model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow

from lora_pipeline.config import LLMDataParams, LLMEvalParams, LLMTrainingParams, parse_params
from lora_pipeline.llm.constrained import JsonConstraint, parses
from lora_pipeline.llm.training import eval_loss, generate_answers, load_causal_lm, token_f1
from lora_pipeline.pipelines.llm_training.nodes import tokenized
from lora_pipeline.pipelines.metrics import as_mlflow_metrics
from lora_pipeline.prep.llm_data import parse_record

logger = logging.getLogger(__name__)


def evaluate_llm(validation: list[dict[str, Any]], adapter_dir: Path, data_params: dict[str, Any],
                 train_params: dict[str, Any], params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    from peft import PeftModel

    data = parse_params(LLMDataParams, data_params, "llm_data")
    t = parse_params(LLMTrainingParams, train_params, "llm_training")
    p = parse_params(LLMEvalParams, params, "llm_eval")
    conversations = [parse_record(r, r["line"]) for r in validation][: p.max_prompts]
    prompts = [conv.messages[-2][1] for conv in conversations]
    references = [conv.response for conv in conversations]
    json_prompts = p.json_prompts or prompts
    figures: dict[str, float] = {}
    answers: dict[str, list[str]] = {}
    for label in ("base", "adapter"):
        model, tokenizer = load_causal_lm(t.base_model, t.allow_download)
        if label == "adapter":
            model = PeftModel.from_pretrained(model, str(adapter_dir))
        items = tokenized(validation, tokenizer, data)
        if items:
            figures[f"eval_loss_{label}"] = eval_loss(model, items, tokenizer.pad_token_id)
        answers[label] = generate_answers(model, tokenizer, prompts, p.max_new_tokens)
        figures[f"exact_match_{label}"] = sum(a == r for a, r in zip(answers[label], references)) / max(len(prompts), 1)
        figures[f"token_f1_{label}"] = sum(token_f1(a, r) for a, r in zip(answers[label], references)) / max(
            len(prompts), 1)
        free = generate_answers(model, tokenizer, json_prompts, p.max_new_tokens)
        constraint = JsonConstraint(tokenizer, model.config.vocab_size, p.json_schema)
        constrained = generate_answers(model, tokenizer, json_prompts, max(p.max_new_tokens, 256), constraint)
        figures[f"json_valid_rate_unconstrained_{label}"] = sum(parses(a, p.json_schema) for a in free) / len(free)
        figures[f"json_valid_rate_constrained_{label}"] = sum(parses(a, p.json_schema) for a in constrained) / len(
            constrained)
        answers[f"json_{label}"] = constrained
    report = _report(t, figures, prompts, references, answers)
    if mlflow.active_run():
        mlflow.log_text(report, "llm_eval/report.md")
    logger.info("LLM eval: %s", ", ".join(f"{k}={v:.4f}" for k, v in figures.items()))
    return report, as_mlflow_metrics(figures)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:200]


def _report(t: LLMTrainingParams, figures: dict[str, float], prompts, references, answers) -> str:
    table = "\n".join(f"| {k} | {v:.4f} |" for k, v in figures.items())
    rows = "\n".join(f"| {_cell(p)} | {_cell(r)} | {_cell(b)} | {_cell(a)} |"
                     for p, r, b, a in zip(prompts, references, answers["base"], answers["adapter"]))
    json_rows = "\n".join(f"| {_cell(p)} | {_cell(a)} |" for p, a in zip(prompts, answers["json_adapter"]))
    return f"""# LLM adapter evaluation: {t.output_name}

Base `{t.base_model}`; LoRA rank {t.lora_rank}, alpha {t.alpha}. Greedy decoding.

| figure | value |
| --- | --- |
{table}

## Held-out prompts, side by side

| prompt | reference | base | adapter |
| --- | --- | --- | --- |
{rows}

## JSON mode (constrained with xgrammar)

| prompt | adapter output |
| --- | --- |
{json_rows}
"""
