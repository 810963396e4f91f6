"""llm_export nodes: PEFT adapter (+ tokenizer) and optional merged model, both through save_pretrained.

The adapter's rank, alpha, dropout, targets and base model come from the training summary: parameters
edited after training must not change what was trained.
"""

from __future__ import annotations

import logging
from typing import Any

from lora_pipeline.config import LLMTrainingParams, parse_params
from lora_pipeline.core.spec import TrainingSummary
from lora_pipeline.llm.training import load_causal_lm, with_adapter

logger = logging.getLogger(__name__)


def _trained_model(weights: dict[str, Any], summary: TrainingSummary, params: dict[str, Any]):
    p = parse_params(LLMTrainingParams, params, "llm_training")  # only how to load: allow_download
    model, tokenizer = load_causal_lm(summary.base_model, p.allow_download)
    return with_adapter(model, summary.spec, weights["state"]), tokenizer


def export_llm_adapter(weights: dict[str, Any], summary: TrainingSummary, params: dict[str, Any]):
    """``adapter_model.safetensors`` + ``adapter_config.json`` (+ tokenizer) and a model card."""
    peft_model, tokenizer = _trained_model(weights, summary, params)
    spec = summary.spec
    card = f"""# {summary.output_name}

A LoRA adapter (PEFT) for `{summary.base_model}`, trained with lora-pipeline on
{summary.train_samples} prompt/response pairs ({summary.steps} steps, rank {spec.rank},
alpha {spec.alpha}, dropout {spec.dropout}, targets `{spec.targets['model']}`).
Loss on the response tokens only. Validation loss: base {summary.eval_loss_base}, adapter
{summary.eval_losses[-1] if summary.eval_losses else None}. Dataset hash `{summary.dataset_hash}`.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained("{summary.base_model}")
model = PeftModel.from_pretrained(base, "path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```
"""
    return (peft_model, tokenizer), card


def export_llm_merged(weights: dict[str, Any], summary: TrainingSummary, params: dict[str, Any]):
    """``merge_and_unload`` into a plain model folder (safetensors) that needs no PEFT to load."""
    peft_model, tokenizer = _trained_model(weights, summary, params)
    return peft_model.merge_and_unload(), tokenizer
