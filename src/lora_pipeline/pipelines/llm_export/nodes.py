"""llm_export nodes: PEFT adapter (+ tokenizer) and optional merged model, both through save_pretrained.

The adapter's rank, alpha, dropout, targets and base model come from the training summary: parameters
edited after training must not change what was trained.
"""

from __future__ import annotations

import logging

from lora_pipeline.core.config import LLMTrainingParams
from lora_pipeline.core.spec import LLMTrainingSummary, LoraFile, PretrainedFolder
from lora_pipeline.llm.training import load_causal_lm, portable_base, with_adapter

logger = logging.getLogger(__name__)


# Loader flags that transformers copies into tokenizer_config.json; another machine must not inherit them.
LOADER_FLAGS = ("local_files_only", "is_local", "_commit_hash", "cache_dir", "force_download", "token")


def _trained_model(weights: LoraFile, summary: LLMTrainingSummary, p: LLMTrainingParams):
    # the summary says what was trained; the parameters only how to load the base (allow_download)
    model, tokenizer = load_causal_lm(summary.base_model, p.allow_download)
    for flag in LOADER_FLAGS:
        tokenizer.init_kwargs.pop(flag, None)
    peft_model = with_adapter(model, summary.spec, weights.state)
    # An absolute path (or the hub id), so AutoPeftModelForCausalLM finds the base from any folder.
    peft_model.peft_config["default"].base_model_name_or_path = portable_base(summary.base_model)
    return peft_model, tokenizer


def export_llm_adapter(weights: LoraFile, summary: LLMTrainingSummary, p: LLMTrainingParams):
    """``adapter_model.safetensors`` + ``adapter_config.json`` (+ tokenizer) and a model card."""
    peft_model, tokenizer = _trained_model(weights, summary, p)
    spec = summary.spec
    card = f"""# {summary.output_name}

A LoRA adapter (PEFT) for `{summary.base_model}`, trained with lora-pipeline on
{summary.train_samples} prompt/response pairs ({summary.steps} steps, rank {spec.rank},
alpha {spec.alpha}, dropout {spec.dropout}, targets `{spec.targets['model']}`).
Loss on the response tokens only. Validation loss: base {summary.eval_loss_base}, adapter
{summary.eval_losses[-1] if summary.eval_losses else None}. Dataset hash `{summary.dataset_hash}`.
{f"Continued from the adapter `{summary.init_from}`." if summary.init_from else "Trained from a new adapter."}
{summary.truncated_samples} sample(s) were longer than max_length and cut. MLflow run `{summary.mlflow_run_id}`.

**llama.cpp**: convert this folder to a GGUF LoRA with llama.cpp's `convert_lora_to_gguf.py` (needs the
`gguf` package and the base model's Hugging Face folder):
`python convert_lora_to_gguf.py --base {portable_base(summary.base_model)} --outtype f16 path/to/this/folder`,
then `llama-cli -m base.gguf --lora this-adapter.gguf`.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained("{summary.base_model}")
model = PeftModel.from_pretrained(base, "path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```
"""
    # the adapter folder's README.md (and so its copy in MLflow) is this card, not PEFT's empty template
    return PretrainedFolder((peft_model, tokenizer), card), card


def export_llm_merged(weights: LoraFile, summary: LLMTrainingSummary, p: LLMTrainingParams):
    """``merge_and_unload`` into a plain model folder (safetensors) that needs no PEFT to load."""
    peft_model, tokenizer = _trained_model(weights, summary, p)
    return peft_model.merge_and_unload(), tokenizer
