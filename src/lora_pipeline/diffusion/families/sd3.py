"""Stable Diffusion 3 / 3.5 (Medium, Large): an MMDiT (``SD3Transformer2DModel``) trained with flow matching, three
text encoders -- CLIP-L and CLIP-G (penultimate states side by side, plus both pooled projections) and T5 (its
sequence, after the CLIP states) -- and a 16-channel VAE with a shift.

kohya's names (``networks/lora_sd3.py``) are those of the original MMDiT: ``lora_unet_joint_blocks_N_x_block_attn_qkv``
(q/k/v in one Linear, fused here as for Flux), ``…_context_block_mlp_fc1``, ``…_x_block_adaLN_modulation_1``, SD3.5
Medium's ``…_x_block_attn2_qkv``; CLIP-L ``lora_te1_``, CLIP-G ``lora_te2_``, T5 ``lora_te3_``. ComfyUI maps these
(``lora_unet_`` + the original path) and ``diffusion_model.<original path>``; ``comfy/utils.py mmdit_to_diffusers``
is the table. The last block's context half only modulates (``context_pre_only``): its ``adaLN_modulation`` keeps
(shift, scale) where diffusers' ``norm1_context.linear`` keeps (scale, shift), so its LoRA's rows are swapped.

The loss is kohya's and diffusers' example's: the prediction preconditioned to a clean latent (``x_t - sigma v``)
against the latent, which is the velocity loss weighted by sigma squared.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import torch

from lora_pipeline.core.errors import DataError
from lora_pipeline.diffusion.families.base import Conditioning, NoisedBatch
from lora_pipeline.diffusion.families.transformer import TransformerFamily
from lora_pipeline.diffusion.original_layout import BlockMap, OriginalLayout

SD3_LAYOUT = OriginalLayout(BlockMap(
    "transformer_blocks", "joint_blocks",
    {"attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
     "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2", "ff_context.net.0.proj":
     "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2", "norm1.linear":
     "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
     "attn2.to_out.0": "x_block.attn2.proj"},
    {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
     "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
     "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}))

# kohya's default: every Linear of the joint blocks (its SingleDiTBlock halves); embedders and the final layer stay
# frozen. (A block without attn2 or without a context MLP simply has no such module.)
BLOCK_LINEARS = (r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
                 r"to_add_out)|attn2\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|"
                 r"norm1\.linear|norm1_context\.linear)")
T5_LENGTH = 256  # kohya's t5xxl_max_token_length and the pipeline's max_sequence_length for SD3


class SwappedHalves(NamedTuple):
    """An index entry whose original module keeps its two output halves in the other order (the last context
    block's modulation)."""

    component: str
    path: str


def swap_halves(up: torch.Tensor) -> torch.Tensor:
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first])


def variant(config: Any) -> str:
    """kohya's SD3 model type (``sd3_utils``): no q/k norm is SD3 Medium; SD3.5 Medium has x-block self-attention
    layers (``attn2``), SD3.5 Large none."""
    if getattr(config, "qk_norm", None) is None:
        return "medium"
    return "5-medium" if getattr(config, "dual_attention_layers", ()) else "5-large"


