"""LoRA fine-tuning of causal LMs (PEFT): loss on response tokens only, per-epoch eval, exact resume.

Plain Python, no Kedro. Determinism follows the image trainer: every micro-step seeds its own RNG from
``(seed, micro_step)``, so a resumed run needs only weights, optimizer, scheduler and step.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from lora_pipeline.core.checkpoints import run_signature
from lora_pipeline.core.config import LLMTrainingParams
from lora_pipeline.core.files import versions
from lora_pipeline.core.models import load_pretrained
from lora_pipeline.core.spec import LoraSpec
from lora_pipeline.core.trainer import (
    TrainerCore,
    derive_seed,
    enable_activation_checkpointing,
    make_accelerator,
    make_adamw,
    optimizer_step,
    peak_memory_mb,
)
from lora_pipeline.prep.llm_data import pack, pad_batch, pad_packed_batch, prompt_ids, user_prompt

logger = logging.getLogger(__name__)

# What must match for a checkpoint to continue a run, besides base model, data and LoRA spec (the rule:
# core.checkpoints.run_signature).
SIGNATURE_SETTINGS = ("batch_size", "learning_rate", "lr_scheduler", "lr_warmup_steps", "seed",
                      "gradient_accumulation_steps", "packing", "pack_length")


def load_causal_lm(name: str, allow_download: bool = False, quantize_4bit: bool = False):
    """Model + tokenizer through the one loader; 4-bit (QLoRA) only where bitsandbytes and CUDA exist."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = load_pretrained(AutoTokenizer, name, allow_download)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # Llama-2 tokenizers ship without a pad token
    kwargs: dict[str, Any] = {}
    if quantize_4bit:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig

            if torch.cuda.is_available():
                kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                   bnb_4bit_compute_dtype=torch.bfloat16)
        except ImportError:
            pass
        if not kwargs:
            logger.warning("quantize_4bit needs bitsandbytes and CUDA; loading the base model unquantized")
    return load_pretrained(AutoModelForCausalLM, name, allow_download, **kwargs), tokenizer


def llm_lora_spec(params: LLMTrainingParams) -> LoraSpec:
    """The adapter this run trains; export reads it back from the training summary, never from params."""
    return LoraSpec(family="causal_lm", rank=params.lora_rank, alpha=params.alpha, dropout=params.dropout,
                    targets={"model": params.target_modules})


def with_adapter(model, spec: LoraSpec, state: dict[str, torch.Tensor] | None = None, seed: int = 0):
    """Wrap ``model`` in a PeftModel with ``spec``'s LoRA config, optionally loading adapter weights."""
    from peft import get_peft_model
    from peft.utils import set_peft_model_state_dict

    torch.manual_seed(seed)  # lora_A's initial values come from the global RNG
    peft_model = get_peft_model(model, spec.peft_config("model", task_type="CAUSAL_LM"))
    if state is not None:
        try:
            result = set_peft_model_state_dict(peft_model, state)
        except RuntimeError as exc:  # a shape mismatch: another base model or architecture
            raise ValueError(f"the adapter's weights do not fit this model ({str(exc).splitlines()[0]}); was it "
                             f"trained on another base model?") from None
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"adapter keys do not match this model, e.g. {result.unexpected_keys[0]}; check "
                             f"llm_training.target_modules and the base model")
    return peft_model


def resolve_init_adapter(init_adapter: str, export_dir: str, output_name: str) -> Path:
    """``latest`` -> the newest exported version of ``<output_name>_adapter``; else the folder as given."""
    from lora_pipeline.core.errors import DataError

    if init_adapter != "latest":
        folder = Path(init_adapter)
        if not (folder / "adapter_config.json").is_file():
            raise DataError(f"init_adapter {folder} is not a PEFT adapter folder (no adapter_config.json). Give the "
                            f"folder of an exported adapter, 'latest', or null.")
        return folder
    root = Path(export_dir) / f"{output_name}_adapter"
    complete = [folder for folder in versions(root) if (folder / "adapter_config.json").is_file()]
    if not complete:
        raise DataError(f"init_adapter: latest, but {root} holds no exported adapter yet. Run the LLM pipelines once "
                        f"(kedro run --pipelines llm), or set init_adapter: null.")
    return complete[-1]


