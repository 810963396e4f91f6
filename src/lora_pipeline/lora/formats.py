"""The one place for LoRA file formats: PEFT/diffusers keys <-> kohya (WebUI/ComfyUI) keys, hashes, headers.

Key conventions (see the README "File formats" section):

* training state dict (our own, = diffusers' format): ``unet.<module>.lora_A.weight`` / ``lora_B`` and
  ``text_encoder.<module>...`` with transformers-5 CLIP module paths (``encoder.layers.N.self_attn.q_proj``);
* kohya: ``lora_unet_<module with . -> _>`` and ``lora_te_text_model_<module with . -> _>`` with
  ``.lora_down.weight`` [r, in(, kh, kw)], ``.lora_up.weight`` [out, r(, 1, 1)] and ``.alpha`` (0-dim).

WebUI and ComfyUI apply ``W += strength * alpha / r * up @ down``, so ``alpha`` must be the training alpha.
diffusers' ``convert_state_dict_to_kohya`` writes alpha = rank and names the SD1 text encoder ``lora_te1_``,
so it is not used here.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Iterable, Mapping

import torch

UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"
_PEFT_KEY = re.compile(r"^(unet|text_encoder)\.(.+)\.lora_([AB])\.weight$")
_KOHYA_KEY = re.compile(r"^(lora_unet_|lora_te_)(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")


def kohya_module_name(component: str, module_path: str) -> str:
    """``unet`` + ``down_blocks.0.attentions.0.proj_in`` -> ``lora_unet_down_blocks_0_attentions_0_proj_in``.

    transformers 5's CLIPTextModel has no ``text_model.`` wrapper any more, but WebUI keys still carry it,
    so it is added explicitly for the text encoder.
    """
    if component == "unet":
        return UNET_PREFIX + module_path.replace(".", "_")
    if component == "text_encoder":
        path = module_path.removeprefix("text_model.")
        return TE_PREFIX + "text_model_" + path.replace(".", "_")
    raise ValueError(f"unknown component {component!r}")


def to_kohya_state_dict(
    peft_state: Mapping[str, torch.Tensor], alpha: float, dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """Training (PEFT) keys -> kohya keys with the training ``alpha`` per module."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in peft_state.items():
        match = _PEFT_KEY.match(key)
        if not match:
            raise ValueError(f"not a LoRA weight key: {key!r}")
        component, module_path, which = match.groups()
        name = kohya_module_name(component, module_path)
        suffix = "lora_down.weight" if which == "A" else "lora_up.weight"
        out[f"{name}.{suffix}"] = tensor.detach().to("cpu", dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return dict(sorted(out.items()))


def kohya_modules(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group a kohya state dict by module: ``{name: {"down": .., "up": .., "alpha": ..}}``."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _KOHYA_KEY.match(key)
        if not match:
            raise ValueError(f"not a kohya LoRA key: {key!r} (expected lora_unet_* / lora_te_* names)")
        prefix, body, suffix = match.groups()
        part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[suffix]
        modules.setdefault(prefix + body, {})[part] = tensor
    return modules


def kohya_name_index(component: str, module_names: Iterable[str]) -> dict[str, str]:
    """Map kohya names back to module paths of a loaded model (``_`` is ambiguous, so look them up)."""
    return {kohya_module_name(component, name): name for name in module_names if name}


def from_kohya_state_dict(
    state: Mapping[str, torch.Tensor], unet_modules: Iterable[str], te_modules: Iterable[str]
) -> tuple[dict[str, torch.Tensor], float | None, int | None]:
    """kohya keys -> training (PEFT) keys, with ``alpha`` folded so ``alpha/r`` matches the training scale.

    Returns ``(peft_state, alpha, rank)``. All modules must share one rank and alpha (true for kohya LoRA
    files written by trainers); mixed values are rescaled into ``lora_B`` relative to the first module.
    """
    index = {**kohya_name_index("unet", unet_modules), **kohya_name_index("text_encoder", te_modules)}
    peft: dict[str, torch.Tensor] = {}
    base_alpha = base_rank = None
    for name, parts in kohya_modules(state).items():
        if name not in index:
            raise ValueError(f"LoRA module {name!r} has no matching layer in this base model (SD1.x expected)")
        component = "unet" if name.startswith(UNET_PREFIX) else "text_encoder"
        down, up = parts["down"].float(), parts["up"].float()
        rank = down.shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        if base_alpha is None:
            base_alpha, base_rank = alpha, rank
        scale_fix = (alpha / rank) / (base_alpha / base_rank)
        peft[f"{component}.{index[name]}.lora_A.weight"] = down
        peft[f"{component}.{index[name]}.lora_B.weight"] = up * scale_fix
    return peft, base_alpha, base_rank


def tensor_hash(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors (names, dtypes, shapes, bytes), independent of header metadata.

    Used as ``sshs_model_hash``: identical weights give an identical hash whatever the timestamps say.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def stringify_metadata(metadata: Mapping[str, object]) -> dict[str, str]:
    """safetensors headers hold strings only; dicts/lists become JSON."""
    return {
        key: value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
        for key, value in metadata.items()
        if value is not None
    }
