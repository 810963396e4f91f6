"""What a LoRA changed: denoising loss on training and held-out images, CLIP adherence and style similarity."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from lora_pipeline.core.files import sha256_file
from lora_pipeline.diffusion.dataset import Example
from lora_pipeline.prep.images import choose_bucket, crop_geometry, fit_to, list_images, load_rgb

logger = logging.getLogger(__name__)


def holdout_examples(folder: str | Path, buckets: Sequence[tuple[int, int]], step: int, text: str,
                     out_dir: Path) -> list[Example]:
    """Held-out images fitted to the training buckets (written to ``out_dir``; the raw folder is untouched)."""
    folder = Path(folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    examples = []
    for name in list_images(folder):
        image = load_rgb(folder / name)
        size, _ = choose_bucket(image.size, list(buckets), step)
        target = out_dir / (Path(name).stem + ".png")
        fit_to(image, size).save(target)
        examples.append(Example(target, text, size[0], size[1], sha256_file(target), original_size=image.size,
                                crop_top_left=crop_geometry(image.size, size)))
    return examples


class ClipScorer:
    """CLIP image/text embeddings: prompt adherence (CLIP score) and similarity to the training images."""

    def __init__(self, model: str, device: torch.device):
        from transformers import CLIPModel, CLIPProcessor

        from lora_pipeline.core.models import load_pretrained

        self.device = device
        self.processor = load_pretrained(CLIPProcessor, model)
        self.model = load_pretrained(CLIPModel, model).to(device).eval()

    @torch.no_grad()
    def image_features(self, images) -> torch.Tensor:
        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        out = self.model.get_image_features(**inputs)
        return torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1)

    @torch.no_grad()
    def text_features(self, texts) -> torch.Tensor:
        inputs = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True).to(self.device)
        out = self.model.get_text_features(**inputs)
        return torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1)

    def clip_score(self, images, texts) -> float:
        """Mean 100 * cos(image, its prompt), clipped at 0 (the usual CLIPScore)."""
        sims = (self.image_features(images) * self.text_features(texts)).sum(-1)
        return float((100 * sims.clamp(min=0)).mean())

    def similarity(self, images, references) -> float:
        """Mean cosine similarity of generated images to the training images (does the style transfer?)."""
        return float((self.image_features(images) @ self.image_features(references).T).mean())


# ----------------------------------------------------------------------------- what one image shows

def red_share(image) -> float:
    """Share of the image's pixels that are red: hue within 20 degrees of pure red, saturation at least 0.5, value
    at least 0.35 (HSV, 0-1 scales). What a colour LoRA that paints shapes red raises. By hue, not by how far R
    stands above G and B: that also counted orange and yellow-orange, which an undertrained base draws. The demo
    world's muted backgrounds (its "red" tint has saturation 0.2) and its yellow shapes (hue 50) stay outside."""
    import numpy as np

    hsv = np.asarray(image.convert("RGB").convert("HSV"), dtype=np.float32) / 255.0
    hue = hsv[..., 0] * 360.0
    distance = np.minimum(hue, 360.0 - hue)
    return float(((distance <= 20.0) & (hsv[..., 1] >= 0.5) & (hsv[..., 2] >= 0.35)).mean())


def stripe_energy(image, cycles: int, band: int = 1) -> float:
    """Share of the image's non-constant brightness energy in vertical stripes of about ``cycles`` periods across
    the width (2-D spectrum, horizontal frequencies ``cycles`` +- ``band``, vertical frequency 0 or 1): 0 for a
    picture without such stripes, near 1 for stripes alone."""
    import numpy as np

    gray = np.asarray(image.convert("L"), dtype=np.float64)
    gray = gray - gray.mean()
    power = np.abs(np.fft.fft2(gray)) ** 2
    total = power.sum() - power[0, 0]
    if total <= 0:
        return 0.0
    kx = np.abs(np.fft.fftfreq(gray.shape[1]) * gray.shape[1])
    ky = np.abs(np.fft.fftfreq(gray.shape[0]) * gray.shape[0])
    mask = (np.abs(kx[None, :] - cycles) <= band) & (ky[:, None] <= 1)
    return float(power[mask].sum() / total)


IMAGE_STATISTICS = ("red_share", "stripe_energy")


def image_statistics(image, names: Sequence[str], stripe_cycles: int) -> dict[str, float]:
    """The named statistics (:data:`IMAGE_STATISTICS`) of one image."""
    functions = {"red_share": red_share, "stripe_energy": lambda im: stripe_energy(im, stripe_cycles)}
    return {name: functions[name](image) for name in names}


def cell_statistics(cells, names: Sequence[str], stripe_cycles: int) -> list[dict[str, Any]]:
    """One row per comparison-grid cell (:func:`lora_pipeline.diffusion.generation.comparison_cells`): grid row
    and column, label, every LoRA's weight in it (0 where it is off) and the named statistics of its image."""
    loras = list(dict.fromkeys(name for row in cells for cell in row for name in cell.weights))
    rows = []
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            rows.append({"row": r, "column": c, "label": cell.label,
                         **{f"weight_{name}": float(cell.weights.get(name, 0.0)) for name in loras},
                         **image_statistics(cell.image, names, stripe_cycles)})
    return rows
