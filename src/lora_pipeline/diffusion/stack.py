"""Stacking several LoRAs on one pipeline (SD1.x, SDXL or Flux.1), each at its own weight, and merging them into
the base.

Files are read by :mod:`lora_files` rather than passed to diffusers' ``load_lora_weights``: kohya/WebUI files and,
for Flux, the BFL/ComfyUI, diffusers/PEFT, OneTrainer and OMI layouts all become the same modules of the loaded
model; every module is checked against the base (a LoRA for another base is refused by name), and LyCORIS / DoRA
modules, which PEFT cannot hold, become weight patches. So ``<lora:a:0.6>, <lora:b:0.8>`` works whatever trainer
wrote a and b. (diffusers 0.42 does load our own kohya files whole, text-encoder attention included: measured on
SD1.x and SDXL, within fp16 rounding of the diffusers folder.) Converted to diffusers' own layout (with
``alpha / r`` folded into ``lora_B``) they load exactly, text encoders included. Pairs of a component that the
pipeline's LoRA loader does not load (Flux's T5, ``text_encoder_2``: FluxPipeline loads ``transformer`` and
``text_encoder`` only) are weight patches too.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch

from lora_pipeline.core.errors import DataError, LoraPipelineError
from lora_pipeline.core.files import read_safetensors_header
from lora_pipeline.diffusion.families import ModelFamily, lora_header_family
from lora_pipeline.diffusion.lora_files import (
    AnyLoraModule,
    LoraModule,
    LycorisModule,
    fused_delta,
    module_paths,
    read_lora_modules,
    to_peft_state,
)

logger = logging.getLogger(__name__)


def adapter_name(name: str) -> str:
    """PEFT adapter names must be valid module attribute names."""
    return re.sub(r"\W", "_", name)


def pipeline_modules(pipe, family: ModelFamily) -> dict[str, torch.nn.Module]:
    return {name: getattr(pipe, name, None) for name in family.components}


class WeightPatches:
    """The stacked files' modules that are not PEFT adapters -- LyCORIS and DoRA modules, and pairs of components
    the pipeline's LoRA loader skips -- applied to the base weights the way WebUI and ComfyUI apply them: on every
    weight change each patched layer is reset to its original weight plus each file's delta at its prompt weight.
    (PEFT's LoRA adapters cannot hold a Hadamard or Kronecker product.) A fused module's delta is computed over its
    parts' stacked original weights and split by rows."""

    def __init__(self, modules: Mapping[str, torch.nn.Module]):
        self.modules = modules
        self.by_adapter: dict[str, list[AnyLoraModule]] = {}
        self.originals: dict[tuple[str, str], torch.Tensor] = {}

    def add(self, adapter: str, patches: Sequence[AnyLoraModule]) -> None:
        self.by_adapter[adapter] = list(patches)
        for m in patches:
            for path in module_paths(m):
                layer = self.modules[m.component].get_submodule(path)
                self.originals.setdefault((m.component, path), layer.weight.detach().clone())

    @torch.no_grad()
    def apply(self, weights: Mapping[str, float]) -> None:
        for (component, path), original in self.originals.items():
            self.modules[component].get_submodule(path).weight.copy_(original)
        for adapter, weight in weights.items():
            for m in self.by_adapter.get(adapter, []):
                paths = module_paths(m)
                bases = [self.originals[(m.component, path)].float() for path in paths]
                for path, delta in zip(paths, fused_delta(m, weight, bases)):
                    layer = self.modules[m.component].get_submodule(path)
                    layer.weight += delta.to(layer.weight.dtype, copy=False)


def _adapter_components(pipe, family: ModelFamily) -> tuple[str, ...]:
    """The components whose LoRA pairs the pipeline's ``load_lora_weights`` loads (FluxPipeline: the transformer
    and CLIP, not T5)."""
    return tuple(getattr(type(pipe), "_lora_loadable_modules", family.components))


def check_one_family(files: Mapping[str, str | Path], family: ModelFamily) -> None:
    """Every LoRA of a prompt belongs to the base's family: a LoRA whose header names another family is refused,
    all of them named, before any is loaded. (A file without a header is checked by its module names instead.)"""
    others = {}
    for name, path in files.items():
        named = lora_header_family(read_safetensors_header(path).metadata) if str(path).endswith(".safetensors") \
            else None
        if named is not None and named is not family:
            others[name] = named
    if others:
        listed = ", ".join(f"{name} ({other.short_name})" for name, other in others.items())
        raise LoraPipelineError(
            f"LoRAs of another model family than the base ({family.short_name}): {listed}. A prompt stacks LoRAs of "
            f"one family; remove them from the prompt, or generate with a {family.short_name} LoRA of theirs, or "
            f"set generation.base_model to a base of their family.")


def load_stack(pipe, family: ModelFamily, files: Mapping[str, str | Path]) -> None:
    """Load each LoRA file as its own adapter (named after the LoRA); weights are set per prompt.

    Plain LoRA and LoCon pairs become PEFT adapters; LoHa, LoKr and DoRA modules, and pairs of components the
    pipeline's loader skips (Flux's T5), are kept as weight patches."""
    check_one_family(files, family)
    patches = getattr(pipe, "lora_pipeline_patches", None)
    if patches is None:
        patches = WeightPatches(pipeline_modules(pipe, family))
        pipe.lora_pipeline_patches = patches
    loadable = _adapter_components(pipe, family)
    for name, path in files.items():
        adapter = adapter_name(name)
        if adapter in _loaded_adapters(pipe) or adapter in patches.by_adapter:
            continue
        modules = read_lora_modules(path, family, pipeline_modules(pipe, family))
        pairs = [m for m in modules if isinstance(m, LoraModule) and m.component in loadable]
        patched = [m for m in modules if not (isinstance(m, LoraModule) and m.component in loadable)]
        if pairs:
            pipe.load_lora_weights(to_peft_state(pairs, target_scale=1.0), adapter_name=adapter)
        if patched:
            patches.add(adapter, patched)
        kinds = sorted({("dora" if "dora_scale" in m.tensors else m.kind) if isinstance(m, LycorisModule)
                        else f"{m.component} LoRA" for m in patched})
        logger.info("Loaded LoRA %s from %s (%d LoRA pairs as an adapter%s)", name, path, len(pairs),
                    f", {len(patched)} {'/'.join(kinds)} modules as weight patches" if patched else "")


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
    LyCORIS and DoRA modules by their own formulas (:class:`LycorisModule`), a fused one over its parts' stacked
    weights, split by rows."""
    for m in lora_modules:
        layers = [modules[m.component].get_submodule(path) for path in module_paths(m)]
        shape = (sum(layer.weight.shape[0] for layer in layers), *layers[0].weight.shape[1:])
        if isinstance(m, LoraModule) and m.up.shape[0] * m.down[0].numel() != layers[0].weight.numel():
            raise DataError(f"{source}: {m.component}.{m.path} has shape "
                            f"{tuple(m.up.shape[:1]) + tuple(m.down.shape[1:])}, the base layer "
                            f"{tuple(layers[0].weight.shape)}: this LoRA was trained on another base model")
        try:
            deltas = fused_delta(m, weight, [layer.weight.float() for layer in layers])
        except RuntimeError as exc:  # a LyCORIS factor product that does not fit the layer
            raise DataError(f"{source}: {m.component}.{'+'.join(module_paths(m))} does not fit the base layer "
                            f"{shape} ({exc}): this LoRA was trained on another base model") from None
        for layer, delta in zip(layers, deltas):
            layer.weight += delta.to(layer.weight.dtype)


def merge_into_base(modules: Mapping[str, torch.nn.Module], family: ModelFamily,
                    files_and_weights: Sequence[tuple[str | Path, float]]) -> None:
    """Fuse several LoRA files, each at its weight, into the base model (in place)."""
    for path, weight in files_and_weights:
        merge_modules(modules, read_lora_modules(path, family, modules), weight, str(path))
