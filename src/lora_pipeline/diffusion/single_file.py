"""Write a diffusers UNet-family pipeline (SD1.x, SDXL) as one original-layout (LDM/SGM) checkpoint, the file
WebUI loads.

diffusers reads such files (``from_single_file``) but has no writer in the library (only scripts in its
repository), so the inverse of its key rules lives here. Used by ``merge`` and by the single-file tests.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

from lora_pipeline.core.files import atomic_path
from lora_pipeline.diffusion.families import ModelFamily, sgm_unet_path, unet_layout

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    layers, up_attention = unet_layout(unet.config)
    fixed = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if unet.config.addition_embed_type:
        fixed.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    out = {}
    for key, tensor in unet.state_dict().items():
        new = fixed.get(key) or sgm_unet_path(key, layers, up_attention)
        if new is None:
            raise KeyError(f"no LDM rule for UNet key {key}")
        out[UNET_PREFIX + new] = tensor
    return out


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    num_blocks = len(vae.config.down_block_types)
    fixed = dict(DIFFUSERS_TO_LDM_MAPPING["vae"])
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, tensor in vae.state_dict().items():
        if key in fixed:
            new = fixed[key]
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(\w+(?:\.0)?)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
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
        out[VAE_PREFIX + new] = tensor
    return out


def clip_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """OpenAI CLIP (SD1, SDXL's first encoder): the transformers layout under ``text_model.``."""
    return {prefix + (key if key.startswith("text_model.") else "text_model." + key): tensor
            for key, tensor in text_encoder.state_dict().items()}


_OPENCLIP_RENAMES = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), (".mlp.fc1.", ".mlp.c_fc."),
                     (".mlp.fc2.", ".mlp.c_proj."), (".self_attn.", ".attn."))


def open_clip_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """SDXL's second encoder in OpenCLIP's layout: fused q/k/v ``in_proj``, ``resblocks``, transposed projection
    (the inverse of diffusers' ``convert_open_clip_checkpoint``)."""
    fixed = dict(DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"])  # diffusers key -> OpenCLIP key
    state = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
             for k, v in text_encoder.state_dict().items()}
    out, qkv = {}, {}
    for key, tensor in state.items():
        if key in fixed:
            out[prefix + fixed[key]] = tensor.T.contiguous() if key == "text_projection.weight" else tensor
            continue
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key)
        if m is None:
            raise KeyError(f"no OpenCLIP rule for text encoder key {key}")
        layer, rest = m[1], "." + m[2]
        if p := re.fullmatch(r"\.self_attn\.(q|k|v)_proj\.(weight|bias)", rest):
            qkv.setdefault((layer, p[2]), {})[p[1]] = tensor
            continue
        for new, old in _OPENCLIP_RENAMES:
            rest = rest.replace(new, old)
        out[f"{prefix}transformer.resblocks.{layer}{rest}"] = tensor
    for (layer, kind), parts in qkv.items():
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]])
    return out


TEXT_ENCODER_WRITERS = {"clip": clip_to_ldm, "open_clip": open_clip_to_ldm}


def pipeline_to_ldm(pipe, family: ModelFamily) -> dict[str, torch.Tensor]:
    """The whole pipeline in the original layout; where each text encoder goes, and in which layout, the family's
    ``single_file_text_encoders`` say (SDXL's second one is an OpenCLIP model)."""
    state = unet_to_ldm(getattr(pipe, family.denoiser))
    state.update(vae_to_ldm(pipe.vae))
    for name, (prefix, layout) in zip(family.text_encoders, family.single_file_text_encoders):
        state.update(TEXT_ENCODER_WRITERS[layout](getattr(pipe, name), prefix))
    return state


def write_ldm_checkpoint(pipe, path: Path, family: ModelFamily, dtype: torch.dtype | None = None) -> Path:
    """Save ``pipe``'s UNet, VAE and text encoder(s) as one safetensors file in the original layout (atomic)."""
    from safetensors.torch import save_file

    state = pipeline_to_ldm(pipe, family)
    with atomic_path(path) as tmp:
        save_file({k: (v.to(dtype) if dtype else v).contiguous().clone() for k, v in state.items()}, str(tmp))
    return Path(path)
