"""The training objective agrees with the family's own sampler: a LoRA trained on one solid colour makes diffusers'
pipeline (FluxPipeline, ChromaPipeline, StableDiffusion3Pipeline, ZImagePipeline, StableDiffusionPipeline, StableDiffusionXLPipeline, ``output_type="latent"``) sample latents
that move toward the training latents as the LoRA weight goes 0 -> 0.5 -> 1.

A wrong target or sign trains just as well (the loss goes down the same way) but the sampler, which integrates the
prediction as the family's scheduler defines it, then moves the wrong way; every check below was confirmed to fail
with the sign of the target flipped (``latents - noise`` for Flux, ``-noise`` for SD), with the clean latents as
the target, with the noise as the target of flow matching (Flux) and with the velocity as the target of an
epsilon model (SD, SDXL), each in a scratch copy over 2 to 4 training seeds.

What the tiny random models need for that signal to be there, each done here in the test, not in src:

* the tiny VAE's posterior std is ~1 against a mean of ~0.25 (real VAEs: a std of a few hundredths), so the
  latents of a solid colour would be VAE noise: its log-variance output is set to -20 (std 5e-5), which makes the
  training latents (the cache stores mean/std and training samples from them) the posterior mean;
* a random VAE maps red to channel means near 0, where "toward the training latents" could not be told from
  "smaller": its mean output is offset so that the training latents' channel means are +1, -1, +1, ... in the
  denoiser's space (``(z - shift) * scale``);
* the tiny SDXL UNet has attention only at 1/2 of the latent resolution, so kohya's default (attention) targets
  barely learn anything in a few steps; the UNet runs add the resnet and in/out convolutions (kohya's LoCon
  layers) to the targets.

Two distances are measured, both in the denoiser's space: between the per-channel means of the samples and of the
training latents (the mean latent of the training set, channel by channel), and the RMS distance between each
sampled latent and the mean training latent. Which ones are asserted, and how far they must shrink, is per family
(see ``CASES``): the tiny Flux transformer learns the mean velocity in 30 steps but not to denoise, so its samples
keep the noise's spread (the RMS distance only decreases a little) while their channel means move most of the way;
the tiny UNets learn to denoise (the RMS distance shrinks to a fraction) but their channel means are a weak signal:
for SD1.x with a flipped sign they still move toward the target in 3 of 4 seeds (the target is a fixed point of the
flipped sampler too; it is the spread that explodes), and for SDXL they are not reliable even with the right
target (a constant per-channel bias of the predicted noise, which a LoRA without bias terms learns slowly, is
integrated over sigma up to ~14 by the Euler sampler): SDXL is checked by the RMS distance alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import make_params

from lora_pipeline.core.cache import DiskCache
from lora_pipeline.core.config import KOHYA_UNET_TARGETS
from lora_pipeline.core.files import sha256_file
from lora_pipeline.diffusion.caches import latent_stats, pixels
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.training import Example, train

PROMPT = "lorachar, red"
SIDE = 64  # px: 8x8 latents (Flux: 4x4 tokens of 2x2 patches)
WEIGHTS = (0.0, 0.5, 1.0)
LOCON = ["conv_in", "conv1", "conv2", "conv_out"]  # the UNets' convolutions, besides kohya's attention targets


@dataclass(frozen=True)
class Case:
    model: str
    steps: int
    learning_rate: float
    inference_steps: int
    extra_targets: tuple[str, ...] = ()
    # per distance: None = not asserted; a number = strictly decreasing and, at weight 1, below that fraction of
    # the distance at weight 0 (1.0: strictly decreasing only)
    channel_means: float | None = None
    latents: float | None = None
    guidance: float = 1.0  # the pipeline's guidance_scale that samples without classifier-free guidance


CASES = {
    # Flux: the research prototype's recipe (shift sampling, rank 4) at a lower learning rate: at 1e-2, weight 0.5
    # already does nearly all that weight 1 does (the margin between them is ~0.01), at 3e-3 it is ~0.4
    "flux": Case("tiny-flux", steps=30, learning_rate=3e-3, inference_steps=10, channel_means=0.7, latents=1.0),
    # SD3.5: the tiny MMDiT's block Linears saturate near 0.75 of the channel-mean distance (60 steps or 1e-2 do
    # not get further, with or without the sigma^2 weighting); with the target's sign flipped both distances grow
    "sd3": Case("tiny-sd3", steps=30, learning_rate=3e-3, inference_steps=10, channel_means=0.8, latents=1.0),
    "chroma": Case("tiny-chroma", steps=30, learning_rate=3e-3, inference_steps=10, channel_means=0.7, latents=1.0),
    # Z-Image: its pipeline runs classifier-free guidance for any guidance_scale > 0 (Turbo samples at 0); the tiny
    # transformer's main-layer Linears saturate near 0.8 of the channel-mean distance (60 steps or 1e-2 do not get
    # further); with the output's negation dropped both distances grow (the time's direction, 1 - sigma, this does
    # not tell: test_z_image.py checks it against the pipeline's own call)
    "z_image": Case("tiny-z-image", steps=30, learning_rate=3e-3, inference_steps=10, channel_means=0.9, latents=1.0,
                    guidance=0.0),
    # Qwen-Image: its pipeline runs classifier-free guidance only with a negative prompt (none here); the tiny
    # transformer's block Linears saturate near 0.75 of the channel-mean distance (weight 0.5 already does most of it);
    # with the prediction's sign flipped both distances grow
    "qwen_image": Case("tiny-qwen-image", steps=60, learning_rate=1e-2, inference_steps=10, channel_means=0.8,
                       latents=1.0),
    # Flux.2: the pipeline's own time and sign are Flux.1's (test_flux2.py checks its call); its latents are the VAE's
    # patchified to 128 channels and batch-normalised, the space both distances are measured in. The tiny block
    # Linears saturate near 0.91 (channel means) and 0.89 (RMS) at weight 1 (60 steps get 0.90 / 0.88; at 3e-3 only
    # 0.97); with the target's sign flipped both grow (1.24 / 1.06)
    "flux2": Case("tiny-flux2", steps=30, learning_rate=1e-2, inference_steps=10, channel_means=0.95, latents=0.95),
    "sd1": Case("tiny-sd", steps=60, learning_rate=1e-2, inference_steps=20, extra_targets=tuple(LOCON),
                channel_means=1.0, latents=0.5),
    "sdxl": Case("tiny-sdxl", steps=60, learning_rate=1e-2, inference_steps=20, extra_targets=tuple(LOCON),
                 latents=0.5),
}


def _red_examples(folder) -> list[Example]:
    """8 solid red images, each pixel jittered a little, all captioned alike."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    examples = []
    for index in range(8):
        array = np.clip(np.array([220, 30, 30]) + rng.integers(-12, 13, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
        path = folder / f"red_{index}.png"
        Image.fromarray(array).save(path)
        examples.append(Example(path, PROMPT, SIDE, SIDE, sha256_file(path)))
    return examples


def _denoiser_space(components, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents [.., C, h, w] in the denoiser's space, as the family's own latent preparation puts them (a
    zero-spread posterior, so no noise is drawn): scale and shift, or Qwen-Image's per-channel mean and std."""
    return components.family.sample_latents(latents, torch.zeros_like(latents), torch.Generator().manual_seed(0),
                                            components.vae)


@torch.no_grad()
def _sharpen_vae(components, offset: float = 1.0) -> None:
    """A near-deterministic posterior (log-variance -20) whose mean is offset so that the latents' channel means in
    the denoiser's space are about +offset, -offset, ... (see the module docstring)."""
    vae = components.vae
    layer = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out  # what outputs mean | logvar
    channels = layer.bias.shape[0] // 2
    layer.weight[channels:] = 0.0
    layer.bias[channels:] = -20.0
    signs = torch.tensor([(-1.0) ** c for c in range(channels)])
    ones = torch.ones(channels, 2, 2)  # 2x2: Flux.2 patchifies (a VAE channel c is its channels 4c..4c+3)
    scale = (_denoiser_space(components, ones) - _denoiser_space(components, 0 * ones)).reshape(channels, -1).mean(1)
    layer.bias[:channels] += offset * signs / scale


@torch.no_grad()
def _training_latents(components, examples) -> torch.Tensor:
    """The training set's mean latent [C, h, w] in the denoiser's space, straight from the VAE (not the cache)."""
    batch = torch.stack([pixels(Image.open(ex.path).convert("RGB")) for ex in examples])
    latents, _ = latent_stats(components.vae, batch, torch.device("cpu"))
    return _denoiser_space(components, latents).mean(dim=0)


@torch.no_grad()
def _sample(components, weight: float, inference_steps: int, guidance: float = 1.0) -> torch.Tensor:
    """4 latents from the family's diffusers pipeline, the LoRA at ``weight``, unpacked to [B, C, h, w] for Flux.

    No classifier-free guidance (SD: guidance_scale 1 turns it off; Flux: the embedded guidance it trained at)."""
    denoiser = components.denoiser
    denoiser.eval()
    denoiser.set_adapters(["default"], [weight])
    pipe = components.pipeline()
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=PROMPT, height=SIDE, width=SIDE, num_inference_steps=inference_steps, guidance_scale=guidance,
               num_images_per_prompt=4, generator=torch.Generator().manual_seed(0), output_type="latent").images
    if components.family.name in ("flux", "chroma", "qwen_image"):  # packed latents, in the denoiser's space
        out = pipe._unpack_latents(out, SIDE, SIDE, pipe.vae_scale_factor)
        out = out.squeeze(2) if out.ndim == 5 else out  # Qwen-Image's one frame
    elif components.family.name == "flux2":  # (B, h*w, 128) tokens of the patchified, normalised latents
        side = SIDE // (2 * pipe.vae_scale_factor)
        out = out.permute(0, 2, 1).reshape(out.shape[0], -1, side, side)
    return out.float()


def _check(name: str, distances: list[float], shrink: float | None) -> list[str]:
    if shrink is None:
        return []
    problems = []
    if not all(a > b for a, b in zip(distances, distances[1:])):
        problems.append(f"{name} distance not strictly decreasing over LoRA weights {WEIGHTS}: {distances}")
    if shrink < 1.0 and not distances[-1] < shrink * distances[0]:
        problems.append(f"{name} distance at weight 1 ({distances[-1]:.3f}) not below {shrink} x the base's "
                        f"({distances[0]:.3f})")
    return problems


@pytest.mark.slow
@pytest.mark.parametrize("family", list(CASES))
def test_samples_move_toward_the_training_latents_as_the_lora_weight_grows(tiny_models, tmp_path, family):
    case = CASES[family]
    examples = _red_examples(tmp_path / "images")
    targets = {"unet_targets": KOHYA_UNET_TARGETS + list(case.extra_targets)} if case.extra_targets else {}
    params = make_params(tiny_models, tmp_path, base_model=str(tiny_models[case.model]), max_steps=case.steps,
                         learning_rate=case.learning_rate, batch_size=4, lora_rank=4, alpha=4, seed=0, **targets)
    components = load_diffusion_model(params.base_model)
    _sharpen_vae(components)
    reference = _training_latents(components, examples)
    result = train(components, examples, params, DiskCache(tmp_path / "cache"), dataset_hash="red")
    assert result.steps == case.steps and np.isfinite(result.losses).all()

    channel_means, latents = [], []
    for weight in WEIGHTS:
        samples = _sample(components, weight, case.inference_steps, case.guidance)
        assert samples.shape[1:] == reference.shape
        channel_means.append((samples.mean(dim=(0, 2, 3)) - reference.mean(dim=(1, 2))).norm().item())
        latents.append(((samples - reference) ** 2).mean().sqrt().item())
    report = f"channel means {[round(d, 3) for d in channel_means]}, latents RMS {[round(d, 3) for d in latents]}"
    problems = (_check("channel-mean", channel_means, case.channel_means)
                + _check("latent RMS", latents, case.latents))
    assert not problems, f"{family}: {'; '.join(problems)} ({report})"
