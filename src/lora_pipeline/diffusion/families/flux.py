"""Flux.1 (dev and schnell): a diffusion transformer (``FluxTransformer2DModel``) trained with flow matching, CLIP-L
(its pooled output) and T5 (its token sequence) as text encoders, a 16-channel VAE with a shift, latents packed
2x2 into a token sequence with image position ids, and -- dev only -- a guidance embedding.

kohya's names are those of the original (BFL) model, where q/k/v are one ``qkv`` Linear and a single block's
q/k/v and MLP input one ``linear1``: :mod:`lora_pipeline.diffusion.flux_names` fuses and splits them. CLIP-L is
``lora_te1_``, T5 ``lora_te3_`` (kohya's ``lora_flux.py``). Downloaded files in the BFL/ComfyUI, OneTrainer, OMI
and SimpleTuner layouts are read too (:meth:`FluxFamily.lora_file_index`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from lora_pipeline.core.errors import DataError
from lora_pipeline.diffusion.families.base import Conditioning, NoisedBatch
from lora_pipeline.diffusion.families.transformer import FlowMatchObjective, TransformerFamily
from lora_pipeline.diffusion.flux_names import (
    CLIP_PREFIXES,
    FILE_LAYOUTS,
    FLUX1_LAYOUT,
    OMI_PREFIX,
    T5_PREFIXES,
    FileLayout,
    linear_layers,
)

__all__ = ["BLOCK_LINEARS", "FLUX", "FlowMatchObjective", "FluxFamily"]

# kohya's default Flux targets: every Linear of the double and single blocks (as one regex: the transformer's own
# top-level ``proj_out`` and ``norm_out.linear`` are not blocks and stay frozen).
BLOCK_LINEARS = (r"(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
                 r"to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|norm1\.linear|norm1_context\.linear)"
                 r"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out|norm\.linear))")
# The longest T5 sequence FluxPipeline (and ChromaPipeline) take, and kohya's t5xxl_max_token_length for dev and
# Chroma; a T5 tokenizer with a shorter model_max_length (the demo's pre-trained tiny Flux.1) is used at its own.
T5_LENGTH = 512
GUIDANCE_FOR_TRAINING = 1.0  # what kohya's docs and diffusers' example train dev at


class FluxFamily(TransformerFamily):
    name = "flux"
    display_name = "Flux.1"
    short_name = "Flux.1"
    pipeline_class_name = "FluxPipeline"
    pipeline_class_prefix = "Flux"
    text_encoders = ("text_encoder", "text_encoder_2")  # CLIP-L, T5
    tokenizers = ("tokenizer", "tokenizer_2")
    kohya_te_prefixes = ("lora_te1_", "lora_te3_")
    default_resolution = 1024
    lora_architecture_prefix = "flux-1"
    lora_base_versions = ("flux1",)
    checkpoint_marker = "double_blocks."
    single_file_text_encoders = ()
    single_file_is_denoiser_only = True  # BFL's flux1-dev.safetensors: the transformer in its original layout
    layout = FLUX1_LAYOUT

    block_linears = BLOCK_LINEARS
    trained_text_encoders = ("text_encoder",)  # CLIP-L (kohya trains T5 only on request, not offered here)
    no_clip_skip_because = ("a Flux.1", "Flux uses CLIP-L's pooled output, which has no layers to skip (kohya's Flux scripts ignore clip_skip)")

    def recognises_checkpoint(self, keys: Sequence[str]) -> bool:
        """BFL's layout, without Chroma's distilled guidance layer or Flux.2's shared modulation."""
        return super().recognises_checkpoint(keys) and not any(
            k.removeprefix("model.diffusion_model.").startswith(("distilled_guidance_layer.",
                                                                  "double_stream_modulation_img.")) for k in keys)

    def recognises_kohya_name(self, name: str) -> bool:
        return name.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_te3_"))

    # ------------------------------------------------------------------ prompts

    def encode_prompt(self, text_encoders: Sequence[Any], tokenizers: Sequence[Any], texts: Sequence[str],
                      device: torch.device, clip_skip: int = 1) -> Conditioning:
        """As ``FluxPipeline.encode_prompt``: CLIP-L's pooled output (77 tokens) and T5's last hidden states over
        :meth:`t5_length` tokens, padded (kohya's ``apply_t5_attn_mask`` off, as Flux was trained)."""
        self.check_clip_skip(clip_skip)
        clip_ids = tokenizers[0](list(texts), padding="max_length", max_length=tokenizers[0].model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(device)
        pooled = text_encoders[0](clip_ids, output_hidden_states=False).pooler_output
        t5_ids = tokenizers[1](list(texts), padding="max_length", max_length=self.t5_length(tokenizers[1]),
                               truncation=True, return_tensors="pt").input_ids.to(device)
        return Conditioning(text_encoders[1](t5_ids, output_hidden_states=False)[0], pooled)

    @staticmethod
    def t5_length(tokenizer: Any) -> int:
        """The T5 sequence's length, at training and sampling alike: :data:`T5_LENGTH` or the tokenizer's own."""
        return min(T5_LENGTH, tokenizer.model_max_length)

    def prompt_kwargs(self, pipe, prompt: str, negative: str | None, clip_skip: int | None) -> dict[str, Any]:
        """Flux.1 is guidance-distilled: a negative prompt has no place (``guidance_scale`` is the embedded one)."""
        if clip_skip and clip_skip > 1:
            self.check_clip_skip(clip_skip)
        return {"prompt": prompt, "max_sequence_length": self.t5_length(pipe.tokenizer_2)}

    # ------------------------------------------------------------------ the objective and the denoiser call

    def predict(self, denoiser: Any, batch: NoisedBatch, cond: Conditioning, micro: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        """:meth:`packed_call` with CLIP-L's pooled embedding and -- dev -- the guidance embedding at 1."""
        guidance = (torch.full((batch.model_input.shape[0],), GUIDANCE_FOR_TRAINING, device=batch.model_input.device,
                               dtype=dtype) if denoiser.config.guidance_embeds else None)
        return self.packed_call(denoiser, batch, cond, dtype, guidance=guidance,
                                pooled_projections=cond.pooled.to(dtype))

    def packed_call(self, denoiser: Any, batch: NoisedBatch, cond: Conditioning, dtype: torch.dtype,
                    **extra: Any) -> torch.Tensor:
        """The Flux-style call: latents packed into 2x2 patches with their image position ids, text ids at zero,
        the sigmas as timesteps (the transformer scales them by 1000); the prediction unpacked again."""
        from diffusers import FluxPipeline

        latents = batch.model_input
        b, c, h, w = latents.shape
        if h % 2 or w % 2:
            raise DataError(f"{self.display_name} packs latents in 2x2 patches: a {w * 8}x{h * 8} px bucket gives odd "
                            f"latent sides; use buckets that are multiples of 16 px (normalization.bucket_step: 64).")
        packed = FluxPipeline._pack_latents(latents.to(dtype), b, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, dtype)
        text_ids = torch.zeros(cond.hidden.shape[1], 3, device=latents.device, dtype=dtype)
        out = denoiser(hidden_states=packed, timestep=batch.timesteps.to(dtype), encoder_hidden_states=
                       cond.hidden.to(dtype), txt_ids=text_ids, img_ids=image_ids, return_dict=False, **extra)[0]
        return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)

    # ------------------------------------------------------------------ LoRA files

    lora_file_layouts: tuple[FileLayout, ...] = FILE_LAYOUTS  # besides kohya's and diffusers' own
    # the text encoders' names in the ComfyUI, OMI and OneTrainer layouts
    file_text_encoder_prefixes: tuple[tuple[str, Any], ...] = (("text_encoder", CLIP_PREFIXES),
                                                               ("text_encoder_2", T5_PREFIXES))

    def lora_file_index(self, modules: Mapping[str, torch.nn.Module]) -> dict[str, Any]:
        """The transformer families' names (kohya, ``diffusion_model.<BFL module>``, OneTrainer, SimpleTuner), plus
        OMI's ``transformer.<BFL module>[.<part>]`` and the text encoders' ComfyUI, OMI and OneTrainer names
        (:data:`FILE_LAYOUTS`)."""
        index: dict[str, Any] = super().lora_file_index(modules)
        denoiser = modules.get(self.denoiser)
        if denoiser is not None:
            for original, group in self.layout.fused_modules(list(linear_layers(denoiser))).items():
                if len(group.parts) == 1:
                    index[OMI_PREFIX + original] = index[self.kohya_denoiser_prefix + original.replace(".", "_")]
                for part in group.parts if len(group.parts) > 1 else ():
                    index[f"{OMI_PREFIX}{original}.{self.layout.original_name(part)[1]}"] = (self.denoiser, part)
        for component, prefixes in self.file_text_encoder_prefixes:
            model = modules.get(component)
            for path, _ in model.named_modules() if model is not None else ():
                if not path:
                    continue
                # CLIP keys keep transformers 4's text_model. wrapper (ComfyUI's spelling), whichever built it
                name = "text_model." + path.removeprefix("text_model.") if component in self.clip_encoders else path
                for prefix, flat in prefixes:
                    index.setdefault(prefix + (name.replace(".", "_") if flat else name), (component, path))
        return index

    def naming_layout(self, denoiser_config: Any) -> dict[str, Any]:
        return {"guidance_embeds": bool(denoiser_config.guidance_embeds)}

    def recipe(self, params: Any, denoiser_config: Any) -> dict[str, str]:
        """What kohya's flux_train_network.py records of the objective, for the header."""
        return {"ss_guidance_scale": str(GUIDANCE_FOR_TRAINING), **self.flow_recipe(params),
                "ss_apply_t5_attn_mask": "False"}

    def kohya_header(self, summary: Any) -> dict[str, str]:
        dev = summary.unet_layout.get("guidance_embeds", True)
        return {"ss_base_model_version": "flux1", "ss_v2": "False",
                "modelspec.architecture": "flux-1-dev/lora" if dev else "flux-1-schnell/lora", **summary.recipe}


FLUX = FluxFamily()
