"""Pre-train the tiny SD1.x base on the demo world, so the demo's LoRAs change pictures rather than noise.

The tiny base of :func:`~lora_pipeline.demo.tiny_models.build_tiny_sd` (the tests' random one, but for its
VAE's GroupNorm groups: :func:`colour_keeping_vae`) learns, offline and from images drawn here (:mod:`lora_pipeline.demo.world`): its VAE to reconstruct the
world (red shapes and striped backgrounds included, so it can draw what the LoRAs teach), then its UNet to
generate the world (neither red nor stripes, so those come from the LoRAs only). The text encoder stays as built:
its embeddings of the captions are what the UNet learns to follow.

The result is cached per machine under ``~/.cache/lora_pipeline/pretrained/tiny-sd-<key>`` (``$XDG_CACHE_HOME``
honoured; ``$LORA_PIPELINE_PRETRAINED_CACHE`` replaces the whole path), the key being the hash of
:class:`PretrainConfig`: a second ``make demo``, or a fresh clone, copies it.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lora_pipeline.core.files import atomic_folder, atomic_write_text, json_sha256

logger = logging.getLogger(__name__)

KEY_FILE = ".pretrained"


@dataclass(frozen=True)
class PretrainConfig:
    resolution: int = 128  # the demo's: training buckets around 128 px, the grid at 128 x 128
    images: int = 768  # world images drawn (seeded): the UNet's training set
    # 600 steps at 2e-3: 300 at 4e-3 (as the Flux.1 VAE) saved 40 s of make demo's longest step but left a checkered
    # texture and a pink cast on the backgrounds, and the grid's shapes blurred
    vae_steps: int = 600
    vae_batch: int = 8
    vae_crop: int = 64  # the VAE is convolutional: it trains on crops, 4x cheaper than whole images
    vae_learning_rate: float = 2e-3
    # GroupNorm groups of the pre-trained VAE (the random tiny one has 8, one channel per group at full
    # resolution): see :func:`colour_keeping_vae`
    vae_norm_groups: int = 2
    # Attention heads of the pre-trained UNet's transformer blocks (the random tiny one has 8, of 4 channels each
    # at its 32-channel level): 2 heads of 16 and 32 channels train at 0.20 s a step on one CPU thread, 8 heads at
    # 0.33 s (CPU flash attention is slow over 4-channel heads), and the LoRAs trained on it run as much faster.
    unet_attention_heads: int = 2
    unet_steps: int = 600
    unet_batch: int = 16
    unet_learning_rate: float = 2e-3
    caption_dropout: float = 0.1  # empty prompt: what classifier-free guidance contrasts with
    # share of captions that get one made-up word in front (see :data:`UNKNOWN_WORDS`)
    unknown_word_share: float = 0.5
    # What the UNet predicts. Not SD1.x's usual epsilon: from almost pure noise an epsilon model's picture is the
    # noise minus its prediction, magnified 15x, so a small error there became the whole image's colour (every
    # sample's background beige, a red LoRA's shape black, measured on this base). The velocity target weighs the
    # picture itself at high noise (as SD 2.x's 768-v models do); the LoRA trainer and the samplers read it from
    # the saved scheduler.
    prediction_type: str = "v_prediction"
    seed: int = 0
    format: int = 4  # bump when the training code changes what a config produces

    def key(self) -> str:
        return json_sha256(asdict(self), 16)


# Words the base is taught to draw through: a caption with one of these in front is the same picture. Without
# them the base had seen its ~15 captions only, and a trigger word (``lorachar, circle, ...``) put the prompt
# out of everything it knew: at weight 0 the grid's base image was orange and blue blobs, not a circle. None of
# them is a demo subject's trigger (those are for the LoRAs to learn).
UNKNOWN_WORDS = ("zorvex", "kalumi", "bexwin", "tarnok", "quilsa", "fendrik", "ulvash", "mirtop")

CACHE_ENV = "LORA_PIPELINE_PRETRAINED_CACHE"


def cache_root() -> Path:
    """``$LORA_PIPELINE_PRETRAINED_CACHE`` when set (a fresh build in a scratch folder, a shared cache), else
    ``$XDG_CACHE_HOME/lora_pipeline/pretrained`` (default ``~/.cache``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lora_pipeline" / "pretrained"


def ensure_pretrained(target: str | Path, name: str, config: Any, build: Callable[[Path, Any], Any],
                      cache: str | Path | None = None) -> Path:
    """``target`` holds the tiny base ``name`` pre-trained with ``config`` (a frozen dataclass with ``key()``) by
    ``build(folder, config)``: copied from the machine's cache, which is filled first when it lacks this config.
    Nothing is done when ``target`` already holds it."""
    target, key = Path(target), config.key()
    marker = target / KEY_FILE
    if marker.is_file() and marker.read_text().strip() == key:
        logger.info("Pre-trained %s already in %s (key %s)", name, target, key)
        return target
    root = Path(cache or cache_root())
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file there, or no write access: say which setting picks the folder
        reason = "a file, not a folder" if root.is_file() else error.strerror
        raise OSError(f"Cannot use {root} as the cache of pre-trained demo bases ({reason}). Set "
                      f"{CACHE_ENV} to a writable folder, or unset it to use ~/.cache/lora_pipeline/pretrained.") \
            from error
    cached = root / f"{name}-{key}"
    if not (cached / KEY_FILE).is_file():
        started = time.monotonic()
        # One CPU thread while it trains: float sums in another order (two threads instead of one) made a different
        # base from the same config and seed (weights apart by up to 0.3 after 600 steps, and a visibly worse grid),
        # so the cache key would not name one result. With one thread, every machine on this torch build gets
        # the same bytes.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with atomic_folder(cached) as folder:
                build(folder, config)
                atomic_write_text(folder / KEY_FILE, key + "\n")
        finally:
            torch.set_num_threads(threads)
        logger.info("Pre-trained %s in %.0f s (cached in %s)", name, time.monotonic() - started, cached)
    with atomic_folder(target) as folder:
        shutil.copytree(cached, folder, dirs_exist_ok=True)
        (folder / ".complete").write_text("ok\n")  # build_all's marker: the random base is not built over it
    logger.info("%s pre-trained on the demo world: %s (key %s)", name, target, key)
    return target


def ensure_pretrained_sd(target: str | Path, config: PretrainConfig = PretrainConfig(),
                         cache: str | Path | None = None) -> Path:
    """The tiny SD1.x base pre-trained on the demo world, in ``target`` (see :func:`ensure_pretrained`)."""
    return ensure_pretrained(target, "tiny-sd", config, pretrain_tiny_sd, cache)


def world_tensor(images) -> torch.Tensor:
    """PIL images -> a [-1, 1] batch, as the VAE takes them."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: int = 20):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def pretrain_tiny_sd(out_dir: str | Path, config: PretrainConfig = PretrainConfig()) -> Path:
    """Build the tiny SD1.x base, train its VAE and then its UNet on the demo world, save it to ``out_dir``."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from lora_pipeline.demo.tiny_models import build_tiny_sd
    from lora_pipeline.demo.world import draw

    components = random_base(build_tiny_sd, "tiny-sd", "sd1", config)
    components.denoiser = fewer_heads_unet(components.denoiser, config)
    components.scheduler = DDPMScheduler.from_config(components.scheduler.config, prediction_type=config.prediction_type)
    size = (config.resolution, config.resolution)
    scenes, codec_scenes = world_scenes(config)
    codec_pixels = world_tensor([draw(scene, size) for scene in codec_scenes])
    train_vae(components.vae, codec_pixels, config)
    standardise_latents(components.vae, codec_pixels)
    pixels = world_tensor([draw(scene, size) for scene in scenes])
    train_unet(components, pixels, [scene.caption() for scene in scenes], config)
    pipe = components.pipeline(scheduler=DDIMScheduler.from_config(components.scheduler.config))
    pipe.save_pretrained(out_dir)
    return Path(out_dir)


def random_base(build: Callable[..., Path], name: str, family: str, config):
    """The tests' random tiny base of ``family`` (``build(folder, seed=...)``: a :mod:`~lora_pipeline.demo.tiny_models`
    builder), loaded from a scratch folder, with a fresh :func:`colour_keeping_vae`: what pre-training starts from."""
    from lora_pipeline.diffusion.loading import load_diffusion_model

    torch.manual_seed(config.seed)
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as scratch:
        components = load_diffusion_model(str(build(Path(scratch) / name, seed=config.seed)), family)
    components.vae = colour_keeping_vae(components.vae, config)
    return components


def fewer_heads_unet(unet, config: PretrainConfig):
    """The tiny UNet rebuilt (freshly initialised, seeded) with ``config.unet_attention_heads`` attention heads."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(config.seed)
    # diffusers' UNet2DConditionModel reads its attention_head_dim as the number of heads (a name kept for old
    # checkpoints); SD1.5 has 8 heads of 40 channels at its 320-channel level
    return UNet2DConditionModel.from_config({**unet.config, "attention_head_dim": config.unet_attention_heads})


def world_scenes(config) -> tuple[list, list]:
    """``config.images`` seeded scenes of the world (neither red nor stripes: the denoiser's training set), and the
    VAE's: their first half, then as many with what the LoRAs will teach (a quarter red shapes, a quarter striped
    backgrounds)."""
    from lora_pipeline.demo.world import random_scene

    rng = np.random.default_rng(config.seed)
    scenes = [random_scene(rng) for _ in range(config.images)]
    codec_scenes = scenes[: config.images // 2] + [random_scene(rng, red=i % 2 == 0, stripes=i % 2 == 1 or i % 4 == 0)
                                                   for i in range(config.images // 2)]
    return scenes, codec_scenes


def colour_keeping_vae(vae, config: PretrainConfig):
    """The tiny VAE rebuilt (freshly initialised, seeded) with ``config.vae_norm_groups`` GroupNorm groups.

    With 8 groups over its 8 full-resolution channels, every GroupNorm there is a per-channel instance norm: a
    plain region comes out of it as zeros whatever its colour, and the decoder's last norm sits right before its
    output conv. So the demo world (plain backgrounds, flat shapes) decoded with its colours washed toward grey and
    its red dark (measured after the same 600 steps: red share 0.20 in the images, 0.04 after the VAE, mean
    absolute error 20/255), too dark for anything a red LoRA draws to count as red. Groups of several channels
    keep a colour as the pattern across them (red share 0.23 after the VAE, error 10/255)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(config.seed)
    return AutoencoderKL.from_config({**vae.config, "norm_num_groups": config.vae_norm_groups})


def moments_conv(vae) -> torch.nn.Conv2d:
    """The layer that writes the posterior's mean and log-variance: ``quant_conv`` where the VAE has one (SD),
    else the encoder's output conv (Flux)."""
    return vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out


def train_vae(vae, pixels: torch.Tensor, config, desc: str = "pre-training tiny VAE") -> None:
    """Reconstruction (L1 + MSE) with a small KL term (``config``: a :class:`PretrainConfig` or any config with
    its ``vae_*`` fields and ``seed``)."""
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=0.0)
    schedule = _cosine(optimizer, config.vae_steps)
    # A fixed, near-deterministic posterior (std 0.05): the log-variance half of the layer that writes the moments
    # (:func:`moments_conv`) is set and kept, so a sampled latent (as the LoRA trainer draws them) decodes as its
    # mean does.
    logvar = slice(vae.config.latent_channels, None)
    conv_out = moments_conv(vae)
    with torch.no_grad():
        conv_out.weight[logvar] = 0.0
        conv_out.bias[logvar] = -6.0
    vae.train()
    crop = config.vae_crop
    with tqdm(range(config.vae_steps), desc=desc, unit="step") as bar:
        for _ in bar:
            index = torch.randint(0, len(pixels), (config.vae_batch,), generator=generator)
            top, left = (int(v) for v in torch.randint(0, pixels.shape[-1] - crop + 1, (2,), generator=generator))
            batch = pixels[index, :, top:top + crop, left:left + crop]
            posterior = vae.encode(batch).latent_dist
            recon = vae.decode(posterior.sample(generator)).sample
            loss = F.l1_loss(recon, batch) + F.mse_loss(recon, batch) + 1e-6 * posterior.kl().mean()
            loss.backward()
            conv_out.weight.grad[logvar] = 0.0
            conv_out.bias.grad[logvar] = 0.0
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()


