"""llm_export nodes: PEFT adapter (+ tokenizer) and optional merged model, both through save_pretrained."""

from __future__ import annotations

import logging
from typing import Any

from lora_pipeline.config import LLMTrainingParams, parse_params
from lora_pipeline.lora.llm import load_causal_lm, with_adapter

logger = logging.getLogger(__name__)


def export_llm_adapter(weights: dict[str, Any], summary: dict[str, Any], params: dict[str, Any]):
    """``adapter_model.safetensors`` + ``adapter_config.json`` (+ tokenizer) and a model card."""
    p = parse_params(LLMTrainingParams, params, "llm_training")
    model, tokenizer = load_causal_lm(p.base_model, p.allow_download)
    peft_model = with_adapter(model, p, weights["state"])
    eval_losses = summary.get("eval_losses") or []
    card = f"""# {summary['output_name']}

A LoRA adapter (PEFT) for `{summary['base_model']}`, trained with lora-pipeline on
{summary['train_samples']} prompt/response pairs ({summary['steps']} steps, rank {summary['lora_rank']},
alpha {summary['alpha']}, dropout {summary['dropout']}, targets `{summary['target_modules']}`).
Loss on the response tokens only. Validation loss: base {summary.get('eval_loss_base')}, adapter
{eval_losses[-1] if eval_losses else None}. Dataset hash `{summary['dataset_hash']}`.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained("{summary['base_model']}")
model = PeftModel.from_pretrained(base, "path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```
"""
    return (peft_model, tokenizer), card


def export_llm_merged(weights: dict[str, Any], params: dict[str, Any]):
    """``merge_and_unload`` into a plain model folder (safetensors) that needs no PEFT to load."""
    p = parse_params(LLMTrainingParams, params, "llm_training")
    model, tokenizer = load_causal_lm(p.base_model, p.allow_download)
    return with_adapter(model, p, weights["state"]).merge_and_unload(), tokenizer
