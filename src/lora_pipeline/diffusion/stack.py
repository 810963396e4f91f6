"""Stacking several LoRAs on one pipeline (SD1.x or SDXL), each at its own weight, and merging them into the base.

kohya/WebUI files are converted by :mod:`lora_files` rather than passed to diffusers' ``load_lora_weights``:
every module is checked against the base (a LoRA for another base is refused by name), and LyCORIS / DoRA
modules, which PEFT cannot hold, become weight patches. (diffusers 0.42 does load our own kohya files whole,
text-encoder attention included: measured on SD1.x and SDXL, within fp16 rounding of the diffusers folder.) Converted to
diffusers' own layout (with ``alpha / r`` folded into ``lora_B``) they load exactly, text encoders included.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch

from lora_pipeline.core.errors import DataError
from lora_pipeline.diffusion.families import ModelFamily
from lora_pipeline.diffusion.lora_files import (
    AnyLoraModule,
    LoraModule,
    LycorisModule,
    read_lora_modules,
    to_peft_state,
)

logger = logging.getLogger(__name__)


def adapter_name(name: str) -> str:
    """PEFT adapter names must be valid module attribute names."""
    return re.sub(r"\W", "_", name)


def pipeline_modules(pipe, family: ModelFamily) -> dict[str, torch.nn.Module]:
    return {name: getattr(pipe, name) for name in family.components}


class WeightPatches:
    """LyCORIS and DoRA modules of the stacked files, applied to the base weights the way WebUI and ComfyUI
    apply them: on every weight change each patched layer is reset to its original weight plus each file's
    delta at its prompt weight. (PEFT's LoRA adapters cannot hold a Hadamard or Kronecker product.)"""

    def __init__(self, modules: Mapping[str, torch.nn.Module]):
        self.modules = modules
        self.by_adapter: dict[str, list[LycorisModule]] = {}
        self.originals: dict[tuple[str, str], torch.Tensor] = {}

    def add(self, adapter: str, lycoris: Sequence[LycorisModule]) -> None:
        self.by_adapter[adapter] = list(lycoris)
        for m in lycoris:
            layer = self.modules[m.component].get_submodule(m.path)
            self.originals.setdefault((m.component, m.path), layer.weight.detach().clone())

    @torch.no_grad()
    def apply(self, weights: Mapping[str, float]) -> None:
        for (component, path), original in self.originals.items():
            self.modules[component].get_submodule(path).weight.copy_(original)
        for adapter, weight in weights.items():
            for m in self.by_adapter.get(adapter, []):
                layer = self.modules[m.component].get_submodule(m.path)
                base = self.originals[(m.component, m.path)]
                layer.weight += m.delta(weight, base.float()).to(layer.weight.dtype, copy=False)


def load_stack(pipe, family: ModelFamily, files: Mapping[str, str | Path]) -> None:
    """Load each LoRA file as its own adapter (named after the LoRA); weights are set per prompt.

    Plain LoRA and LoCon pairs become PEFT adapters; LoHa, LoKr and DoRA modules are kept as weight patches."""
    patches = getattr(pipe, "lora_pipeline_patches", None)
    if patches is None:
        patches = WeightPatches(pipeline_modules(pipe, family))
        pipe.lora_pipeline_patches = patches
    for name, path in files.items():
        adapter = adapter_name(name)
        if adapter in _loaded_adapters(pipe) or adapter in patches.by_adapter:
            continue
        modules = read_lora_modules(path, family, pipeline_modules(pipe, family))
        lycoris = [m for m in modules if isinstance(m, LycorisModule)]
        pairs = [m for m in modules if not isinstance(m, LycorisModule)]
        if pairs:
            pipe.load_lora_weights(to_peft_state(pairs, target_scale=1.0), adapter_name=adapter)
        if lycoris:
            patches.add(adapter, lycoris)
        kinds = sorted({("dora" if "dora_scale" in m.tensors else m.kind) for m in lycoris})
        logger.info("Loaded LoRA %s from %s (%d LoRA pairs%s)", name, path, len(pairs),
                    f", {len(lycoris)} {'/'.join(kinds)} modules" if lycoris else "")


def set_weights(pipe, weights: Mapping[str, float]) -> None:
    """Activate exactly these LoRAs at these weights (an empty mapping means the base model)."""
    patches = getattr(pipe, "lora_pipeline_patches", None)
    if patches is not None:
        patches.apply({adapter_name(n): w for n, w in weights.items()})
    loaded = _loaded_adapters(pipe)
    if not loaded:
        return
    names = [(adapter_name(n), w) for n, w in weights.items() if adapter_name(n) in loaded]
    if names:
        pipe.enable_lora()
        pipe.set_adapters([n for n, _ in names], adapter_weights=[w for _, w in names])
    else:
        pipe.disable_lora()


def _loaded_adapters(pipe) -> set[str]:
    try:
        return {name for names in pipe.get_list_adapters().values() for name in names}
    except (AttributeError, ValueError):
        return set()


@torch.no_grad()
def merge_modules(modules: Mapping[str, torch.nn.Module], lora_modules: Sequence[AnyLoraModule], weight: float,
                  source: str) -> None:
    """Fuse one LoRA into the base weights by the WebUI rule ``W += w * alpha / r * up @ down`` (in place);
    LyCORIS and DoRA modules by their own formulas (:class:`LycorisModule`)."""
    for m in lora_modules:
        layer = modules[m.component].get_submodule(m.path)
        if isinstance(m, LoraModule) and m.up.shape[0] * m.down[0].numel() != layer.weight.numel():
            raise DataError(f"{source}: {m.component}.{m.path} has shape "
                            f"{tuple(m.up.shape[:1]) + tuple(m.down.shape[1:])}, the base layer "
                            f"{tuple(layer.weight.shape)}: this LoRA was trained on another base model")
        try:
            delta = m.delta(weight, layer.weight.float())
        except RuntimeError as exc:  # a LyCORIS factor product that does not fit the layer
            raise DataError(f"{source}: {m.component}.{m.path} does not fit the base layer "
                            f"{tuple(layer.weight.shape)} ({exc}): this LoRA was trained on another base model") from None
        layer.weight += delta.to(layer.weight.dtype)


def merge_into_base(modules: Mapping[str, torch.nn.Module], family: ModelFamily,
                    files_and_weights: Sequence[tuple[str | Path, float]]) -> None:
    """Fuse several LoRA files, each at its weight, into the base model (in place)."""
    for path, weight in files_and_weights:
        merge_modules(modules, read_lora_modules(path, family, modules), weight, str(path))
