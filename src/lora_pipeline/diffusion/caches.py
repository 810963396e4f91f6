"""The two training caches, both in a :class:`~lora_pipeline.core.cache.DiskCache`:

* VAE latents: each image's latent distribution (mean, std), keyed by image hash + VAE fingerprint (and
  ``-flip`` for its mirror image), so a retrain on the same base re-encodes only new images and a changed image or
  another VAE can never hit a stale entry;
* text embeddings: the frozen text encoders' :class:`~lora_pipeline.diffusion.families.Conditioning` of each exact
  prompt text, keyed by the text + the encoders' fingerprints + the family's settings that change it (clip_skip).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from lora_pipeline.core.cache import DiskCache, settings_key
from lora_pipeline.diffusion.dataset import Example
from lora_pipeline.diffusion.families import Conditioning
from lora_pipeline.diffusion.loading import DiffusionComponents, module_fingerprint
from lora_pipeline.prep.images import load_rgb

logger = logging.getLogger(__name__)

FLIPPED = ":flip"  # suffix of a mirrored image's key in the latent-key map


def pixels(image, flipped: bool = False) -> torch.Tensor:
    """An RGB image as the VAE takes it: [3, H, W] in [-1, 1], mirrored when ``flipped``."""
    import numpy as np

    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    if flipped:
        array = array.flip(-1)
    return array / 127.5 - 1.0


def takes_frames(vae) -> bool:
    """Whether a VAE is a video VAE (3D convolutions: Qwen-Image's, Wan's), which encodes ``[B, 3, frames, H, W]``."""
    conv_in = getattr(getattr(vae, "encoder", None), "conv_in", None)
    return getattr(getattr(conv_in, "weight", None), "ndim", 4) == 5


def latent_stats(vae, batch: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent distribution (mean, std) of a pixel batch; a video VAE sees each image as one frame and its
    latents come back without the frame axis, so every family's cache holds ``[C, h, w]``."""
    frames = takes_frames(vae)
    dist = vae.encode(batch.to(device, vae.dtype).unsqueeze(2) if frames else batch.to(device, vae.dtype)).latent_dist
    return (dist.mean.squeeze(2), dist.std.squeeze(2)) if frames else (dist.mean, dist.std)


def encode_latents(components: DiffusionComponents, examples: Sequence[Example], cache: DiskCache, device: torch.device,
                   batch_size: int = 8, flip: bool = False) -> tuple[dict[str, str], int]:
    """Encode every image's VAE latent distribution once; returns ({sha256: cache key}, number encoded).

    With ``flip`` (kohya's flip_aug) the mirrored image is encoded and cached too (``sha256 + ":flip"``): a
    mirrored latent is not the mirror of the latent, so flipping cached latents would train on something the VAE
    never produced.
    """
    vae_id = module_fingerprint(components.vae)
    todo = [(ex, False) for ex in examples] + ([(ex, True) for ex in examples] if flip else [])
    keys = {}
    for ex, flipped in todo:
        keys[ex.sha256 + (FLIPPED if flipped else "")] = f"latent-{ex.sha256[:32]}{'-flip' if flipped else ''}-{vae_id}"
    missing = [(ex, flipped) for ex, flipped in dict.fromkeys(todo)
               if not cache.has(keys[ex.sha256 + (FLIPPED if flipped else "")], ".safetensors")]
    if missing:
        components.vae.to(device)
        groups: dict[tuple[int, int], list[tuple[Example, bool]]] = {}
        for ex, flipped in missing:
            groups.setdefault((ex.width, ex.height), []).append((ex, flipped))
        with tqdm(total=len(missing), desc="encoding latents", unit="img") as bar, torch.inference_mode():
            for group in groups.values():
                for start in range(0, len(group), batch_size):
                    chunk = group[start:start + batch_size]
                    batch = torch.stack([pixels(load_rgb(ex.path), flipped) for ex, flipped in chunk])
                    means, stds = latent_stats(components.vae, batch, device)
                    for (ex, flipped), mean, std in zip(chunk, means, stds):
                        cache.put_tensors(keys[ex.sha256 + (FLIPPED if flipped else "")],
                                          {"mean": mean.float(), "std": std.float()})
                    bar.update(len(chunk))
    logger.info("Latents: %d cached, %d new", len(keys) - len(missing), len(missing))
    return keys, len(missing)


class TextEncoderCache:
    """Frozen-text-encoder conditioning by exact prompt text (whatever the family's :class:`Conditioning` holds:
    SDXL's two encoders' states and the pooled embedding), in memory and on disk."""

    def __init__(self, components: DiffusionComponents, cache: DiskCache, device: torch.device):
        self.components, self.cache, self.device = components, cache, device
        identity: dict[str, Any] = {"te": [module_fingerprint(te) for te in components.text_encoders]}
        identity.update(components.family.text_cache_settings(components.clip_skip))
        self.te_id = settings_key(identity)
        self.memory: dict[str, dict[str, torch.Tensor]] = {}

    def fill(self, texts: Sequence[str]) -> None:
        """Encode every text a run can ask for before its first step, so that the encoders can leave the device."""
        missing = [t for t in dict.fromkeys(texts) if t not in self.memory]
        for text in tqdm(missing, desc="encoding prompts", unit="prompt", disable=len(missing) < 2, leave=False):
            self([text])

    def __call__(self, texts: Sequence[str]) -> Conditioning:
        for text in dict.fromkeys(texts):
            if text in self.memory:
                continue
            key = f"text-{settings_key({'t': text})}-{self.te_id}"
            hit = self.cache.get_tensors(key)
            if hit is None:
                with torch.inference_mode():
                    hit = self.components.encode_prompt([text], self.device).per_prompt()[0]
                self.cache.put_tensors(key, hit)
            self.memory[text] = hit
        return Conditioning.stack([self.memory[t] for t in texts], self.device)
