"""What a LoRA changed: denoising loss on training and held-out images, CLIP adherence and style similarity."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

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
