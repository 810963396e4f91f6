"""The training set as the trainer sees it: :class:`Example`\\ s from ``metadata.csv``, the dataset's identity, and
which earlier LoRA a retrain starts from."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from lora_pipeline.core.errors import DataError
from lora_pipeline.core.files import sha256_file, sha256_hex
from lora_pipeline.diffusion.prompts import lora_index

GEOMETRY = ("original_width", "original_height", "crop_top", "crop_left")
IMAGE_STORE = "image_store"  # beside the dataset folder: every rendered image by its render key


@dataclass(frozen=True)
class Example:
    """One training image: its file, caption, bucket size and content hash; for SDXL's size conditioning also
    the size it had before resizing and where the center crop started (defaults: the bucket, no crop)."""

    path: Path
    text: str
    width: int
    height: int
    sha256: str
    original_size: tuple[int, int] | None = None  # (width, height)
    crop_top_left: tuple[int, int] = (0, 0)  # (top, left), in SDXL's order
    repeats: int = 1  # kohya's N of an N_concept folder
    is_reg: bool = False  # a regularization (class) image: its loss is weighted by prior_loss_weight


def build_examples(root: str | os.PathLike | Any, metadata: pd.DataFrame) -> list[Example]:
    """One :class:`Example` per ``metadata.csv`` row; every listed file must exist.

    The optional geometry columns (written by normalization) feed SDXL's size conditioning; without them the
    bucket size and no crop are assumed.
    """
    root = Path(root if isinstance(root, (str, os.PathLike)) else root.root)  # a folder, or an ImageFolder
    if metadata.empty:
        raise DataError("metadata.csv lists no images. Run `kedro run --pipelines normalization` first.")
    store = root.parent / IMAGE_STORE
    if "store_file" in metadata.columns and store.is_dir():
        # a metadata version (the newest, or one pinned with --load-versions) reads its exact images
        metadata = metadata.assign(file_name=[f"../{IMAGE_STORE}/{name}" for name in metadata.store_file])
    missing = [name for name in metadata.file_name if not (root / name).is_file()]
    if missing:
        raise DataError(f"metadata.csv lists {len(missing)} file(s) missing from {root}, e.g. "
                        f"{missing[0]}. Re-run the normalization pipeline.")
    has_geometry = all(column in metadata.columns for column in GEOMETRY)
    has_roles = "repeats" in metadata.columns and "is_reg" in metadata.columns
    examples = []
    for row in metadata.itertuples():
        geometry: dict[str, Any] = {}
        if has_geometry:
            geometry = {"original_size": (int(row.original_width), int(row.original_height)),
                        "crop_top_left": (int(row.crop_top), int(row.crop_left))}
        if has_roles:
            geometry.update(repeats=int(row.repeats), is_reg=bool(int(row.is_reg)))
        examples.append(Example(root / row.file_name, str(row.text), int(row.width), int(row.height),
                                sha256_file(root / row.file_name), **geometry))
    return examples


def dataset_hash(examples: list[Example]) -> str:
    """Content hash of the training set: image bytes and captions, order-independent."""
    def lines():
        for ex in sorted(examples, key=lambda e: (e.sha256, e.text, e.is_reg)):
            # Folder repeats and the class-image role change training; the plain case hashes as it always did.
            extra = f"|{ex.repeats}|{int(ex.is_reg)}" if (ex.repeats, ex.is_reg) != (1, False) else ""
            yield f"{ex.sha256}|{ex.text}{extra}\n"

    return sha256_hex(lines())


def resolve_init_lora(init_lora: str, export_dir: str, output_name: str) -> Path:
    """``init_lora: latest`` -> the newest exported version of ``output_name``; else the path as given."""
    if init_lora != "latest":
        return Path(init_lora)
    found = lora_index([export_dir]).get(output_name)
    if found is None:
        raise DataError(f"init_lora: latest, but {export_dir} has no export of '{output_name}' yet. Train and "
                        f"export once (kedro run), or set init_lora: null.")
    return found