class SD3Family(TransformerFamily):
    name = "sd3"
    display_name = "Stable Diffusion 3.5"
    short_name = "SD3.5"
    pipeline_class_name = "StableDiffusion3Pipeline"
    pipeline_class_prefix = "StableDiffusion3"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")  # CLIP-L, CLIP-G, T5
    tokenizers = ("tokenizer", "tokenizer_2", "tokenizer_3")
    kohya_te_prefixes = ("lora_te1_", "lora_te2_", "lora_te3_")
    clip_encoders = ("text_encoder", "text_encoder_2")
    default_resolution = 1024
    lora_architecture_prefix = "stable-diffusion-3"
    lora_base_versions = ("5-large", "5-medium", "medium", "sd3")
    checkpoint_marker = "model.diffusion_model.joint_blocks."
    single_file_text_encoders = ()
    layout = SD3_LAYOUT
    loss_weight_power = 2  # the preconditioned (clean-latent) loss, see the module docstring

    block_linears = BLOCK_LINEARS
    trained_text_encoders = ("text_encoder", "text_encoder_2")  # the two CLIPs (T5 only on request in kohya)
    no_clip_skip_because = ("an SD3.5", "SD3 conditions on CLIP's penultimate layer already, and kohya's SD3 scripts have no clip_skip")

    def recognises_checkpoint(self, keys: Sequence[str]) -> bool:
        return any("joint_blocks." in key for key in keys[:2000])

    def recognises_kohya_name(self, name: str) -> bool:
        return name.startswith("lora_unet_joint_blocks_")

    # ------------------------------------------------------------------ prompts

    def encode_prompt(self, text_encoders: Sequence[Any], tokenizers: Sequence[Any], texts: Sequence[str],
                      device: torch.device, clip_skip: int = 1) -> Conditioning:
        """``StableDiffusion3Pipeline.encode_prompt`` itself, over these encoders: CLIP-L and CLIP-G penultimate
        states side by side, zero-padded to T5's width, then T5's sequence; the pooled projections side by side."""
        from diffusers import StableDiffusion3Pipeline

        self.check_clip_skip(clip_skip)
        encoders = dict(zip(self.text_encoders, text_encoders)) | dict(zip(self.tokenizers, tokenizers))
        pipe = StableDiffusion3Pipeline(transformer=None, scheduler=None, vae=None, **encoders)
        hidden, _, pooled, _ = pipe.encode_prompt(list(texts), None, None, device=device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=self.t5_length(tokenizers[2]))
        return Conditioning(hidden, pooled)

    @staticmethod
    def t5_length(tokenizer: Any) -> int:
        return min(T5_LENGTH, tokenizer.model_max_length)

    def prompt_kwargs(self, pipe, prompt: str, negative: str | None, clip_skip: int | None) -> dict[str, Any]:
        kwargs = super().prompt_kwargs(pipe, prompt, negative, clip_skip)
        return {**kwargs, "max_sequence_length": self.t5_length(pipe.tokenizer_3)}

    # ------------------------------------------------------------------ the denoiser call

    def predict(self, denoiser: Any, batch: NoisedBatch, cond: Conditioning, micro: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        """The latents as they are (the transformer patches them 2x2 itself), timesteps as sigma x 1000."""
        latents = batch.model_input
        patch = denoiser.config.patch_size
        if latents.shape[-1] % patch or latents.shape[-2] % patch:
            raise DataError(f"SD3 patches latents {patch}x{patch}: a {latents.shape[-1] * 8}x{latents.shape[-2] * 8} "
                            f"px bucket gives odd latent sides; use buckets that are multiples of 16 px "
                            f"(normalization.bucket_step: 64).")
        return denoiser(hidden_states=latents.to(dtype), timestep=(batch.timesteps * 1000).to(dtype),
                        encoder_hidden_states=cond.hidden.to(dtype), pooled_projections=cond.pooled.to(dtype),
                        return_dict=False)[0]

    # ------------------------------------------------------------------ LoRA files

    def _last_modulation(self, num_layers: int) -> str:
        return f"transformer_blocks.{num_layers - 1}.norm1_context.linear"

    def kohya_index(self, modules: Mapping[str, torch.nn.Module]) -> dict[str, Any]:
        index = super().kohya_index(modules)
        denoiser = modules.get(self.denoiser)
        if denoiser is not None:
            path = self._last_modulation(denoiser.config.num_layers)
            index[self.kohya_name(self.denoiser, path)] = SwappedHalves(self.denoiser, path)
        return index

    def from_kohya_module(self, name: str, down: torch.Tensor, up: torch.Tensor,
                          index: Mapping[str, Any]) -> list[tuple[str, str, torch.Tensor, torch.Tensor]]:
        entry = index[name]
        if isinstance(entry, SwappedHalves):
            return [(entry.component, entry.path, down, swap_halves(up))]
        return super().from_kohya_module(name, down, up, index)

    def to_kohya_modules(self, pairs: Mapping[tuple[str, str], tuple[torch.Tensor, torch.Tensor]], alpha: float,
                         denoiser_config: Any = None) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        modules = super().to_kohya_modules(pairs, alpha, denoiser_config)
        if denoiser_config is None:
            raise ValueError("SD3 kohya names need the transformer's config (its num_layers: the last block's "
                             "modulation is written with its halves swapped)")
        name = self.kohya_name(self.denoiser, self._last_modulation(denoiser_config.num_layers))
        if name in modules:
            down, up, module_alpha = modules[name]
            modules[name] = (down, swap_halves(up), module_alpha)
        return modules

    def naming_layout(self, denoiser_config: Any) -> dict[str, Any]:
        return {"num_layers": int(denoiser_config.num_layers), "variant": variant(denoiser_config)}

    def recipe(self, params: Any, denoiser_config: Any) -> dict[str, str]:
        """What kohya's sd3_train_network.py records of the objective (no attention masks: as SD3 was trained)."""
        return {**self.flow_recipe(params), "ss_apply_lg_attn_mask": "False", "ss_apply_t5_attn_mask": "False",
                "ss_weighting_scheme": "uniform"}

    def kohya_header(self, summary: Any) -> dict[str, str]:
        model_type = summary.unet_layout.get("variant", "5-large")
        return {"ss_base_model_version": model_type, "ss_v2": "False",
                "modelspec.architecture": f"stable-diffusion-3-{model_type}/lora", **summary.recipe}


SD3 = SD3Family()
