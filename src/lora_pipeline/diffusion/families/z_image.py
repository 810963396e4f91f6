"""Z-Image (Tongyi-MAI Z-Image, Z-Image-Turbo): a single-stream DiT (``ZImageTransformer2DModel``: noise and context
refiner blocks, then 30 main ``layers`` over the joined image and caption tokens) trained with flow matching; its
one text encoder is Qwen3-4B, whose second-to-last hidden state over Qwen's chat template conditions it, one
variable-length sequence per prompt (``ZImagePipeline.encode_prompt`` drops the padding); Flux.1's 16-channel VAE.

The transformer's time runs the other way: ``ZImagePipeline`` gives it ``1 - sigma`` (it scales by 1000 itself) and
negates its output before the Euler step, so the transformer predicts ``x - noise``, the velocity's negative.

LoRA files: musubi-tuner (the trainer Z-Image users use with kohya-style files) trains every Linear of the main
``layers`` but their modulation (``exclude_patterns .*(_modulation|_refiner).*``) and names them by diffusers'
paths (``lora_unet_layers_0_attention_to_q``); its ``convert_z_image_lora_to_comfy.py`` writes the file ComfyUI
loads: the original checkpoint's names, ``attention.qkv`` fused (alpha times 3) and ``attention.out``. That is the
file written here. ComfyUI maps ``lora_unet_<original path>`` and ``diffusion_model.<original path>`` for every
weight, and for Z-Image also ``diffusion_model.`` / ``transformer.`` + diffusers paths (``comfy/utils.py
z_image_to_diffusers``); diffusers reads all of these (``_convert_non_diffusers_z_image_lora_to_diffusers``). The
header says ``modelspec.architecture: Z-Image/lora`` (musubi's) and ``ss_base_model_version: z_image``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from lora_pipeline.core.errors import DataError
from lora_pipeline.diffusion.families.base import Conditioning, NoisedBatch
from lora_pipeline.diffusion.families.transformer import ORIGINAL_PREFIX, TransformerFamily
from lora_pipeline.diffusion.original_layout import BlockMap, OriginalLayout, linear_layers


def _blocks(kind: str) -> BlockMap:
    """One kind of Z-Image block: the same modules in every kind (the context refiner has no modulation)."""
    return BlockMap(kind, kind,
                    {"attention.to_out.0": "attention.out", "feed_forward.w1": "feed_forward.w1",
                     "feed_forward.w2": "feed_forward.w2", "feed_forward.w3": "feed_forward.w3",
                     "adaLN_modulation.0": "adaLN_modulation.0"},
                    {"attention.qkv": ("attention.to_q", "attention.to_k", "attention.to_v")})


Z_IMAGE_LAYOUT = OriginalLayout(_blocks("layers"), _blocks("noise_refiner"), _blocks("context_refiner"))
# musubi-tuner's default: the attention and feed-forward Linears of the main layers (no modulation, no refiners).
BLOCK_LINEARS = r"layers\.\d+\.(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.(w1|w2|w3))"
QWEN_LENGTH = 512  # ZImagePipeline's max_sequence_length
PATCH = 2  # the transformer's patch side (its all_patch_size)


class ZImageFamily(TransformerFamily):
    name = "z_image"
    display_name = "Z-Image"
    short_name = "Z-Image"
    pipeline_class_name = "ZImagePipeline"
    pipeline_class_prefix = "ZImage"
    text_encoders = ("text_encoder",)  # Qwen3
    tokenizers = ("tokenizer",)
    kohya_te_prefixes = ("lora_te1_",)
    clip_encoders = ()
    default_resolution = 1024
    lora_architecture_prefix = "Z-Image"
    lora_base_versions = ("z_image",)
    checkpoint_marker = "layers.0.adaLN_modulation.0."
    single_file_text_encoders = ()
    single_file_is_denoiser_only = True  # z_image_turbo_bf16.safetensors: the transformer in its original layout
    layout = Z_IMAGE_LAYOUT

    block_linears = BLOCK_LINEARS  # musubi-tuner's default
    trained_text_encoders = ()  # Qwen3: musubi does not train it
    no_clip_skip_because = ("a Z-Image", "Z-Image conditions on Qwen3's second-to-last layer already and has no CLIP encoder")

    def recognises_checkpoint(self, keys: Sequence[str]) -> bool:
        """The original layout's modulated main layer (Lumina 2, the same NextDiT otherwise, keeps a SiLU at index
        0 of its ``adaLN_modulation``); with or without ComfyUI's ``model.diffusion_model.``."""
        return any(key.removeprefix("model.diffusion_model.").startswith(self.checkpoint_marker) for key in keys)

    def recognises_kohya_name(self, name: str) -> bool:
        return name.startswith(("lora_unet_layers_", "lora_unet_noise_refiner_", "lora_unet_context_refiner_"))

    # ------------------------------------------------------------------ prompts

    def encode_prompt(self, text_encoders: Sequence[Any], tokenizers: Sequence[Any], texts: Sequence[str],
                      device: torch.device, clip_skip: int = 1) -> Conditioning:
        """``ZImagePipeline.encode_prompt`` itself over this Qwen3 (chat template, second-to-last hidden state), its
        per-prompt sequences zero-padded to the encoding length with a mask, so that every cache entry has one
        shape and a batch stacks."""
        from diffusers import ZImagePipeline

        self.check_clip_skip(clip_skip)
        pipe = ZImagePipeline(scheduler=None, vae=None, text_encoder=text_encoders[0], tokenizer=tokenizers[0],
                              transformer=None)
        length = self.qwen_length(tokenizers[0])
        sequences, _ = pipe.encode_prompt(list(texts), device=device, do_classifier_free_guidance=False,
                                          max_sequence_length=length)
        hidden = sequences[0].new_zeros(len(sequences), length, sequences[0].shape[-1])
        mask = torch.zeros(len(sequences), length, dtype=torch.bool, device=hidden.device)
        for index, sequence in enumerate(sequences):
            hidden[index, :len(sequence)] = sequence
            mask[index, :len(sequence)] = True
        return Conditioning(hidden, mask=mask)

    @staticmethod
    def qwen_length(tokenizer: Any) -> int:
        return min(QWEN_LENGTH, tokenizer.model_max_length)

    def prompt_kwargs(self, pipe, prompt: str, negative: str | None, clip_skip: int | None) -> dict[str, Any]:
        """Z-Image samples with classifier-free guidance (Turbo at guidance 0, which skips the negative)."""
        kwargs = super().prompt_kwargs(pipe, prompt, negative, clip_skip)
        return {**kwargs, "max_sequence_length": self.qwen_length(pipe.tokenizer)}

    # ------------------------------------------------------------------ the denoiser call

    def predict(self, denoiser: Any, batch: NoisedBatch, cond: Conditioning, micro: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        """``ZImagePipeline``'s call: one (C, 1, H, W) latent and one unpadded caption per image, time ``1 - sigma``;
        its output negated into the velocity the objective targets."""
        latents = batch.model_input
        if latents.shape[-1] % PATCH or latents.shape[-2] % PATCH:
            raise DataError(f"Z-Image patches latents {PATCH}x{PATCH}: a {latents.shape[-1] * 8}x"
                            f"{latents.shape[-2] * 8} px bucket gives odd latent sides; use buckets that are multiples "
                            f"of 16 px (normalization.bucket_step: 64).")
        hidden = cond.hidden.to(dtype)
        # the cache keeps the mask as floats, like every conditioning tensor
        mask = cond.mask.to(torch.bool) if cond.mask is not None else torch.ones(hidden.shape[:2], dtype=torch.bool,
                                                                                 device=hidden.device)
        captions = [sequence[keep] for sequence, keep in zip(hidden, mask)]
        out = denoiser(list(latents.to(dtype).unsqueeze(2).unbind(0)), (1 - batch.timesteps).to(dtype), captions,
                       return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    # ------------------------------------------------------------------ LoRA files

    def lora_file_index(self, modules: Mapping[str, torch.nn.Module]) -> dict[str, Any]:
        """The original-layout names (kohya's, ComfyUI's) plus Z-Image's two diffusers-path layouts: ai-toolkit's
        ``diffusion_model.<diffusers path>`` (which ComfyUI maps for Z-Image) and musubi-tuner's own
        ``lora_unet_<diffusers path>`` (q, k and v apart, ``attention_to_out_0``)."""
        index = super().lora_file_index(modules)
        denoiser = modules.get(self.denoiser)
        if denoiser is not None:
            for path in linear_layers(denoiser):
                index.setdefault(ORIGINAL_PREFIX + path, (self.denoiser, path))
                index.setdefault(self.kohya_denoiser_prefix + path.replace(".", "_"), (self.denoiser, path))
        return index

    # ------------------------------------------------------------------ header

    def recipe(self, params: Any, denoiser_config: Any) -> dict[str, str]:
        return self.flow_recipe(params)

    def kohya_header(self, summary: Any) -> dict[str, str]:
        return {"ss_base_model_version": "z_image", "ss_v2": "False", "modelspec.architecture": "Z-Image/lora",
                **summary.recipe}


Z_IMAGE = ZImageFamily()
