"""Captioners (BLIP, CLIP tags) and caption/prompt normalization."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Protocol, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from lora_pipeline.core.errors import DataError
from lora_pipeline.core.models import load_pretrained, pick_device

if TYPE_CHECKING:
    from lora_pipeline.core.config import CaptioningParams

logger = logging.getLogger(__name__)


class Captioner(Protocol):
    name: str

    def caption(self, images: Sequence[Image.Image]) -> list[str]: ...


class BlipCaptioner:
    """Batched BLIP image captioning (``BlipForConditionalGeneration``)."""

    name = "blip"

    def __init__(self, model: str, allow_download: bool = False, device: str = "auto", max_new_tokens: int = 30):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.device = pick_device(device)
        self.processor = load_pretrained(BlipProcessor, model, allow_download)
        self.model = load_pretrained(BlipForConditionalGeneration, model, allow_download).to(self.device).eval()
        self.max_new_tokens = max_new_tokens

    @torch.inference_mode()
    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [text.strip() for text in self.processor.batch_decode(ids, skip_special_tokens=True)]


class ClipTagger:
    """Zero-shot tagging: CLIP scores each image against a tag vocabulary; keeps the top-k above a threshold."""

    name = "clip_tags"

    def __init__(
        self, model: str, vocabulary: Sequence[str], top_k: int = 5, threshold: float = 0.05,
        prompt: str = "a photo of {tag}", allow_download: bool = False, device: str = "auto",
    ):
        from transformers import CLIPModel, CLIPProcessor

        self.device = pick_device(device)
        self.processor = load_pretrained(CLIPProcessor, model, allow_download)
        self.model = load_pretrained(CLIPModel, model, allow_download).to(self.device).eval()
        self.vocabulary = list(vocabulary)
        self.top_k = min(top_k, len(self.vocabulary))
        self.threshold = threshold
        with torch.inference_mode():
            text = self.processor(text=[prompt.format(tag=t) for t in self.vocabulary], return_tensors="pt",
                                  padding=True).to(self.device)
            features = self.model.get_text_features(**text)
            features = getattr(features, "pooler_output", features)
            self.text_features = torch.nn.functional.normalize(features, dim=-1)

    @torch.inference_mode()
    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        pixels = self.processor(images=list(images), return_tensors="pt").to(self.device)
        features = self.model.get_image_features(**pixels)
        features = getattr(features, "pooler_output", features)
        image_features = torch.nn.functional.normalize(features, dim=-1)
        logits = self.model.logit_scale.exp() * image_features @ self.text_features.T
        probs = logits.softmax(dim=-1)
        top = probs.topk(self.top_k, dim=-1)
        captions = []
        for values, indices in zip(top.values.tolist(), top.indices.tolist()):
            tags = [self.vocabulary[i] for v, i in zip(values, indices) if v >= self.threshold]
            captions.append(", ".join(tags))
        return captions


def caption_in_batches(
    captioner: Captioner, names: Sequence[str], load: Callable[[str], Image.Image], batch_size: int
) -> tuple[dict[str, str], dict[str, str]]:
    """Caption ``names`` in batches with a progress bar. Returns ``(captions, load errors)`` by name."""
    results: dict[str, str] = {}
    failures: dict[str, str] = {}
    with tqdm(total=len(names), desc=f"captioning ({captioner.name})", unit="img") as bar:
        for start in range(0, len(names), batch_size):
            batch_names, batch_images = [], []
            for name in names[start : start + batch_size]:
                try:
                    batch_images.append(load(name))
                    batch_names.append(name)
                except ValueError as exc:
                    failures[name] = str(exc)
                    logger.warning("Not captioning %s: %s", name, exc)
            if batch_images:
                results.update(zip(batch_names, captioner.caption(batch_images)))
            bar.update(len(names[start : start + batch_size]))
    return results, failures


def apply_template(template: str, trigger: str, caption: str) -> str:
    """Fill ``template`` (e.g. ``"{trigger}, {caption}"``); empty slots leave no stray commas."""
    return normalize_separators(template.format(trigger=trigger, caption=caption))


def normalize_separators(text: str) -> str:
    return ", ".join(part.strip() for part in text.split(",") if part.strip())


def split_tags(caption: str) -> list[str]:
    return [tag for tag in (re.sub(r"\s+", " ", part).strip() for part in caption.split(",")) if tag]


def normalize_prompt(
    caption: str, trigger: str = "", lowercase: bool = True, front_keywords: Iterable[str] = ()
) -> str:
    """Trigger first, then ``front_keywords`` that occur, then the rest; tags stripped and de-duplicated."""
    tags = split_tags(caption)
    if lowercase:
        tags = [tag.lower() for tag in tags]
    trigger_tag = trigger.strip().lower() if lowercase else trigger.strip()
    tags = [tag for tag in dict.fromkeys(tags) if tag != trigger_tag]
    front = [kw.lower() if lowercase else kw for kw in front_keywords]
    ordered = [kw for kw in front if kw in tags] + [tag for tag in tags if tag not in front]
    return ", ".join(([trigger_tag] if trigger_tag else []) + ordered)


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """Tag counts over a caption set (kohya's ``ss_tag_frequency`` per dataset), most frequent first."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in split_tags(caption):
            counts[tag] = counts.get(tag, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


# ----------------------------------------------------------------------------- which caption an image gets

METADATA_TEXT_COLUMNS = ("text", "caption", "prompt")  # what imagefolder and auto-labelling tools name it


def read_metadata_csv(path: str | Path) -> dict[str, str]:
    """``{file_name: caption}`` of a metadata.csv: a ``file_name`` column and the caption in ``text``,
    ``caption`` or ``prompt`` (the first of these present). Rows with an empty caption are left out."""
    import pandas as pd

    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # pandas' parser errors are ValueErrors
        raise DataError(f"{path}: not a readable metadata.csv ({exc}). Save it as UTF-8 CSV with a header line "
                        f"such as file_name,text and re-run.") from None
    table.columns = [str(column).strip() for column in table.columns]
    text = next((column for column in METADATA_TEXT_COLUMNS if column in table.columns), None)
    if "file_name" not in table.columns or text is None:
        raise DataError(f"{path}: a captions metadata.csv needs a 'file_name' column and a caption column named "
                        f"{', '.join(repr(c) for c in METADATA_TEXT_COLUMNS)}; it has "
                        f"{', '.join(repr(c) for c in table.columns) or 'no columns'}. Rename the header line "
                        f"(e.g. file_name,text) and re-run.")
    return {name.strip(): caption.strip() for name, caption in zip(table.file_name, table[text])
            if name.strip() and caption.strip()}


def metadata_captions(path: str | Path, images_root: str | Path) -> dict[str, str]:
    """A metadata.csv's captions keyed by image name relative to ``images_root``. ``file_name`` is relative to the
    CSV's folder (diffusers' imagefolder), which may be the image folder itself or above it."""
    base, root = Path(path).resolve().parent, Path(images_root).resolve()
    captions = {}
    for file_name, caption in read_metadata_csv(path).items():
        image = (base / file_name).resolve()
        captions[image.relative_to(root).as_posix() if image.is_relative_to(root) else file_name] = caption
    return captions


def load_captioner(params: "CaptioningParams") -> Captioner:
    """The auto-captioner the parameters ask for."""
    if params.backend == "blip":
        return BlipCaptioner(params.model, params.allow_download, params.device, params.max_new_tokens)
    if params.backend == "wd14":
        from lora_pipeline.prep.wd14 import WD14Tagger

        w = params.wd14
        return WD14Tagger(params.model, params.allow_download, w.general_threshold, w.character_threshold,
                          w.exclude_tags, w.underscores_to_spaces, w.escape_parentheses, params.device)
    tags = params.clip_tags
    return ClipTagger(params.model, tags.vocabulary, tags.top_k, tags.threshold, tags.prompt,
                      params.allow_download, params.device)


def auto_caption_key(sha256: str, params: "CaptioningParams") -> str:
    """Cache key of an auto caption: image content + the settings that change it (model, tags, length).

    A changed image or changed settings miss the cache; nothing stale is ever returned."""
    from lora_pipeline.core.cache import settings_key

    return f"{sha256}-{settings_key(params.fingerprint_fields())}"


def has_human_caption(reviewed: bool, has_sidecar: bool, params: "CaptioningParams") -> bool:
    """A reviewed row, or a kohya sidecar when sidecars are used: such images never reach the captioner."""
    return reviewed or (params.use_sidecars and has_sidecar)


def pick_caption(reviewed: str | None, sidecar: str | None, auto: str | None,
                 params: "CaptioningParams") -> tuple[str, str]:
    """``(text, source)``. Precedence: ``reviewed_captions.csv`` row (verbatim) > kohya sidecar > auto caption;
    source ``none`` when there is none (sidecar-only backend without a sidecar, or an undecodable image)."""
    if reviewed is not None:
        return reviewed, "reviewed"
    if params.use_sidecars and sidecar is not None:
        return apply_template(params.template, params.trigger, sidecar), "sidecar"
    if auto is not None:
        return apply_template(params.template, params.trigger, auto), "auto"
    return "", "none"
