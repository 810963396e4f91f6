"""Stacking several LoRAs on one SD1.x pipeline, each at its own weight, and merging them into the base.

kohya/WebUI files are converted here rather than passed to diffusers' ``load_lora_weights``: diffusers 0.42
with transformers 5 silently drops their text-encoder attention weights. Converted to diffusers' own
layout (with ``alpha / r`` folded into ``lora_B``) they load exactly, text encoder included.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch

from lora_pipeline.lora.export import load_lora_file
from lora_pipeline.lora.formats import from_kohya_state_dict, kohya_modules

logger = logging.getLogger(__name__)


def adapter_name(name: str) -> str:
    """PEFT adapter names must be valid module attribute names."""
    return re.sub(r"\W", "_", name)


def read_lora_as_diffusers(path: str | Path, pipe) -> dict[str, torch.Tensor]:
    """Any supported LoRA file -> diffusers keys (``unet.*`` / ``text_encoder.*``) at scale 1."""
    state, header = load_lora_file(path)
    if any(key.startswith(("lora_unet_", "lora_te_")) for key in state):
        unknown = [k for k in state if not k.startswith(("lora_unet_", "lora_te_"))]
        if unknown:
            raise ValueError(f"{path}: unsupported keys such as {unknown[0]!r} (only plain LoRA is supported, not "
                             f"LyCORIS/LoHa/LoKr)")
        alphas = {}
        for name, parts in kohya_modules(state).items():
            rank = parts["down"].shape[0]
            alphas[name] = float(parts["alpha"]) / rank if "alpha" in parts else 1.0
        # Fold each module's alpha/r into lora_up so that every module loads at scale 1.
        scaled = {}
        for key, tensor in state.items():
            module = key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0]
            if key.endswith("lora_up.weight"):
                tensor = tensor.float() * alphas[module]
            if not key.endswith(".alpha"):
                scaled[key] = tensor.float()
        unet_names = [n for n, _ in pipe.unet.named_modules()]
        te_names = [n for n, _ in pipe.text_encoder.named_modules()]
        peft, _, _ = from_kohya_state_dict(scaled, unet_names, te_names)
        return peft
    return {k: v.float() for k, v in state.items()}


def load_stack(pipe, files: Mapping[str, str | Path]) -> None:
    """Load each LoRA file as its own adapter (named after the LoRA); weights are set per prompt."""
    for name, path in files.items():
        adapter = adapter_name(name)
        if adapter in _loaded_adapters(pipe):
            continue
        pipe.load_lora_weights(read_lora_as_diffusers(path, pipe), adapter_name=adapter)
        logger.info("Loaded LoRA %s from %s", name, path)


def set_weights(pipe, weights: Mapping[str, float]) -> None:
    """Activate exactly these LoRAs at these weights (an empty mapping means the base model)."""
    loaded = _loaded_adapters(pipe)
    if not loaded:
        return
    names = [adapter_name(n) for n in weights]
    if names:
        pipe.enable_lora()
        pipe.set_adapters(names, adapter_weights=list(weights.values()))
    else:
        pipe.disable_lora()


def _loaded_adapters(pipe) -> set[str]:
    try:
        return {name for names in pipe.get_list_adapters().values() for name in names}
    except (AttributeError, ValueError):
        return set()


@torch.no_grad()
def merge_state_into_base(pipe, state: Mapping[str, torch.Tensor], weight: float, what: str = "LoRA") -> None:
    """Fuse one kohya-format LoRA into the base weights by the WebUI rule ``W += w * alpha / r * up @ down``."""
    if not any(k.startswith(("lora_unet_", "lora_te_")) for k in state):
        raise ValueError(f"{what}: merging needs the kohya/WebUI file of a LoRA (the <name>.safetensors export)")
    unet_index = {"lora_unet_" + n.replace(".", "_"): m for n, m in pipe.unet.named_modules() if n}
    te_index = {"lora_te_text_model_" + n.removeprefix("text_model.").replace(".", "_"): m
                for n, m in pipe.text_encoder.named_modules() if n}
    for name, parts in kohya_modules(state).items():
        module = unet_index.get(name) or te_index.get(name)
        if module is None:
            raise ValueError(f"{what}: module {name} does not exist in this base model (is it an SD1.x LoRA?)")
        down, up = parts["down"].float(), parts["up"].float()
        scale = weight * (float(parts["alpha"]) / down.shape[0] if "alpha" in parts else 1.0)
        delta = (up.flatten(1) @ down.flatten(1))
        if delta.numel() != module.weight.numel():
            raise ValueError(f"{what}: {name} has shape {tuple(up.shape[:1]) + tuple(down.shape[1:])}, the base "
                             f"layer {tuple(module.weight.shape)}: this LoRA was trained on another base model")
        module.weight += (scale * delta.reshape(module.weight.shape)).to(module.weight.dtype)


def merge_into_base(pipe, files_and_weights: Sequence[tuple[str | Path, float]]) -> None:
    """Fuse several LoRA files, each at its weight, into the base model (in place)."""
    for path, weight in files_and_weights:
        merge_state_into_base(pipe, load_lora_file(path)[0], weight, str(path))
