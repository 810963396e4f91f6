"""Flux.1 LoRA module names: diffusers' ``FluxTransformer2DModel`` against the original (BFL) layout that kohya's
``lora_flux.py``, ComfyUI and most downloaded Flux LoRAs use.

The original model keeps q/k/v in one ``qkv`` Linear (and a single block's q/k/v plus its MLP input in one
``linear1``); diffusers splits them. A LoRA trained on the split modules is written fused, the way kohya writes
one: the parts' downs stacked (``n*r x in``), their ups block-diagonal (``sum(out) x n*r``) and alpha multiplied by
``n``, so that ``alpha / rank`` -- the strength every reader applies -- stays the parts' ``alpha / r``. Reading
goes the other way: each part takes the fused down and its rows of the up.

Downloaded Flux LoRAs name the same modules in several layouts besides kohya's (:data:`FILE_LAYOUTS`): the BFL
names under ``diffusion_model.`` (ComfyUI; BFL's own and ai-toolkit's files), OneTrainer's ``lora_transformer_``
+ diffusers path, the OMI layout OneTrainer writes now (BFL names with a fused module's parts numbered:
``transformer.double_blocks.0.img_attn.qkv.0`` is ``to_q``) and SimpleTuner's ``lycoris_`` + diffusers path
(ComfyUI's ``model_lora_keys_unet`` and ``model_lora_keys_clip`` map the same set).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

KOHYA_PREFIX = "lora_unet_"
BFL_PREFIX = "diffusion_model."  # BFL / ComfyUI: the original module path
ONETRAINER_PREFIX = "lora_transformer_"  # OneTrainer (legacy): the diffusers path with . -> _
OMI_PREFIX = "transformer."  # OMI (OneTrainer now): BFL names, fused parts numbered
LYCORIS_PREFIX = "lycoris_"  # SimpleTuner's LyCORIS files: the diffusers path with . -> _
# The text encoders in the same layouts: (prefix, flattened: . -> _), CLIP-L (with transformers 4's text_model.)
# and T5 (transformers' T5EncoderModel paths, encoder.block.0.layer.0.SelfAttention.q ...).
CLIP_PREFIXES = (("text_encoders.clip_l.transformer.", False), ("clip_l.", False))
T5_PREFIXES = (("lora_te3_", True), ("lora_te2_", True), ("text_encoders.t5xxl.transformer.", False), ("t5.", False))


@dataclass(frozen=True)
class FileLayout:
    """One way LoRA files name Flux modules: what to call it in messages, an example key, and the key prefixes
    it uses with the component each one names."""

    name: str
    example: str
    prefixes: tuple[tuple[str, str], ...]


FILE_LAYOUTS = (
    FileLayout("BFL / ComfyUI", "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight (or .lora_down.weight), "
               "text_encoders.clip_l.transformer.*, text_encoders.t5xxl.transformer.*",
               ((BFL_PREFIX, "transformer"), ("text_encoders.clip_l.", "text_encoder"),
                ("text_encoders.t5xxl.", "text_encoder_2"))),
    FileLayout("OneTrainer", "lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight, lora_te1_* (CLIP-L), "
               "lora_te2_* (T5)", ((ONETRAINER_PREFIX, "transformer"), ("lora_te2_", "text_encoder_2"))),
    FileLayout("OMI (OneTrainer)", "transformer.double_blocks.0.img_attn.qkv.0.lora_down.weight, clip_l.*, t5.*",
               (("transformer.double_blocks.", "transformer"), ("transformer.single_blocks.", "transformer"),
                ("clip_l.", "text_encoder"), ("t5.", "text_encoder_2"))),
    FileLayout("SimpleTuner LyCORIS", "lycoris_transformer_blocks_0_attn_to_q.lokr_w1", ((LYCORIS_PREFIX, "transformer"),)),
)


@dataclass(frozen=True)
class FusedModule:
    """One original-layout module and the diffusers modules whose outputs it stacks, in row order."""

    original: str  # e.g. double_blocks.0.img_attn.qkv
    parts: tuple[str, ...]  # e.g. transformer_blocks.0.attn.to_q, ...to_k, ...to_v


# diffusers module (within a block) -> original module (within the same block): the one-to-one ones.
_DOUBLE = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0",
           "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
           "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin"}
_DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``{path: layer}`` of a model's Linear layers, a PEFT-wrapped one (a LoRA adapter already loaded) under its own
    path and never its insides (``.base_layer``, ``.lora_A.default`` ...)."""
    wrapped = tuple(path + "." for path, m in model.named_modules() if path and hasattr(m, "base_layer"))
    return {path: m for path, m in model.named_modules()
            if isinstance(getattr(m, "base_layer", m), torch.nn.Linear) and not path.startswith(wrapped)}


