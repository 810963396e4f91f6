"""ComfyUI's key rule for diffusers-format text-encoder LoRA keys, written here from reading ComfyUI's
``comfy/lora.py`` (``model_lora_keys_clip``, ``LORA_CLIP_MAP``) and ``comfy/weight_adapter/lora.py`` (which
tensor names a LoRA module is read from), independently of lora_pipeline.

ComfyUI maps, for every CLIP layer b < 32 the loaded model has and each of six modules c (``mlp.fc1``,
``mlp.fc2``, ``self_attn.{q,k,v,out}_proj``): CLIP-L as ``text_encoder.text_model.encoder.layers.{b}.{c}``
(SD1.x, SDXL's first encoder) and, when a CLIP-L is present, CLIP-G as
``text_encoder_2.text_model.encoder.layers.{b}.{c}``. A diffusers/PEFT module x is read from
``x.lora_B.weight`` + ``x.lora_A.weight``; a tensor no mapped module claims is logged "lora key not loaded".
"""

from __future__ import annotations

import re
from typing import Iterable

CLIP_MODULES = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")
MAX_LAYERS = 32  # ComfyUI looks at layers 0..31


def clip_key_map(clip_l_layers: int, clip_g_layers: int = 0) -> set[str]:
    """The diffusers-format text-encoder module names ComfyUI maps for a model with these CLIP encoders."""
    names = {f"text_encoder.text_model.encoder.layers.{b}.{c}" for b in range(min(clip_l_layers, MAX_LAYERS))
             for c in CLIP_MODULES}
    if clip_l_layers:
        names |= {f"text_encoder_2.text_model.encoder.layers.{b}.{c}" for b in range(min(clip_g_layers, MAX_LAYERS))
                  for c in CLIP_MODULES}
    return names


def not_loaded(keys: Iterable[str], key_map: set[str]) -> list[str]:
    """The text-encoder tensors ComfyUI would report as "lora key not loaded"."""
    keys = set(keys)
    left = []
    for key in sorted(k for k in keys if k.startswith("text_encoder")):
        match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
        module = match[1] if match else None
        if module not in key_map or not {f"{module}.lora_A.weight", f"{module}.lora_B.weight"} <= keys:
            left.append(key)
    return left


def text_encoder_modules(keys: Iterable[str]) -> set[str]:
    """Module names of a diffusers-format file's text-encoder tensors."""
    return {k.rsplit(".lora_", 1)[0] for k in keys if k.startswith("text_encoder")}


# ComfyUI's comfy/utils.py ``mmdit_to_diffusers`` (SD3/SD3.5), as a table of this file's own: the kohya module
# after ``lora_unet_joint_blocks_<i>_`` (ComfyUI: ``diffusion_model.joint_blocks.<i>.`` + the same, dotted) -> the
# diffusers modules of ``transformer_blocks.<i>.`` whose rows it stacks. The last block's context modulation keeps
# (shift, scale) where diffusers keeps (scale, shift): ComfyUI's ``swap_scale_shift``.
MMDIT_TO_DIFFUSERS = {
    "x_block_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block_attn2_qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "x_block_attn_proj": ("attn.to_out.0",), "context_block_attn_proj": ("attn.to_add_out",),
    "x_block_attn2_proj": ("attn2.to_out.0",), "x_block_mlp_fc1": ("ff.net.0.proj",), "x_block_mlp_fc2": ("ff.net.2",),
    "context_block_mlp_fc1": ("ff_context.net.0.proj",), "context_block_mlp_fc2": ("ff_context.net.2",),
    "x_block_adaLN_modulation_1": ("norm1.linear",), "context_block_adaLN_modulation_1": ("norm1_context.linear",)}


def mmdit_parts(transformer, kohya_name: str) -> tuple[list[str], bool]:
    """The diffusers modules a kohya SD3 module stacks, and whether its halves are swapped."""
    block, rest = kohya_name.removeprefix("lora_unet_joint_blocks_").split("_", 1)
    swapped = int(block) == transformer.config.num_layers - 1 and rest == "context_block_adaLN_modulation_1"
    return [f"transformer_blocks.{block}.{p}" for p in MMDIT_TO_DIFFUSERS[rest]], swapped


def apply_mmdit_rule(transformer, lora: dict, weight: float) -> None:
    """``W += weight * alpha / r * up @ down`` for ``{kohya name: (down, up, alpha)}``, cut onto diffusers' rows."""
    import torch

    with torch.no_grad():
        for name, (down, up, alpha) in lora.items():
            delta = weight * alpha / down.shape[0] * up.float() @ down.float()
            paths, swapped = mmdit_parts(transformer, name)
            if swapped:
                delta = torch.cat(delta.chunk(2)[::-1])
            row = 0
            for path in paths:
                w = transformer.get_submodule(path).weight
                w += delta[row:row + w.shape[0]]
                row += w.shape[0]
            assert row == delta.shape[0], name


def flux_to_diffusers(num_double: int, num_single: int) -> dict[str, list[str]]:
    """ComfyUI's ``flux_to_diffusers`` (Flux.1, Chroma) as a table of this file's own, for the block Linears: the
    kohya module name (``lora_unet_`` + the BFL path, ``.`` -> ``_``) -> the diffusers modules whose rows it stacks."""
    table: dict[str, list[str]] = {}
    for i in range(num_double):
        b, k = f"transformer_blocks.{i}.", f"lora_unet_double_blocks_{i}_"
        table[k + "img_attn_qkv"] = [b + "attn.to_q", b + "attn.to_k", b + "attn.to_v"]
        table[k + "txt_attn_qkv"] = [b + "attn.add_q_proj", b + "attn.add_k_proj", b + "attn.add_v_proj"]
        for bfl, ours in (("img_attn_proj", "attn.to_out.0"), ("txt_attn_proj", "attn.to_add_out"),
                          ("img_mlp_0", "ff.net.0.proj"), ("img_mlp_2", "ff.net.2"),
                          ("txt_mlp_0", "ff_context.net.0.proj"), ("txt_mlp_2", "ff_context.net.2"),
                          ("img_mod_lin", "norm1.linear"), ("txt_mod_lin", "norm1_context.linear")):
            table[k + bfl] = [b + ours]
    for i in range(num_single):
        b, k = f"single_transformer_blocks.{i}.", f"lora_unet_single_blocks_{i}_"
        table[k + "linear1"] = [b + "attn.to_q", b + "attn.to_k", b + "attn.to_v", b + "proj_mlp"]
        table[k + "linear2"] = [b + "proj_out"]
        table[k + "modulation_lin"] = [b + "norm.linear"]
    return table


def apply_flux_rule(transformer, lora: dict, weight: float) -> None:
    """``W += weight * alpha / r * up @ down`` for ``{kohya name: (down, up, alpha)}`` of a Flux-layout LoRA."""
    import torch

    table = flux_to_diffusers(transformer.config.num_layers, transformer.config.num_single_layers)
    with torch.no_grad():
        for name, (down, up, alpha) in lora.items():
            delta = weight * alpha / down.shape[0] * up.float() @ down.float()
            row = 0
            for path in table[name]:
                w = transformer.get_submodule(path).weight
                w += delta[row:row + w.shape[0]]
                row += w.shape[0]
            assert row == delta.shape[0], name