def portable_base(name_or_path: str) -> str:
    """A base model reference that works from any folder: an absolute path when it is local, else the hub id."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def load_init_adapter(folder: Path, spec: LoraSpec, base_model: str) -> dict[str, torch.Tensor]:
    """An earlier adapter's weights, checked against this run's base model and rank, with its alpha/r folded
    into ``lora_B`` for this run's alpha/r (so the model computes exactly what the earlier adapter did)."""
    import json

    from safetensors.torch import load_file

    from lora_pipeline.core.errors import ConfigError, DataError
    from lora_pipeline.core.spec import rescale_up

    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    recorded = config.get("base_model_name_or_path")
    if recorded and portable_base(recorded) != portable_base(base_model):
        raise ConfigError(f"init_adapter {folder} was trained on base model {recorded}, this run's base is "
                          f"{base_model}: an adapter only fits the base it was trained on. Use that base, or set "
                          f"init_adapter: null to train a new adapter.")
    if int(config.get("r", spec.rank)) != spec.rank:
        raise ConfigError(f"init_adapter {folder} has rank {config['r']}, llm_training.lora_rank is {spec.rank}; "
                          f"set lora_rank: {config['r']} to continue it.")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise DataError(f"init_adapter {folder} has no adapter_model.safetensors; export it again.")
    state = load_file(str(weights))
    from_scale = float(config.get("lora_alpha", spec.rank)) / spec.rank
    return {k: rescale_up(v.float(), from_scale, spec.scale) if ".lora_B." in k else v.float()
            for k, v in state.items()}


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in get_peft_model_state_dict(peft_model).items()}