def original_name(module: str) -> tuple[str, int] | None:
    """``(original module, row-part index)`` for a diffusers transformer module (index -1 when not fused), or None
    for modules outside the double and single blocks (embedders, final layer), which kohya does not target."""
    match = _BLOCK.match(module)
    if not match:
        return None
    kind, index, rest = match.groups()
    block = f"double_blocks.{index}" if kind == "transformer_blocks" else f"single_blocks.{index}"
    plain, fused = (_DOUBLE, _DOUBLE_FUSED) if kind == "transformer_blocks" else (_SINGLE, _SINGLE_FUSED)
    if rest in plain:
        return f"{block}.{plain[rest]}", -1
    for name, parts in fused.items():
        if rest in parts:
            return f"{block}.{name}", parts.index(rest)
    return None


def fused_modules(modules: list[str]) -> dict[str, FusedModule]:
    """Group the trained diffusers modules by the original module each one becomes part of."""
    groups: dict[str, dict[int, str]] = {}
    for module in modules:
        found = original_name(module)
        if found is not None:
            groups.setdefault(found[0], {})[found[1]] = module
    return {original: FusedModule(original, tuple(parts[i] for i in sorted(parts))) for original, parts in groups.items()}


def kohya_name(original: str) -> str:
    """``double_blocks.0.img_attn.qkv`` -> ``lora_unet_double_blocks_0_img_attn_qkv`` (kohya's lora_flux naming)."""
    return KOHYA_PREFIX + original.replace(".", "_")


def fuse(downs: list[torch.Tensor], ups: list[torch.Tensor], alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One LoRA over the stacked outputs of ``len(downs)`` LoRAs of rank r on the same input: downs stacked, ups
    block-diagonal, alpha times the part count (the fused rank), so the strength is unchanged."""
    return torch.cat(downs, dim=0), torch.block_diag(*ups), alpha * len(downs)


def split(down: torch.Tensor, up: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fused module's LoRA as one ``(down, up)`` per part, each part scaled as the fused module is (its alpha over
    the fused rank). ``sizes`` are the parts' output widths, in row order.

    Parts trained apart and saved fused (:func:`fuse`, kohya's own split-qkv files) have a block-diagonal up: each
    part gets back its own rank-r pair, so a retrain from the file (``init_lora``) has the rank it trained at.
    A qkv trained as one module (a dense up) gives each part the whole down and its rows of the up."""
    if sum(sizes) != up.shape[0]:
        raise ValueError(f"the fused module has {up.shape[0]} output rows, its parts {sizes} (sum {sum(sizes)})")
    rows = torch.split(up, sizes, dim=0)
    count, rank = len(sizes), down.shape[0]
    if rank % count == 0 and count > 1:
        part_rank = rank // count
        own = [block[:, j * part_rank:(j + 1) * part_rank] for j, block in enumerate(rows)]
        if torch.equal(torch.block_diag(*own), up):
            return [(down[j * part_rank:(j + 1) * part_rank], block) for j, block in enumerate(own)]
    return [(down, block) for block in rows]
