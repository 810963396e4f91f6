"""llm_data node: a thin adapter over ``lora_pipeline.prep.llm_data``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from lora_pipeline.core.config import LLMDataParams
from lora_pipeline.core.errors import DataError
from lora_pipeline.core.models import load_pretrained
from lora_pipeline.pipelines.tracking import as_mlflow_metrics
from lora_pipeline.prep.llm_data import Conversation, Reject, dedupe, read_jsonl, split, tokenize

logger = logging.getLogger(__name__)


def _as_records(conversations: list[Conversation]) -> list[dict[str, Any]]:
    return [{"line": c.line, "messages": [{"role": r, "content": t} for r, t in c.messages]} for c in conversations]


def prepare_llm_data(path: Path, p: LLMDataParams):
    """Validate every line (bad ones become report rows with their line number), dedupe, token-check, split."""
    tokenizer = load_pretrained(AutoTokenizer, p.tokenizer, p.allow_download)
    good, rejects = read_jsonl(path)
    good, duplicates = dedupe(good)
    rejects += duplicates
    kept, lengths, truncated = [], {}, {}
    for conv in tqdm(good, desc="tokenizing", unit="line", leave=False):
        item = tokenize(tokenizer, conv, p.template, p.max_length, p.overlong)
        if item is None:
            rejects.append(Reject(conv.line, f"longer than max_length={p.max_length} tokens "
                                             f"(set overlong: truncate to keep it)"))
            continue
        lengths[conv.line] = len(item["input_ids"])
        truncated[conv.line] = item["truncated_from"]
        kept.append(conv)
    if not kept:
        raise DataError(f"No usable samples in {path} ({len(rejects)} rejected). See "
                        f"data/08_reporting/llm_data_report.csv for each line's reason.")
    train, validation = split(kept, p.validation_fraction, p.salt)
    if p.validation_fraction and not validation:
        logger.warning("No example fell into the validation split (%d examples, validation_fraction %s); raise "
                       "validation_fraction to measure the adapter on held-out prompts.", len(kept),
                       p.validation_fraction)
    val_lines = {c.line for c in validation}
    rows = [{"line": c.line, "status": "validation" if c.line in val_lines else "train", "reason": "",
             "tokens": lengths[c.line], "truncated_from": truncated[c.line],
             "note": f"truncated from {truncated[c.line]} tokens" if truncated[c.line] else ""} for c in kept]
    rows += [{"line": r.line, "status": "rejected", "reason": r.reason, "tokens": 0, "truncated_from": 0,
              "note": ""} for r in rejects]
    n_truncated = sum(1 for n in truncated.values() if n)
    if n_truncated:
        logger.warning("%d of %d examples are longer than max_length=%d tokens and were cut (the report's "
                       "'truncated_from' column). Raise llm_data.max_length, or set overlong: reject to leave "
                       "them out.", n_truncated, len(kept), p.max_length)
    report = pd.DataFrame(rows).sort_values("line").reset_index(drop=True)
    for r in rejects:
        logger.warning("%s, line %d: %s", path, r.line, r.reason)
    token_counts = pd.Series(list(lengths.values()))
    metrics = {"samples_in": len(kept) + len(rejects), "train": len(train), "validation": len(validation),
               "rejected": len(rejects), "truncated": n_truncated, "tokens_mean": float(token_counts.mean()),
               "tokens_max": float(token_counts.max())}
    logger.info("LLM data: %d train, %d validation, %d rejected, %d truncated; tokens mean %.0f, max %.0f",
                len(train), len(validation), len(rejects), n_truncated, metrics["tokens_mean"], metrics["tokens_max"])
    return _as_records(train), _as_records(validation), report, as_mlflow_metrics(metrics)

