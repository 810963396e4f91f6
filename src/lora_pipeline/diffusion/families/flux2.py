"""Flux.2 (dev): a diffusion transformer (``Flux2Transformer2DModel``) trained with flow matching, conditioned on
Mistral-Small-3's (``Mistral3ForConditionalGeneration``) hidden states 10, 20 and 30 stacked along the feature axis
over the pipeline's chat template (512 padded tokens, no mask reaches the transformer), a 32-channel VAE
(``AutoencoderKLFlux2``) whose latents are patchified 2x2 into 128 channels and normalised by the VAE's own
batch-norm statistics, a guidance embedding, and 4-axis position ids (T, H, W, L; the text's along L).

The time and sign are Flux.1's: ``Flux2Pipeline`` gives the transformer sigma (it scales by 1000 itself) and steps
Euler with its output, the velocity ``noise - x``.

Its blocks differ from Flux.1's: modulation is shared (``double_stream_modulation_img/txt``,
``single_stream_modulation`` outside the blocks, no per-block ``*_mod.lin``), and a single block's q/k/v and MLP
input are already one Linear in diffusers (``attn.to_qkv_mlp_proj`` = BFL ``linear1``). Only the double blocks'
q/k/v are fused on export. kohya's sd-scripts does not train Flux.2; the files its users load are musubi-tuner's
kohya-style ``lora_unet_<BFL path>`` and ai-toolkit's ``diffusion_model.<BFL path>``, which diffusers reads with
``_convert_kohya_flux2_lora_to_diffusers`` / ``_convert_non_diffusers_flux2_lora_to_diffusers``: the default
targets are the modules those converters name (every Linear of the double and single blocks). The header says
``ss_base_model_version: flux2``, ``modelspec.architecture: flux-2-dev/lora``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from lora_pipeline.core.errors import DataError
from lora_pipeline.diffusion.families.base import Conditioning, NoisedBatch
from lora_pipeline.diffusion.families.flux import GUIDANCE_FOR_TRAINING, FluxFamily
from lora_pipeline.diffusion.families.transformer import ORIGINAL_PREFIX
from lora_pipeline.diffusion.flux_names import BFL_PREFIX, FileLayout
from lora_pipeline.diffusion.original_layout import BlockMap, OriginalLayout, linear_layers

__all__ = ["BLOCK_LINEARS", "FLUX2", "FLUX2_LAYOUT", "Flux2Family"]

# diffusers module (within a block) -> BFL module (within the same block), as diffusers' Flux.2 converters map them.
FLUX2_LAYOUT = OriginalLayout(
    BlockMap("transformer_blocks", "double_blocks",
             {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.linear_in": "img_mlp.0",
              "ff.linear_out": "img_mlp.2", "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"},
             {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
              "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}),
    BlockMap("single_transformer_blocks", "single_blocks",
             {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}),
)
# Every Linear of the double and single blocks (the shared modulation, embedders and final layer stay frozen).
BLOCK_LINEARS = (r"(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
                 r"to_add_out)|ff\.(linear_in|linear_out)|ff_context\.(linear_in|linear_out))"
                 r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out))")
MISTRAL_LENGTH = 512  # Flux2Pipeline's max_sequence_length
PATCH = 2  # the VAE latents' 2x2 patchify before the batch norm


class Flux2Family(FluxFamily):
    name = "flux2"
    display_name = "Flux.2"
    short_name = "Flux.2"
    pipeline_class_name = "Flux2Pipeline"
    pipeline_class_prefix = "Flux2"
    text_encoders = ("text_encoder",)  # Mistral-Small-3
    tokenizers = ("tokenizer",)
    kohya_te_prefixes = ("lora_te1_",)
    clip_encoders = ()
    file_text_encoder_prefixes = ()
    lora_file_layouts = (FileLayout("BFL / ai-toolkit", "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight",
                                    ((BFL_PREFIX, "transformer"),)),)
    lora_architecture_prefix = "flux-2"
    lora_base_versions = ("flux2",)
    checkpoint_marker = "double_stream_modulation_img."
    layout = FLUX2_LAYOUT

    block_linears = BLOCK_LINEARS
    trained_text_encoders = ()  # Mistral: no Flux.2 trainer trains it
    no_clip_skip_because = ("a Flux.2", "Flux.2 conditions on Mistral's layers 10, 20 and 30 and has no CLIP encoder")

    def recognises_pipeline_class(self, class_name: str, variants: bool = False) -> int:
        """Flux2Pipeline and its variants, but not Flux.2 Klein (a Qwen3 encoder: another family, not built)."""
        return 0 if class_name.startswith("Flux2Klein") else super().recognises_pipeline_class(class_name, variants)

    def recognises_checkpoint(self, keys: Sequence[str]) -> bool:
        """BFL's flux2-dev layout (shared modulation), with or without ComfyUI's ``model.diffusion_model.``."""
        return any(key.removeprefix("model.diffusion_model.").startswith(self.checkpoint_marker) for key in keys)

    def recognises_kohya_name(self, name: str) -> bool:
        return False  # Flux.1's BFL names: nothing in a module name tells them apart

    # ------------------------------------------------------------------ prompts

    def encode_prompt(self, text_encoders: Sequence[Any], tokenizers: Sequence[Any], texts: Sequence[str],
                      device: torch.device, clip_skip: int = 1) -> Conditioning:
        """``Flux2Pipeline.encode_prompt`` itself over this Mistral (system message, chat template, layers 10/20/30
        stacked): one padded sequence per prompt of the same length, so no mask is needed to stack a batch."""
        from diffusers import Flux2Pipeline

        self.check_clip_skip(clip_skip)
        pipe = Flux2Pipeline(scheduler=None, vae=None, text_encoder=text_encoders[0], tokenizer=tokenizers[0],
                             transformer=None)
        hidden, _ = pipe.encode_prompt(list(texts), device=device, max_sequence_length=self.mistral_length(tokenizers[0]))
        return Conditioning(hidden)

    @staticmethod
    def mistral_length(tokenizer: Any) -> int:
        """The pipeline's 512, or less where the tokenizer (a processor's, or the tiny one) allows less."""
        limit = getattr(getattr(tokenizer, "tokenizer", tokenizer), "model_max_length", MISTRAL_LENGTH)
        return min(MISTRAL_LENGTH, limit)

    def prompt_kwargs(self, pipe, prompt: str, negative: str | None, clip_skip: int | None) -> dict[str, Any]:
        """Flux.2 dev is guidance-distilled (no negative prompt), its encoding length the one training cached."""
        if clip_skip and clip_skip > 1:
            self.check_clip_skip(clip_skip)
        return {"prompt": prompt, "max_sequence_length": self.mistral_length(pipe.tokenizer)}

    # ------------------------------------------------------------------ latents and the denoiser call

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator,
                       vae: Any) -> torch.Tensor:
        """A latent drawn from the VAE's distribution, patchified 2x2 (32 -> 128 channels) and normalised by the
        VAE's batch-norm running statistics, as ``Flux2Pipeline._encode_vae_image`` does (the pipeline undoes both
        before decoding)."""
        from diffusers import Flux2Pipeline

        single = mean.ndim == 3  # one image (evaluation) or a batch (training)
        latents = mean + std * torch.randn(mean.shape, generator=generator)
        latents = latents.unsqueeze(0) if single else latents
        if latents.shape[-1] % PATCH or latents.shape[-2] % PATCH:
            raise DataError(f"Flux.2 patchifies latents {PATCH}x{PATCH}: a {latents.shape[-1] * 8}x"
                            f"{latents.shape[-2] * 8} px bucket gives odd latent sides; use buckets that are multiples "
                            f"of 16 px (normalization.bucket_step: 64).")
        latents = Flux2Pipeline._patchify_latents(latents)
        bn_mean = vae.bn.running_mean.detach().float().cpu().view(1, -1, 1, 1)
        bn_std = torch.sqrt(vae.bn.running_var.detach().float().cpu().view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        latents = (latents - bn_mean) / bn_std
        return latents.squeeze(0) if single else latents

    def predict(self, denoiser: Any, batch: NoisedBatch, cond: Conditioning, micro: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        """``Flux2Pipeline``'s call: the (B, 128, h, w) latents packed into h*w tokens with (0, h, w, 0) ids, the
        text's ids (0, 0, 0, l), sigma as the timestep, the guidance embedding at 1; the output unpacked."""
        from diffusers import Flux2Pipeline

        latents = batch.model_input
        b, c, h, w = latents.shape
        hidden = cond.hidden.to(dtype)
        guidance = (torch.full((b,), GUIDANCE_FOR_TRAINING, device=latents.device, dtype=dtype)
                    if denoiser.config.guidance_embeds else None)
        out = denoiser(hidden_states=Flux2Pipeline._pack_latents(latents.to(dtype)), encoder_hidden_states=hidden,
                       timestep=batch.timesteps.to(dtype), guidance=guidance,
                       img_ids=Flux2Pipeline._prepare_latent_ids(latents).to(latents.device),
                       txt_ids=Flux2Pipeline._prepare_text_ids(hidden).to(latents.device), return_dict=False)[0]
        return out.permute(0, 2, 1).reshape(b, c, h, w)

    # ------------------------------------------------------------------ LoRA files

    def lora_file_index(self, modules: Mapping[str, torch.nn.Module]) -> dict[str, Any]:
        """kohya's (musubi-tuner's) and the BFL ``diffusion_model.`` names (Flux.1's layouts, via FluxFamily), plus
        the expanded diffusers paths some ai-toolkit exports keep under ``diffusion_model.`` (diffusers' Flux.2
        converter accepts them)."""
        index = super().lora_file_index(modules)
        denoiser = modules.get(self.denoiser)
        if denoiser is not None:
            for path in linear_layers(denoiser):
                index.setdefault(ORIGINAL_PREFIX + path, (self.denoiser, path))
        return index

    def naming_layout(self, denoiser_config: Any) -> dict[str, Any]:
        return {}

    def recipe(self, params: Any, denoiser_config: Any) -> dict[str, str]:
        return {"ss_guidance_scale": str(GUIDANCE_FOR_TRAINING), **self.flow_recipe(params)}

    def kohya_header(self, summary: Any) -> dict[str, str]:
        return {"ss_base_model_version": "flux2", "ss_v2": "False", "modelspec.architecture": "flux-2-dev/lora",
                **summary.recipe}


FLUX2 = Flux2Family()