@torch.no_grad()
def eval_loss(model, items: Sequence[dict[str, list[int]]], pad_id: int, batch_size: int = 8) -> float:
    """Mean loss per response token over ``items`` (prompt and padding masked)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in pad_batch(items[start:start + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                                 shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
        total += float(loss)
        tokens += int((shift_labels != -100).sum())
    model.train(was_training)
    return total / max(tokens, 1)


@dataclass
class LLMTrainResult:
    adapter: dict[str, torch.Tensor]
    spec: LoraSpec
    losses: list[float]
    eval_losses: list[float]
    steps: int
    tokens_per_second: float
    peak_memory_mb: float
    resumed_from: str | None


def train_causal_lm(
    model, tokenizer, train_items: Sequence[dict[str, list[int]]], val_items: Sequence[dict[str, list[int]]],
    params: LLMTrainingParams, *, dataset_hash: str,
    on_metrics: Callable[[dict[str, float], int], None] | None = None,
    step_callback: Callable[[int, Any], None] | None = None,
    init_state: dict[str, torch.Tensor] | None = None, init_from: str | None = None,
) -> LLMTrainResult:
    """Fine-tune ``model`` with a LoRA; ``init_state`` (from :func:`load_init_adapter`) continues an earlier
    adapter instead of starting a new one."""
    from transformers import get_scheduler

    if not train_items:
        raise ValueError("No training samples. Run `kedro run --pipelines llm_data` and check its report.")
    if params.packing:
        length = params.pack_length or max(len(item["input_ids"]) for item in train_items)
        packed = pack(train_items, length)
        logger.info("Packing: %d samples into %d rows of <= %d tokens", len(train_items), len(packed), length)
        train_items = packed
    accelerator = make_accelerator(params.device, params.mixed_precision, params.gradient_accumulation_steps,
                                   setting="llm_training.mixed_precision")
    if params.gradient_checkpointing:
        enable_activation_checkpointing(model)
        model.enable_input_require_grads()
    spec = llm_lora_spec(params)
    model = with_adapter(model, spec, init_state, seed=params.seed)
    optimizer = make_adamw([{"params": [p for p in model.parameters() if p.requires_grad],
                             "lr": params.learning_rate}])
    per_epoch = max(1, math.ceil(len(train_items) / params.batch_size) // params.gradient_accumulation_steps)
    total_steps = params.max_steps or params.epochs * per_epoch
    scheduler = get_scheduler(params.lr_scheduler, optimizer, num_warmup_steps=params.lr_warmup_steps,
                              num_training_steps=total_steps)
    signature = run_signature(params.base_model, dataset_hash, spec,
                              {**{k: getattr(params, k) for k in SIGNATURE_SETTINGS}, "init_from": init_from or None},
                              {"init_from": None})  # init_from came later: absent unless set
    core = TrainerCore(
        accelerator=accelerator, seed=params.seed, subject=params.output_name,
        subject_folder=Path(params.checkpoint_dir) / params.output_name,
        signature=signature, total_steps=total_steps, save_steps=params.save_steps,
        keep_checkpoints=params.keep_checkpoints, log_every_steps=params.log_every_steps,
        advice="mixed_precision: bf16 and a lower learning_rate", desc=f"training {params.output_name}",
        unit="tok", lora_state=lambda: adapter_state(accelerator.unwrap_model(model)), on_metrics=on_metrics)
    with core.locked():  # one run per subject; checkpoints are read and written under the lock
        restored = core.resume(params.resume, optimizer, scheduler)
        if restored is not None:
            from peft.utils import set_peft_model_state_dict

            set_peft_model_state_dict(model, restored)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        trainable = [p for group in optimizer.param_groups for p in group["params"]]
        orders: dict[int, list[int]] = {}
        device = accelerator.device
        pad_id = tokenizer.pad_token_id
        eval_losses: list[float] = []
        model.train()
        micro_per_epoch = math.ceil(len(train_items) / params.batch_size)
        collate = pad_packed_batch if params.packing else pad_batch
        ga = params.gradient_accumulation_steps

        def evaluate() -> dict[str, float]:
            eval_losses.append(eval_loss(accelerator.unwrap_model(model), val_items, pad_id))
            return {"eval_loss": eval_losses[-1], "eval_perplexity": math.exp(min(eval_losses[-1], 50))}

        core.start()
        for step in range(core.start_step, total_steps):
            step_loss = torch.zeros((), device=device)
            seen = 0
            for accum in range(ga):
                micro = step * ga + accum
                core.micro_seeds(micro)  # LoRA dropout
                epoch, index = divmod(micro, micro_per_epoch)
                if epoch not in orders:
                    orders.clear()
                    orders[epoch] = list(range(len(train_items)))
                    random.Random(derive_seed(params.seed, epoch, stream="order")).shuffle(orders[epoch])
                chosen = orders[epoch][index * params.batch_size:(index + 1) * params.batch_size]
                batch = {k: v.to(device, non_blocking=True)
                         for k, v in collate([train_items[i] for i in chosen], pad_id).items()}
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    optimizer_step(accelerator, loss, trainable, optimizer, scheduler, params.max_grad_norm)
                step_loss += loss.detach() / ga
                seen += sum(len(train_items[i]["input_ids"]) for i in chosen)
            done = step + 1
            evaluating = bool(val_items) and (done % per_epoch == 0 or done == total_steps)
            core.end_step(step, step_loss, seen, optimizer, scheduler, evaluate if evaluating else None)
            if step_callback:
                step_callback(done, accelerator.unwrap_model(model))
        tokens_per_second = core.finish(optimizer, scheduler)
        unwrapped = accelerator.unwrap_model(model)
        return LLMTrainResult(adapter_state(unwrapped), spec, core.losses.values, eval_losses, total_steps,
                              tokens_per_second, peak_memory_mb(device), core.resumed_from)


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str | Sequence[dict[str, str]]], max_new_tokens: int,
                     constraint=None, template: str | None = None) -> list[str]:
    """Greedy answers, each prompt formatted exactly as training formats it (:func:`prompt_ids`: the chat
    template or ``template``, BOS first); a prompt is a string or chat messages. Optionally JSON-constrained."""
    device = next(model.parameters()).device
    model.eval()
    answers = []
    for prompt in tqdm(prompts, desc="generating answers", unit="prompt", leave=False):
        messages = user_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        ids = torch.tensor([prompt_ids(tokenizer, messages, template)], device=device)
        extra = constraint.generate_kwargs() if constraint is not None else {}
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, **extra)
        answers.append(tokenizer.decode(out[0][ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 on whitespace tokens (characters for CJK text without spaces)."""
    def tokens(text: str) -> list[str]:
        parts = text.split()
        return parts if len(parts) > 1 else list(text.replace(" ", ""))
    pred, ref = tokens(prediction), tokens(reference)
    common = sum(min(pred.count(t), ref.count(t)) for t in set(pred))
    if not pred or not ref or not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)
