"""llm_eval node: the exported adapter (reloaded with PeftModel.from_pretrained) against its base model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lora_pipeline.core.config import LLMDataParams, LLMEvalParams, LLMTrainingParams
from lora_pipeline.core.spec import LLMTrainingSummary
from lora_pipeline.llm.constrained import JsonConstraint, check_schema, parses, schema_errors
from lora_pipeline.llm.training import eval_loss, generate_answers, load_causal_lm, token_f1
from lora_pipeline.pipelines import tracking
from lora_pipeline.pipelines.llm_training.nodes import tokenized
from lora_pipeline.pipelines.tracking import as_mlflow_metrics
from lora_pipeline.prep.llm_data import parse_record

logger = logging.getLogger(__name__)


def evaluate_llm(validation: list[dict[str, Any]], adapter_dir: Path, summary: LLMTrainingSummary,
                 data: LLMDataParams, t: LLMTrainingParams, p: LLMEvalParams) -> tuple[str, dict[str, Any]]:
    """Base vs adapter on the validation split: loss, exact match, token F1, and the JSON-valid rate
    (``jsonschema``) of free and constrained answers to ``json_prompts``; a markdown report pairs each output
    with the prompt that produced it.

    The base model, rank and alpha are the training summary's; ``t`` says only how to load the base
    (``allow_download``), so parameters edited after training do not change what is evaluated."""
    from peft import PeftModel

    check_schema(p.json_schema)
    conversations = [parse_record(r, r["line"]) for r in validation][: p.max_prompts]
    prompts = [conv.prompt_messages for conv in conversations]
    references = [conv.response for conv in conversations]
    json_prompts = list(p.json_prompts) or [conv.messages[-2][1] for conv in conversations]
    figures: dict[str, float] = {}
    answers: dict[str, list[str]] = {}
    for label in ("base", "adapter"):
        model, tokenizer = load_causal_lm(summary.base_model, t.allow_download)
        if label == "adapter":
            model = PeftModel.from_pretrained(model, str(adapter_dir))
        items = tokenized(validation, tokenizer, data)
        if items:
            figures[f"eval_loss_{label}"] = eval_loss(model, items, tokenizer.pad_token_id)
        answers[label] = generate_answers(model, tokenizer, prompts, p.max_new_tokens, template=data.template)
        figures[f"exact_match_{label}"] = sum(a == r for a, r in zip(answers[label], references)) / max(len(prompts), 1)
        figures[f"token_f1_{label}"] = sum(token_f1(a, r) for a, r in zip(answers[label], references)) / max(
            len(prompts), 1)
        # the same prompt formatting and token budget with and without the constraint
        free = generate_answers(model, tokenizer, json_prompts, p.max_new_tokens, template=data.template)
        constraint = JsonConstraint(tokenizer, model.config.vocab_size, p.json_schema)
        constrained = generate_answers(model, tokenizer, json_prompts, p.max_new_tokens, constraint, data.template)
        for mode, outputs in (("unconstrained", free), ("constrained", constrained)):
            figures[f"json_valid_rate_{mode}_{label}"] = sum(parses(a, p.json_schema) for a in outputs) / len(outputs)
            answers[f"json_{mode}_{label}"] = outputs
    report = _report(summary, p, figures, [conv.messages[-2][1] for conv in conversations], references, answers,
                     json_prompts)
    tracking.log_text(report, "llm_eval/report.md")
    logger.info("LLM eval: %s", ", ".join(f"{k}={v:.4f}" for k, v in figures.items()))
    return report, as_mlflow_metrics(figures)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:200]


def _report(summary: LLMTrainingSummary, p: LLMEvalParams, figures: dict[str, float], prompts, references, answers,
            json_prompts) -> str:
    table = "\n".join(f"| {k} | {v:.4f} |" for k, v in figures.items())
    rows = "\n".join(f"| {_cell(q)} | {_cell(r)} | {_cell(b)} | {_cell(a)} |"
                     for q, r, b, a in zip(prompts, references, answers["base"], answers["adapter"]))

    def verdict(text: str) -> str:
        problem = schema_errors(text, p.json_schema)
        return "valid" if not problem else _cell(problem)

    json_rows = "\n".join(
        f"| {_cell(q)} | {_cell(free)} | {verdict(free)} | {_cell(constrained)} | {verdict(constrained)} |"
        for q, free, constrained in zip(json_prompts, answers["json_unconstrained_adapter"],
                                        answers["json_constrained_adapter"]))
    schema = "the JSON Schema in llm_eval.json_schema" if p.json_schema else "any JSON object"
    return f"""# LLM adapter evaluation: {summary.output_name}

Base `{summary.base_model}`; LoRA rank {summary.spec.rank}, alpha {summary.spec.alpha} (as trained). Greedy decoding,
at most {p.max_new_tokens} new tokens, prompts formatted as in training.

| figure | value |
| --- | --- |
{table}

## Held-out prompts, side by side

| prompt | reference | base | adapter |
| --- | --- | --- | --- |
{rows}

## JSON mode: the adapter's answers, free and constrained with xgrammar, validated against {schema}

| prompt | free output | valid? | constrained output | valid? |
| --- | --- | --- | --- | --- |
{json_rows}
"""
