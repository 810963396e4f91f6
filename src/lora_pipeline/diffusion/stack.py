"""Stacking several LoRAs on one pipeline (SD1.x or SDXL), each at its own weight, and merging them into the base.

kohya/WebUI files are converted by :mod:`lora_files` rather than passed to diffusers' ``load_lora_weights``:
diffusers 0.42 with transformers 5 silently drops their text-encoder attention weights. Converted to
diffusers' own layout (with ``alpha / r`` folded into ``lora_B``) they load exactly, text encoders included.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch

from lora_pipeline.diffusion.families import ModelFamily
from lora_pipeline.diffusion.lora_files import LoraModule, read_lora_modules, to_peft_state
from lora_pipeline.errors import DataError

logger = logging.getLogger(__name__)


def adapter_name(name: str) -> str:
    """PEFT adapter names must be valid module attribute names."""
    return re.sub(r"\W", "_", name)


def pipeline_modules(pipe, family: ModelFamily) -> dict[str, torch.nn.Module]:
    return {name: getattr(pipe, name) for name in family.components}


def load_stack(pipe, family: ModelFamily, files: Mapping[str, str | Path]) -> None:
    """Load each LoRA file as its own adapter (named after the LoRA); weights are set per prompt."""
    for name, path in files.items():
        adapter = adapter_name(name)
        if adapter in _loaded_adapters(pipe):
            continue
        state = to_peft_state(read_lora_modules(path, family, pipeline_modules(pipe, family)), target_scale=1.0)
        pipe.load_lora_weights(state, adapter_name=adapter)
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
def merge_modules(modules: Mapping[str, torch.nn.Module], lora_modules: Sequence[LoraModule], weight: float,
                  source: str) -> None:
    """Fuse one LoRA into the base weights by the WebUI rule ``W += w * alpha / r * up @ down`` (in place)."""
    for m in lora_modules:
        layer = modules[m.component].get_submodule(m.path)
        if m.up.shape[0] * m.down[0].numel() != layer.weight.numel():
            raise DataError(f"{source}: {m.component}.{m.path} has shape "
                            f"{tuple(m.up.shape[:1]) + tuple(m.down.shape[1:])}, the base layer "
                            f"{tuple(layer.weight.shape)}: this LoRA was trained on another base model")
        layer.weight += m.delta(weight, layer.weight.shape).to(layer.weight.dtype)


def merge_into_base(modules: Mapping[str, torch.nn.Module], family: ModelFamily,
                    files_and_weights: Sequence[tuple[str | Path, float]]) -> None:
    """Fuse several LoRA files, each at its weight, into the base model (in place)."""
    for path, weight in files_and_weights:
        merge_modules(modules, read_lora_modules(path, family, modules), weight, str(path))
