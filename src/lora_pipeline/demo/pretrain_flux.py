"""Pre-train the tiny Flux.1 base on the demo world, as :mod:`lora_pipeline.demo.pretrain` does the tiny SD1.x one.

The random tiny Flux.1-dev of :func:`~lora_pipeline.demo.tiny_models.build_tiny_flux` (its VAE rebuilt with fewer
GroupNorm groups: :func:`~lora_pipeline.demo.pretrain.colour_keeping_vae`) learns, offline and from images of
:mod:`lora_pipeline.demo.world`: its 16-channel VAE to reconstruct the world (red shapes and striped backgrounds
included), then its transformer to generate the world (neither red nor stripes) with the family's own
flow-matching objective. The text encoders (CLIP-L's pooled output, T5's sequence) stay as built.

Flux's VAE has no quant convs, so its latents are not standardised by folding an affine map into them (as the SD
base's are): the per-channel part is folded into the encoder's output conv and the decoder's input conv
(:func:`standardise_flux_latents`), and what remains is the VAE config's ``shift_factor`` and ``scaling_factor``,
which the family's ``sample_latents`` and ``FluxPipeline``'s decode apply as for the real Flux.1.

The tiny base is not guidance-distilled (there is no teacher), so its guidance embedding is zeroed and frozen:
every ``guidance_scale`` samples as the LoRA trainer's guidance 1 does.

Cached as the SD base is (:func:`~lora_pipeline.demo.pretrain.ensure_pretrained`), under ``tiny-flux-<key>``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lora_pipeline.core.files import json_sha256
from lora_pipeline.demo.pretrain import (
    encode_captions,
    encode_world,
    ensure_pretrained,
    moments_conv,
    random_base,
    train_denoiser,
    train_vae,
    world_scenes,
    world_tensor,
)

NAME = "tiny-flux"


@dataclass(frozen=True)
class PretrainFluxConfig:
    resolution: int = 128  # the demo's (16 x 16 latents, 8 x 8 packed image tokens)
    images: int = 384  # world images drawn (seeded): the transformer's training set
    vae_steps: int = 300
    vae_batch: int = 8
    vae_crop: int = 64  # the VAE is convolutional: it trains on crops
    vae_learning_rate: float = 4e-3
    vae_norm_groups: int = 2  # see colour_keeping_vae
    # T5 tokens of the pre-trained base's prompts (its tokenizer's model_max_length; the random tiny one has 512,
    # as Flux.1-dev): the demo's captions are under 20 tokens, and the joint attention over 512 text and 64 image
    # tokens made a transformer step 0.35 s on one CPU thread, nine tenths of it over padding
    t5_tokens: int = 64
    transformer_steps: int = 320
    transformer_batch: int = 8
    transformer_learning_rate: float = 6e-3
    # the family objective's sigma sampling (see flow_matching.sample_sigmas)
    timestep_sampling: str = "shift"
    discrete_flow_shift: float = 3.1582
    caption_dropout: float = 0.1
    unknown_word_share: float = 0.5  # see pretrain.UNKNOWN_WORDS
    seed: int = 0
    format: int = 1  # bump when the training code changes what a config produces

    def key(self) -> str:
        return json_sha256(asdict(self), 16)


def ensure_pretrained_flux(target: str | Path, config: PretrainFluxConfig = PretrainFluxConfig(),
                           cache: str | Path | None = None) -> Path:
    """The tiny Flux.1 base pre-trained on the demo world, in ``target`` (see :func:`ensure_pretrained`)."""
    return ensure_pretrained(target, NAME, config, pretrain_tiny_flux, cache)


def pretrain_tiny_flux(out_dir: str | Path, config: PretrainFluxConfig = PretrainFluxConfig()) -> Path:
    """Build the tiny Flux.1 base, train its VAE and then its transformer on the demo world, save it to
    ``out_dir`` (a diffusers ``FluxPipeline`` folder)."""
    from lora_pipeline.demo.tiny_models import build_tiny_flux
    from lora_pipeline.demo.world import draw

    components = random_base(build_tiny_flux, NAME, "flux", config)
    components.tokenizers[1].model_max_length = config.t5_tokens  # saved with it: LoRA training and sampling read it
    size = (config.resolution, config.resolution)
    scenes, codec_scenes = world_scenes(config)
    train_vae(components.vae, world_tensor([draw(scene, size) for scene in codec_scenes]), config,
              desc="pre-training tiny Flux VAE")
    pixels = world_tensor([draw(scene, size) for scene in scenes])
    mean, std = encode_world(components.vae, pixels)
    mean, std = standardise_flux_latents(components.vae, mean, std)
    train_transformer(components, mean, std, [scene.caption() for scene in scenes], config)
    components.pipeline().save_pretrained(out_dir)
    return Path(out_dir)


@torch.no_grad()
def standardise_flux_latents(vae, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Give the world's latents zero mean and unit variance per channel; returns ``mean`` and ``std`` as the
    changed VAE encodes them.

    The per-channel map is folded into the encoder's output conv (exact: it writes each channel's moments) and
    the decoder's input conv (a 3x3 conv: exact for the scale; the mean goes into its bias, exact away from the
    latent's one-pixel border, where the conv's zero padding saw 0 rather than the mean). Flux's scalar
    ``shift_factor`` and ``scaling_factor`` are then what standardises the latents as a whole: 0 and 1."""
    channel_mean, channel_std = mean.mean((0, 2, 3)), mean.std((0, 2, 3))
    channels, write, read = len(channel_mean), moments_conv(vae), vae.decoder.conv_in
    write.weight[:channels] /= channel_std[:, None, None, None]
    write.bias[:channels] = (write.bias[:channels] - channel_mean) / channel_std
    write.bias[channels:] -= 2 * torch.log(channel_std)
    read.bias += read.weight.sum((2, 3)) @ channel_mean
    read.weight *= channel_std[None, :, None, None]
    vae.register_to_config(shift_factor=0.0, scaling_factor=1.0)
    view = (1, channels, 1, 1)
    return (mean - channel_mean.view(view)) / channel_std.view(view), std / channel_std.view(view)


def train_transformer(components, mean: torch.Tensor, std: torch.Tensor, captions: list[str],
                      config: PretrainFluxConfig) -> None:
    """The family's own flow-matching objective over the world's cached latents and prompt encodings (CLIP-L's
    pooled output and T5's sequence), as ``pretrain.train_unet`` trains the UNet."""
    transformer = components.denoiser
    embeddings = encode_captions(components, captions, batch=32)
    guidance = getattr(transformer.time_text_embed, "guidance_embedder", None)
    if guidance is not None:  # not distilled: the guidance embedding adds nothing, whatever guidance_scale is
        with torch.no_grad():
            guidance.linear_2.weight.zero_()
            guidance.linear_2.bias.zero_()
        guidance.requires_grad_(False)
    objective = components.family.objective(components.scheduler, timestep_sampling=config.timestep_sampling,
                                            discrete_flow_shift=config.discrete_flow_shift)
    train_denoiser(components, objective, mean, std, captions, embeddings, steps=config.transformer_steps,
                   batch=config.transformer_batch, learning_rate=config.transformer_learning_rate, config=config,
                   desc="pre-training tiny Flux transformer")
