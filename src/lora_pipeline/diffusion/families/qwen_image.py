"""Qwen-Image (Qwen/Qwen-Image): a 60-block MMDiT (``QwenImageTransformer2DModel``: an image and a text stream per
block, joint attention) trained with flow matching; its one text encoder is Qwen2.5-VL-7B, whose last hidden state
over Qwen-Image's chat template conditions it, the template's first 34 tokens (the system turn) dropped, one
variable-length sequence per prompt (``QwenImagePipeline._get_qwen_prompt_embeds``); a video VAE
(``AutoencoderKLQwenImage``, Wan 2.1's: 16 channels, each image one frame) whose latents are normalised per channel
by ``latents_mean`` / ``latents_std`` instead of a scale and shift; latents packed 2x2 into tokens (64 channels).

The transformer's time is the sampler's: ``QwenImagePipeline`` gives it ``sigma`` (``timestep / 1000``) and Euler-
steps its output as it is, so it predicts the velocity ``noise - x`` the objective targets (as Flux.1 does).

LoRA files: the original checkpoint's names are diffusers' module paths (``qwen_image_bf16.safetensors`` in
ComfyUI's models/diffusion_models holds ``transformer_blocks.0.attn.to_q.weight`` ...), so the original layout is
the identity and nothing is fused. musubi-tuner (the kohya-style trainer Qwen-Image users use) trains every Linear
of the ``QwenImageTransformerBlock``s but the modulation (``exclude_patterns .*(_mod_).*``) and names them
``lora_unet_transformer_blocks_0_attn_to_q``: that is the file written here. ComfyUI maps ``lora_unet_<path>``,
``diffusion_model.<path>`` and the bare path for every weight, and for Qwen-Image also ``transformer.<path>`` and
SimpleTuner's ``lycoris_<path>`` (comfy/lora.py); diffusers reads kohya's and ``diffusion_model.`` names
(``_convert_non_diffusers_qwen_lora_to_diffusers``). The header says ``modelspec.architecture: Qwen-Image/lora``
(musubi's) and ``ss_base_model_version: qwen_image``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from lora_pipeline.core.errors import DataError
from lora_pipeline.diffusion.families.base import Conditioning, ModelFamily, NoisedBatch
from lora_pipeline.diffusion.families.transformer import ORIGINAL_PREFIX, TransformerFamily
from lora_pipeline.diffusion.flux_names import FileLayout
from lora_pipeline.diffusion.original_layout import BlockMap, OriginalLayout, linear_layers

# Every Linear of a QwenImageTransformerBlock, under the same name in the original checkpoint.
BLOCK_MODULES = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                 "attn.add_v_proj", "attn.to_add_out", "img_mod.1", "txt_mod.1", "img_mlp.net.0.proj",
                 "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
QWEN_IMAGE_LAYOUT = OriginalLayout(BlockMap("transformer_blocks", "transformer_blocks",
                                            {module: module for module in BLOCK_MODULES}))
# musubi-tuner's default: the blocks' attention and feed-forward Linears of both streams, no modulation (12 a block).
BLOCK_LINEARS = (r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
                 r"to_add_out)|(img|txt)_mlp\.net\.(0\.proj|2))")
QWEN_LENGTH = 1024  # QwenImagePipeline's tokenizer_max_length (and max_sequence_length's ceiling)
PATCH = 2  # the transformer packs 2x2 latent patches into one token
FILE_LAYOUTS = (FileLayout("ComfyUI / ai-toolkit", "diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight",
                           (("diffusion_model.", "transformer"), ("lycoris_", "transformer"))),)


class QwenImageFamily(TransformerFamily):
    name = "qwen_image"
    display_name = "Qwen-Image"
    short_name = "Qwen-Image"
    pipeline_class_name = "QwenImagePipeline"
    pipeline_class_prefix = "QwenImage"  # Img2Img, Inpaint ... (Edit pipelines too: the same transformer)
    text_encoders = ("text_encoder",)  # Qwen2.5-VL
    tokenizers = ("tokenizer",)
    kohya_te_prefixes = ("lora_te1_",)
    clip_encoders = ()
    default_resolution = 1024  # the pipeline's default_sample_size 128 latents
    lora_architecture_prefix = "Qwen-Image"
    lora_base_versions = ("qwen_image",)
    checkpoint_marker = "transformer_blocks.0.img_mod.1."  # the image stream's modulation: only Qwen-Image's blocks
    single_file_text_encoders = ()
    single_file_is_denoiser_only = True  # qwen_image_bf16.safetensors: the transformer alone
    layout = QWEN_IMAGE_LAYOUT
    lora_file_layouts = FILE_LAYOUTS

    block_linears = BLOCK_LINEARS  # musubi-tuner's default
    trained_text_encoders = ()  # Qwen2.5-VL: musubi does not train it
    no_clip_skip_because = ("a Qwen-Image", "Qwen-Image conditions on Qwen2.5-VL's last layer and has no CLIP encoder")

    def recognises_checkpoint(self, keys: Sequence[str]) -> bool:
        """With or without ComfyUI's ``model.diffusion_model.``."""
        return any(key.removeprefix("model.diffusion_model.").startswith(self.checkpoint_marker) for key in keys)

    def recognises_kohya_name(self, name: str) -> bool:
        return name.startswith("lora_unet_transformer_blocks_")

    # ------------------------------------------------------------------ prompts

    def encode_prompt(self, text_encoders: Sequence[Any], tokenizers: Sequence[Any], texts: Sequence[str],
                      device: torch.device, clip_skip: int = 1) -> Conditioning:
        """``QwenImagePipeline.encode_prompt`` itself over this Qwen2.5-VL (template, first tokens dropped, last
        hidden state), zero-padded to the encoding length with its mask, so every cache entry has one shape."""
        from diffusers import QwenImagePipeline

        self.check_clip_skip(clip_skip)
        pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=text_encoders[0], tokenizer=tokenizers[0],
                                 transformer=None)
        length = self.qwen_length(tokenizers[0])
        embeds, mask = pipe.encode_prompt(list(texts), device=device, max_sequence_length=length)
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        hidden = embeds.new_zeros(len(texts), length, embeds.shape[-1])
        hidden[:, :embeds.shape[1]] = embeds * mask[..., None].to(embeds.dtype)
        padded = torch.zeros(len(texts), length, dtype=torch.bool, device=embeds.device)
        padded[:, :embeds.shape[1]] = mask.bool()
        return Conditioning(hidden, mask=padded)

    @staticmethod
    def qwen_length(tokenizer: Any) -> int:
        return min(QWEN_LENGTH, tokenizer.model_max_length)

    def prompt_kwargs(self, pipe, prompt: str, negative: str | None, clip_skip: int | None) -> dict[str, Any]:
        """Qwen-Image samples with true classifier-free guidance (``true_cfg_scale``) when a negative prompt is
        given; the encoding length is the one training cached."""
        kwargs = super().prompt_kwargs(pipe, prompt, negative, clip_skip)
        return {**kwargs, "max_sequence_length": self.qwen_length(pipe.tokenizer)}

    # ------------------------------------------------------------------ latents and the denoiser call

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator,
                       vae: Any) -> torch.Tensor:
        """A latent drawn from the VAE's distribution, normalised per channel as the pipeline un-normalises it before
        decoding (``z = x * latents_std + latents_mean``): ``(z - latents_mean) / latents_std``. ``vae``: the VAE
        or its config."""
        latents = mean + std * torch.randn(mean.shape, generator=generator)
        config = getattr(vae, "config", vae)
        # by key: diffusers warns on attribute access to these
        values = config if isinstance(config, Mapping) else vars(config)
        channel = (-1, 1, 1)  # [C, h, w] or [B, C, h, w]: the channel axis is third from the end
        center = torch.tensor(values["latents_mean"], dtype=latents.dtype).view(channel)
        spread = torch.tensor(values["latents_std"], dtype=latents.dtype).view(channel)
        return (latents - center) / spread

    def predict(self, denoiser: Any, batch: NoisedBatch, cond: Conditioning, micro: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        """``QwenImagePipeline``'s call: latents packed 2x2 with their ``img_shapes``, time ``sigma``, the captions
        cut to the batch's longest with their mask; the prediction unpacked again."""
        from diffusers import QwenImagePipeline

        latents = batch.model_input
        b, c, h, w = latents.shape
        if h % PATCH or w % PATCH:
            raise DataError(f"Qwen-Image packs latents in 2x2 patches: a {w * 8}x{h * 8} px bucket gives odd latent "
                            f"sides; use buckets that are multiples of 16 px (normalization.bucket_step: 64).")
        # the cache keeps the mask as floats, like every conditioning tensor
        mask = cond.mask.bool() if cond.mask is not None else torch.ones(cond.hidden.shape[:2], dtype=torch.bool,
                                                                        device=cond.hidden.device)
        longest = max(int(mask.sum(dim=1).max()), 1)  # padding past the longest caption changes nothing but cost
        packed = QwenImagePipeline._pack_latents(latents.to(dtype), b, c, h, w)
        out = denoiser(hidden_states=packed, timestep=batch.timesteps.to(dtype),
                       encoder_hidden_states=cond.hidden[:, :longest].to(dtype),
                       encoder_hidden_states_mask=mask[:, :longest],
                       img_shapes=[[(1, h // PATCH, w // PATCH)]] * b, return_dict=False)[0]
        return QwenImagePipeline._unpack_latents(out, h * 8, w * 8, 8).squeeze(2)

    # ------------------------------------------------------------------ LoRA files

    def to_kohya_modules(self, pairs: Mapping[tuple[str, str], tuple[torch.Tensor, torch.Tensor]], alpha: float,
                         denoiser_config: Any = None) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """One module each under its own path: the original layout is diffusers' (outside the blocks too, so
        custom targets need no warning that WebUI and ComfyUI cannot map them: ComfyUI maps every weight)."""
        return ModelFamily.to_kohya_modules(self, pairs, alpha, denoiser_config)

    def lora_file_index(self, modules: Mapping[str, torch.nn.Module]) -> dict[str, Any]:
        """kohya's / musubi's names, plus ComfyUI's ``diffusion_model.<path>`` (ai-toolkit's files) for every
        Linear, not only the blocks' (ComfyUI maps every weight)."""
        index = super().lora_file_index(modules)
        denoiser = modules.get(self.denoiser)
        if denoiser is not None:
            for path in linear_layers(denoiser):
                index.setdefault(ORIGINAL_PREFIX + path, (self.denoiser, path))
        return index

    # ------------------------------------------------------------------ header

    def recipe(self, params: Any, denoiser_config: Any) -> dict[str, str]:
        return self.flow_recipe(params)

    def kohya_header(self, summary: Any) -> dict[str, str]:
        return {"ss_base_model_version": "qwen_image", "ss_v2": "False", "modelspec.architecture": "Qwen-Image/lora",
                **summary.recipe}


QWEN_IMAGE = QwenImageFamily()
