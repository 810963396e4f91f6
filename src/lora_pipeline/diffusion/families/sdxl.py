"""Stable Diffusion XL: two text encoders (CLIP-L and OpenCLIP-G, penultimate layers side by side, the pooled
projection of the second), size and crop conditioning (time ids), kohya names in the original SGM UNet layout
(``lora_unet_input_blocks_4_1_...``, ``lora_te1_`` / ``lora_te2_``)."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from lora_pipeline.core.errors import ConfigError
from lora_pipeline.diffusion.families.base import Conditioning
from lora_pipeline.diffusion.families.unet import UNetFamily, sgm_unet_path, token_ids, unet_layout

logger = logging.getLogger(__name__)


class SDXLFamily(UNetFamily):
    name = "sdxl"
    display_name = "Stable Diffusion XL"
    short_name = "SDXL"
    pipeline_class_name = "StableDiffusionXLPipeline"
    pipeline_class_prefix = "StableDiffusionXL"
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    kohya_te_prefixes = ("lora_te1_", "lora_te2_")
    default_resolution = 1024
    lora_architecture_prefix = "stable-diffusion-xl"
    lora_base_versions = ("sdxl_base_v1-0",)
    checkpoint_marker = "conditioner.embedders.1."
    single_file_text_encoders = (("conditioner.embedders.0.transformer.", "clip"),
                                 ("conditioner.embedders.1.model.", "open_clip"))

    def recognises_kohya_name(self, name: str) -> bool:
        return name.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks_", "lora_unet_middle_block_",
                                "lora_unet_output_blocks_"))

    def pipeline_flags(self, pipe: Any) -> dict[str, Any]:
        return {"force_zeros_for_empty_prompt": pipe.config.force_zeros_for_empty_prompt}

    def check_clip_skip(self, clip_skip: int) -> None:
        if clip_skip > 1:
            raise ConfigError(f"clip_skip {clip_skip} with an SDXL base: SDXL is trained on the penultimate CLIP layer "
                              f"already (kohya's SDXL scripts ignore clip_skip too). Set clip_skip: 1.")

    def check_precision(self, mixed_precision: str) -> None:
        if mixed_precision == "fp16":
            # SDXL's original VAE overflows to NaN in fp16; it is kept in fp32 (only the UNet and the text
            # encoders are cast), so latents stay finite. A fp16-fixed VAE saves memory if you need it.
            logger.warning("SDXL with fp16: the VAE stays fp32 (its fp16 version produces NaN latents); "
                           "bf16 is the safer choice for the UNet on GPUs that support it.")

    def encode_prompt(self, text_encoders: Sequence[Any], tokenizers: Sequence[Any], texts: Sequence[str],
                      device: torch.device, clip_skip: int = 1) -> Conditioning:
        """Penultimate hidden states of both encoders side by side; the pooled, projected output of the second one
        (as StableDiffusionXLPipeline.encode_prompt and kohya's sdxl_train_util do)."""
        self.check_clip_skip(clip_skip)
        states, pooled = [], None
        for encoder, tokenizer in zip(text_encoders, tokenizers):
            out = encoder(token_ids(tokenizer, texts, device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]
        return Conditioning(torch.cat(states, dim=-1), pooled)

    def micro_conditioning(self, examples: Sequence[Any], device: torch.device) -> torch.Tensor:
        """``add_time_ids`` per image: original (h, w), crop (top, left), target (h, w). Without a recorded original
        size the bucket size is assumed, without a crop (0, 0)."""
        rows = []
        for ex in examples:
            width, height = ex.original_size or (ex.width, ex.height)
            rows.append([height, width, *ex.crop_top_left, ex.height, ex.width])
        return torch.tensor(rows, dtype=torch.float32, device=device)

    def added_conditions(self, cond: Conditioning, micro: torch.Tensor | None, dtype: torch.dtype) -> dict[str, Any]:
        return {"added_cond_kwargs": {"text_embeds": cond.pooled.to(dtype), "time_ids": micro.to(dtype)}}

    def kohya_unet_path(self, module_path: str, unet_config: Any) -> str:
        return sgm_unet_path(module_path, *unet_layout(unet_config)) or module_path

    def kohya_header(self, summary: Any) -> dict[str, str]:
        return {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False",
                "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}


SDXL = SDXLFamily()
