"""Write a diffusers SD1.x pipeline as one original-layout (LDM/CompVis) checkpoint, the file WebUI loads.

diffusers reads such files (``from_single_file``) but has no writer in the library (only a script in its
repository), so the inverse of its key rules lives here. Used by ``merge`` and by the single-file tests.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import save_file

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def _resnet(rest: str) -> str:
    for new, old in RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_to_ldm(state: dict, layers_per_block: int, up_has_attention: list[bool]) -> dict:
    per = layers_per_block + 1
    fixed = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    out = {}
    for key, tensor in state.items():
        if key in fixed:
            new = fixed[key]
        elif m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            b, l, rest = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{b * per + l + 1}.0.{_resnet(rest)}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            new = f"input_blocks.{int(m[1]) * per + int(m[2]) + 1}.1.{m[3]}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"output_blocks.{int(m[1]) * per + int(m[2])}.0.{_resnet(m[3])}"
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            new = f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            b = int(m[1])
            new = f"output_blocks.{b * per + layers_per_block}.{2 if up_has_attention[b] else 1}.conv.{m[2]}"
        else:
            raise KeyError(f"no LDM rule for UNet key {key}")
        out["model.diffusion_model." + new] = tensor
    return out


def vae_to_ldm(state: dict, num_blocks: int) -> dict:
    fixed = dict(DIFFUSERS_TO_LDM_MAPPING["vae"])
    attn = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]
    out = {}
    for key, tensor in state.items():
        if key in fixed:
            new = fixed[key]
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(\w+(?:\.0)?)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{dict(attn)[m[2]]}.{m[3]}"
            if m[3] == "weight" and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"decoder.up.{num_blocks - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
        else:
            raise KeyError(f"no LDM rule for VAE key {key}")
        out["first_stage_model." + new] = tensor
    return out


def write_ldm_checkpoint(pipe, path: Path, dtype: torch.dtype | None = None) -> Path:
    """Save ``pipe``'s UNet, VAE and text encoder as one safetensors file in the LDM key layout (atomic)."""
    from lora_pipeline.lora.files import atomic_path

    unet_cfg = pipe.unet.config
    up_attention = ["CrossAttn" in t for t in unet_cfg.up_block_types]
    state = unet_to_ldm(pipe.unet.state_dict(), unet_cfg.layers_per_block, up_attention)
    state.update(vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.down_block_types)))
    for key, tensor in pipe.text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        state["cond_stage_model.transformer." + key] = tensor
    with atomic_path(path) as tmp:
        save_file({k: (v.to(dtype) if dtype else v).contiguous().clone() for k, v in state.items()}, str(tmp))
    return Path(path)
