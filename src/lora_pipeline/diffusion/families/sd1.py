"""Stable Diffusion 1.x: one CLIP-L text encoder (``clip_skip`` as WebUI counts it), a UNet trained with DDPM,
kohya names in diffusers' UNet layout (``lora_unet_down_blocks_0_...``, ``lora_te_text_model_...``)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from lora_pipeline.diffusion.families.base import Conditioning
from lora_pipeline.diffusion.families.unet import UNetFamily, token_ids


class SD1Family(UNetFamily):
    name = "sd1"
    display_name = "Stable Diffusion 1.x"
    short_name = "SD1.x"
    pipeline_class_name = "StableDiffusionPipeline"
    pipeline_class_prefix = "StableDiffusion"
    text_encoders = ("text_encoder",)
    tokenizers = ("tokenizer",)
    kohya_te_prefixes = ("lora_te_",)
    default_resolution = 512
    lora_architecture_prefix = "stable-diffusion-v1"
    lora_base_versions = ("sd_v1",)
    checkpoint_marker = "cond_stage_model."
    single_file_text_encoders = (("cond_stage_model.transformer.", "clip"),)

    def recognises_kohya_name(self, name: str) -> bool:
        return name.startswith(("lora_te_", "lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_"))

    def pipeline_load_kwargs(self) -> dict[str, Any]:
        return {"safety_checker": None, "requires_safety_checker": False}

    def pipeline_init_kwargs(self) -> dict[str, Any]:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def encode_prompt(self, text_encoders: Sequence[Any], tokenizers: Sequence[Any], texts: Sequence[str],
                      device: torch.device, clip_skip: int = 1) -> Conditioning:
        """``clip_skip`` counts as kohya and WebUI do: 1 is the last layer, 2 the penultimate one (then CLIP's final
        layer norm, as kohya's train_util and diffusers' ``clip_skip`` apply it)."""
        ids = token_ids(tokenizers[0], texts, device)
        if clip_skip <= 1:
            return Conditioning(text_encoders[0](ids)[0])
        encoder = getattr(text_encoders[0], "module", text_encoders[0])
        encoder = getattr(encoder, "text_model", encoder)  # transformers 4 nests it; 5 does not
        out = text_encoders[0](ids, output_hidden_states=True)
        return Conditioning(encoder.final_layer_norm(out.hidden_states[-clip_skip]))

    def prompt_kwargs(self, pipe, prompt: str, negative: str | None, clip_skip: int | None) -> dict[str, Any]:
        """The text itself, or with clip_skip 2 the embeddings of prompt and negative prompt, both from the
        penultimate layer (as WebUI does it).

        Computed here rather than through the pipeline's own ``clip_skip``: diffusers 0.42 reaches for
        ``text_encoder.text_model``, which transformers 5 no longer has, and it leaves the negative prompt at
        the last layer."""
        if not clip_skip or clip_skip <= 1:
            return super().prompt_kwargs(pipe, prompt, negative, clip_skip)
        with torch.no_grad():
            embed = [self.encode_prompt([pipe.text_encoder], [pipe.tokenizer], [text], pipe.device, clip_skip).hidden
                     for text in (prompt, negative or "")]
        return {"prompt_embeds": embed[0], "negative_prompt_embeds": embed[1]}

    def kohya_header(self, summary: Any) -> dict[str, str]:
        return {"ss_base_model_version": "sd_v1", "ss_v2": "False",
                "modelspec.architecture": "stable-diffusion-v1/lora"}


SD1 = SD1Family()
