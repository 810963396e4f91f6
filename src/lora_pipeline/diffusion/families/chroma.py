"""Chroma: Flux.1-schnell's architecture with the per-block modulation Linears pruned (one small "distilled guidance"
network computes every block's modulation), trained with flow matching; T5 is its only text encoder, with its
attention mask (all padding masked except the first pad token, as ``ChromaPipeline`` does), and it samples with
real classifier-free guidance (a negative prompt), not a guidance embedding.

Its LoRA files are Flux's: kohya's ``lora_flux.py`` trains it (``--model_type chroma``) with the BFL names
(``lora_unet_double_blocks_N_img_attn_qkv``, ``…_single_blocks_N_linear1``), T5 as ``lora_te3_``; ComfyUI maps
them and ``diffusion_model.<BFL module>``; ``ChromaPipeline`` reads them with diffusers' Flux converter. The
header says ``ss_base_model_version: chroma``, ``modelspec.architecture: chroma/lora``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from lora_pipeline.diffusion.families.base import Conditioning, NoisedBatch
from lora_pipeline.diffusion.families.flux import FluxFamily
from lora_pipeline.diffusion.flux_names import T5_PREFIXES


class ChromaFamily(FluxFamily):
    name = "chroma"
    display_name = "Chroma"
    short_name = "Chroma"
    pipeline_class_name = "ChromaPipeline"
    pipeline_class_prefix = "Chroma"
    text_encoders = ("text_encoder",)  # T5
    tokenizers = ("tokenizer",)
    kohya_te_prefixes = ("lora_te3_",)
    clip_encoders = ()
    file_text_encoder_prefixes = (("text_encoder", T5_PREFIXES),)
    lora_architecture_prefix = "chroma"
    lora_base_versions = ("chroma",)

    trained_text_encoders = ()  # T5: kohya's train_t5xxl, not offered here
    no_clip_skip_because = ("a Chroma", "Chroma has no CLIP encoder")

    def recognises_checkpoint(self, keys: Sequence[str]) -> bool:
        return any("distilled_guidance_layer." in key for key in keys)

    def recognises_kohya_name(self, name: str) -> bool:
        return False  # the same names as Flux.1's: nothing tells them apart

    # ------------------------------------------------------------------ prompts

    def encode_prompt(self, text_encoders: Sequence[Any], tokenizers: Sequence[Any], texts: Sequence[str],
                      device: torch.device, clip_skip: int = 1) -> Conditioning:
        """``ChromaPipeline.encode_prompt`` itself over this T5: its sequence and its attention mask."""
        from diffusers import ChromaPipeline

        self.check_clip_skip(clip_skip)
        pipe = ChromaPipeline(scheduler=None, vae=None, text_encoder=text_encoders[0], tokenizer=tokenizers[0],
                              transformer=None)
        hidden, _, mask, *_ = pipe.encode_prompt(list(texts), device=device, do_classifier_free_guidance=False,
                                                 max_sequence_length=self.t5_length(tokenizers[0]))
        return Conditioning(hidden, mask=mask)

    def prompt_kwargs(self, pipe, prompt: str, negative: str | None, clip_skip: int | None) -> dict[str, Any]:
        """Chroma samples with classifier-free guidance: a negative prompt has its place."""
        if clip_skip and clip_skip > 1:
            self.check_clip_skip(clip_skip)
        return {"prompt": prompt, "negative_prompt": negative or None,
                "max_sequence_length": self.t5_length(pipe.tokenizer)}

    # ------------------------------------------------------------------ the denoiser call

    def predict(self, denoiser: Any, batch: NoisedBatch, cond: Conditioning, micro: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        """The Flux call with the text mask extended over the image tokens (``ChromaPipeline``'s own rule)."""
        b, _, h, w = batch.model_input.shape
        image_tokens = (h // 2) * (w // 2)
        mask = None
        if cond.mask is not None:
            mask = torch.cat([cond.mask.to(torch.bool),
                              torch.ones(b, image_tokens, dtype=torch.bool, device=cond.mask.device)], dim=1)
        return self.packed_call(denoiser, batch, cond, dtype, attention_mask=mask)

    # ------------------------------------------------------------------ header

    def naming_layout(self, denoiser_config: Any) -> dict[str, Any]:
        return {}

    def recipe(self, params: Any, denoiser_config: Any) -> dict[str, str]:
        return {**self.flow_recipe(params), "ss_apply_t5_attn_mask": "True"}

    def kohya_header(self, summary: Any) -> dict[str, str]:
        return {"ss_base_model_version": "chroma", "ss_v2": "False", "modelspec.architecture": "chroma/lora",
                **summary.recipe}


CHROMA = ChromaFamily()