def standardise_latents(vae, pixels: torch.Tensor) -> None:
    """Give the VAE's latents of the world zero mean and unit variance per channel, decoding exactly as before.

    Stable Diffusion's single ``scaling_factor`` (1 / the latents' std) left this VAE's channels at means up to 0.8
    and stds from 0.5 to 2.2: a diffusion model treats every channel as unit-variance, so the weak ones (where the
    shape's colour sat) were learned last. The per-channel affine map is folded into the two 1x1 convolutions
    around the latent (``quant_conv`` writes it, ``post_quant_conv`` reads it), so the saved VAE is a plain
    ``AutoencoderKL`` with ``scaling_factor`` 1 that any diffusers or ComfyUI loader reads as usual."""
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i:i + 32]).latent_dist.mean for i in range(0, min(len(pixels), 256), 32)])
        mean, std = latents.mean((0, 2, 3)), latents.std((0, 2, 3))
        channels, write, read = len(mean), vae.quant_conv, vae.post_quant_conv
        write.weight[:channels] /= std[:, None, None, None]
        write.bias[:channels] = (write.bias[:channels] - mean) / std
        write.bias[channels:] -= 2 * torch.log(std)  # the log-variances, so the posterior's std scales with it
        read.bias += read.weight[:, :, 0, 0] @ mean
        read.weight *= std[None, :, None, None]
    vae.register_to_config(scaling_factor=1.0)


