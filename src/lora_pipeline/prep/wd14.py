"""WD14-style booru tagging with a SmilingWolf WD tagger (``model.onnx`` + ``selected_tags.csv``) on onnxruntime.

No maintained Python package wraps these taggers (kohya's tag_images_by_wd14_tagger.py is a script), so the
pre- and post-processing the model card describes is written here: pad to a white square, resize to the
model's input size, BGR, float 0-255, NHWC; sigmoid scores per tag, thresholds per category.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from lora_pipeline.core.errors import ConfigError, ModelNotFoundError
from lora_pipeline.core.models import resolve_model

logger = logging.getLogger(__name__)

MODEL_FILE, TAGS_FILE = "model.onnx", "selected_tags.csv"
GENERAL, CHARACTER, RATING = 0, 4, 9  # selected_tags.csv categories


@dataclass(frozen=True)
class TagList:
    names: list[str]
    categories: list[int]


def read_tags(path: Path) -> TagList:
    """``selected_tags.csv``: ``tag_id,name,category,count``, one row per model output, in output order."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"name", "category"} <= set(rows[0]):
        raise ConfigError(f"{path} is not a WD tagger tag list (columns tag_id,name,category,count).")
    return TagList([row["name"] for row in rows], [int(row["category"]) for row in rows])


def tagger_files(model: str, allow_download: bool) -> tuple[Path, Path]:
    """A local folder holding model.onnx and selected_tags.csv, or a hub id fetched when downloads are allowed."""
    path = Path(model).expanduser()
    if path.is_dir():
        found = (path / MODEL_FILE, path / TAGS_FILE)
        missing = [p.name for p in found if not p.is_file()]
        if missing:
            raise ModelNotFoundError(f"WD tagger folder {path} lacks {', '.join(missing)}; it needs {MODEL_FILE} and "
                                     f"{TAGS_FILE} (the layout of SmilingWolf/wd-*-tagger-v3 on the hub).")
        return found
    repo = resolve_model(model, allow_download)  # raises with advice when it is neither local nor allowed
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo, MODEL_FILE)), Path(hf_hub_download(repo, TAGS_FILE))


def format_tag(name: str, underscores_to_spaces: bool = True, escape_parentheses: bool = True) -> str:
    """``smile_(happy)`` -> ``smile \\(happy\\)``: WebUI reads bare parentheses as attention weights."""
    if underscores_to_spaces and len(name) > 3:  # kaomoji such as ^_^ keep their underscores
        name = name.replace("_", " ")
    if escape_parentheses:
        name = name.replace("(", "\\(").replace(")", "\\)")
    return name


def to_model_input(image: Image.Image, size: int) -> np.ndarray:
    """Pad to a white square (transparency on white), resize to ``size``, RGB -> BGR, float32 0-255 (HWC)."""
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, image)
    image = image.convert("RGB")
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1].copy()


class WD14Tagger:
    """Booru tags above ``general_threshold`` / ``character_threshold``, rating tags left out, best first."""

    name = "wd14"

    def __init__(self, model: str, allow_download: bool = False, general_threshold: float = 0.35,
                 character_threshold: float = 0.85, exclude_tags: Sequence[str] = (),
                 underscores_to_spaces: bool = True, escape_parentheses: bool = True, device: str = "auto"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError("captioning.backend: wd14 needs onnxruntime, which is not installed. Run "
                              "`pip install 'lora_pipeline[tagger]'` (or pip install onnxruntime-gpu on CUDA).") from None
        model_path, tags_path = tagger_files(model, allow_download)
        self.tags = read_tags(tags_path)
        providers = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(model_path), providers=providers)
        spec = self.session.get_inputs()[0]
        self.input_name, self.size = spec.name, int(spec.shape[1])
        outputs = self.session.get_outputs()[0].shape[-1]
        if isinstance(outputs, int) and outputs != len(self.tags.names):
            raise ConfigError(f"{tags_path} lists {len(self.tags.names)} tags but {model_path} scores {outputs}; "
                              f"use the two files of the same tagger release.")
        self.thresholds = {GENERAL: general_threshold, CHARACTER: character_threshold}
        self.exclude = {format_tag(t.strip()) for t in exclude_tags} | {t.strip() for t in exclude_tags}
        self.underscores, self.escape = underscores_to_spaces, escape_parentheses
        logger.info("WD tagger %s: %d tags, input %dpx", model_path, len(self.tags.names), self.size)

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        batch = np.stack([to_model_input(image, self.size) for image in images])
        scores = self.session.run(None, {self.input_name: batch})[0]
        return [self._tags(row) for row in scores]

    def _tags(self, scores: np.ndarray) -> str:
        picked = []
        for index in np.argsort(-scores, kind="stable"):
            category = self.tags.categories[index]
            threshold = self.thresholds.get(category)
            if threshold is None or scores[index] < threshold:
                continue  # rating tags (and unknown categories) are never written
            tag = format_tag(self.tags.names[index], self.underscores, self.escape)
            if tag not in self.exclude and self.tags.names[index] not in self.exclude:
                picked.append((category != CHARACTER, tag))
        return ", ".join(tag for _, tag in sorted(picked, key=lambda item: item[0]))  # characters first, as kohya
