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