@torch.no_grad()
def encode_world(vae, pixels: torch.Tensor, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior means and stds of ``pixels``, as the LoRA trainer's latent cache stores them."""
    posteriors = [vae.encode(pixels[i:i + batch]).latent_dist for i in range(0, len(pixels), batch)]
    return torch.cat([p.mean for p in posteriors]), torch.cat([p.std for p in posteriors])


@torch.no_grad()
def encode_captions(components, captions: list[str], batch: int) -> dict[str, dict[str, torch.Tensor]]:
    """Every caption, each also behind every :data:`UNKNOWN_WORDS` prefix, and "" (caption dropout), encoded
    ``batch`` at a time: ``{text: one Conditioning.per_prompt entry}``."""
    texts = sorted(set(captions))
    texts += [f"{word}, {text}" for word in UNKNOWN_WORDS for text in texts] + [""]
    device = torch.device("cpu")
    encoded = [entry for i in range(0, len(texts), batch)
               for entry in components.encode_prompt(texts[i:i + batch], device).per_prompt()]
    return dict(zip(texts, encoded))


def train_denoiser(components, objective, mean: torch.Tensor, std: torch.Tensor, captions: list[str],
                   embeddings: dict[str, dict[str, torch.Tensor]], *, steps: int, batch: int, learning_rate: float,
                   config, desc: str) -> None:
    """The family's own objective over the world's cached latents and prompt encodings (:func:`encode_captions`),
    with caption dropout and :data:`UNKNOWN_WORDS` prefixes (``config``'s ``caption_dropout``,
    ``unknown_word_share`` and ``seed``). Trains the denoiser's parameters that require grad."""
    from lora_pipeline.diffusion.families import Conditioning

    family, denoiser, vae = components.family, components.denoiser, components.vae
    device = torch.device("cpu")
    trained = [p for p in denoiser.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(config.seed + 1)
    optimizer = torch.optim.AdamW(trained, lr=learning_rate, weight_decay=0.0)
    schedule = _cosine(optimizer, steps)
    denoiser.train()
    with tqdm(range(steps), desc=desc, unit="step") as bar:
        for _ in bar:
            index = torch.randint(0, len(mean), (batch,), generator=generator)
            latents = family.sample_latents(mean[index], std[index], generator, vae)
            drop = torch.rand(batch, generator=generator) < config.caption_dropout
            words = torch.randint(0, len(UNKNOWN_WORDS), (batch,), generator=generator)
            prefixed = torch.rand(batch, generator=generator) < config.unknown_word_share
            prompts = ["" if d else f"{UNKNOWN_WORDS[w]}, {captions[i]}" if p else captions[i]
                       for i, d, w, p in zip(index.tolist(), drop.tolist(), words.tolist(), prefixed.tolist())]
            cond = Conditioning.stack([embeddings[prompt] for prompt in prompts], device)
            noise, timesteps = objective.draw(latents.shape, generator)
            noised = objective.noised(latents, noise, timesteps)
            pred = family.predict(denoiser, noised, cond, None, denoiser.dtype)
            loss = objective.per_sample_loss(pred, noised).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    denoiser.eval()


def train_unet(components, pixels: torch.Tensor, captions: list[str], config: PretrainConfig) -> None:
    """The family's own DDPM objective (noise, timesteps, target) over the world's cached latents and captions."""
    mean, std = encode_world(components.vae, pixels)
    # one caption at a time, as the cached base was built (a batch of them rounds CLIP's sums differently)
    embeddings = encode_captions(components, captions, batch=1)
    train_denoiser(components, components.family.objective(components.scheduler), mean, std, captions, embeddings,
                   steps=config.unet_steps, batch=config.unet_batch, learning_rate=config.unet_learning_rate,
                   config=config, desc="pre-training tiny UNet")
