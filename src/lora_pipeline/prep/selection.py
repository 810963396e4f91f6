"""Which images make the training set: duplicate and size decisions, buckets, output names, lazy renders,
and the caption checks behind each quality-report row. Plain Python; the normalization nodes call it."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any, Sequence

import numpy as np
from PIL import Image

from lora_pipeline.core.config import NormalizationParams
from lora_pipeline.core.files import sha256_hex
from lora_pipeline.prep.captions import normalize_prompt, split_tags
from lora_pipeline.prep.concepts import concept_of
from lora_pipeline.prep.images import (
    ImageCheck,
    choose_bucket,
    crop_geometry,
    fit_to,
    hamming_matches,
    load_rgb,
    make_buckets,
)

CHECK_COLUMNS = [
    "file_name", "sha256", "status", "reason_code", "reason", "orig_width", "orig_height", "width", "height",
    "bucket_width", "bucket_height", "output_name", "note", "role", "folder", "repeats", "class_tokens",
    "sidecar_caption",
]
REG_PREFIX = "reg/"
LOSSY_SUFFIXES = {".jpg", ".jpeg", ".jfif", ".webp", ".avif", ".heic"}  # (WebP may be lossless; rarely is)  # regularization images' place in the normalized dataset folder


def rejected_row(file_name: str, reason_code: str, reason: str) -> dict[str, Any]:
    """A quality-report row for a file that never reached the image checks (a bad name, an orphan caption)."""
    return {column: "" for column in CHECK_COLUMNS} | {
        "file_name": file_name, "status": "rejected", "reason_code": reason_code, "reason": reason,
        "role": "instance", "repeats": 1, "orig_width": 0, "orig_height": 0, "width": 0, "height": 0,
        "bucket_width": 0, "bucket_height": 0}


def output_name(file_name: str, fmt: str, taken: set[str]) -> str:
    """``sub/a.jpg`` -> ``sub/a.png``; ``sub/a_jpg.png`` if another input already claimed that name."""
    path = PurePosixPath(file_name)
    name = path.with_suffix(f".{fmt}").as_posix()
    if name in taken:
        name = path.with_name(f"{path.stem}_{path.suffix.lstrip('.')}.{fmt}").as_posix()
    taken.add(name)
    return name


def select_images(checks: Sequence[ImageCheck], p: NormalizationParams, roles: Sequence[str] | None = None,
                  sidecars: Sequence[str | None] | None = None) -> list[dict[str, Any]]:
    """One quality-report row per checked file: kept (with its bucket and output name) or rejected with a reason.

    Rejections: corrupt file, below ``min_size``, exact duplicate (same bytes), near duplicate (perceptual
    hash, optional), in ``crop`` mode an image that would need upscaling, and a kohya folder with 0 repeats.
    Of two duplicates the best copy is kept: an instance image before a class image, then a lossless file
    before a lossy one (PNG over JPEG), then the larger one, then the first by name; the rejected copy's reason
    names the one kept. ``roles`` says per check ``instance`` or ``reg``; kohya's ``N_concept`` folders give
    repeats and class tokens. Rows come back in the order of ``checks``.
    """
    buckets = make_buckets(p.size, p.bucket_min, p.bucket_max, p.bucket_step)
    roles = roles or ["instance"] * len(checks)
    sidecars = sidecars or [None] * len(checks)
    first_with_hash: dict[str, str] = {}
    kept_hashes: list[int] = []
    kept_names: list[str] = []
    taken: set[str] = set()
    rows: dict[int, dict[str, Any]] = {}
    best_first = sorted(range(len(checks)), key=lambda i: (
        roles[i] == "reg", PurePosixPath(checks[i].file_name).suffix.lower() in LOSSY_SUFFIXES,
        -(checks[i].orig_width or 0) * (checks[i].orig_height or 0), i))
    for index in best_first:
        c, role, sidecar = checks[index], roles[index], sidecars[index]
        concept = concept_of(c.file_name, p.kohya_folders)
        row = dict(file_name=c.file_name, sha256=c.sha256, status="rejected", reason_code=c.reason_code,
                   reason=c.reason,
                   orig_width=c.orig_width, orig_height=c.orig_height, width=c.width, height=c.height,
                   bucket_width=0, bucket_height=0, output_name="", note="", role=role, folder=concept.folder,
                   repeats=concept.repeats, class_tokens=concept.class_tokens, sidecar_caption=sidecar or "")
        if c.ok and concept.repeats == 0:
            row.update(reason_code="zero_repeats",
                       reason=f"folder {concept.folder} asks for 0 repeats (kohya skips it); rename it to "
                              f"1_{concept.class_tokens} or more, or set normalization.kohya_folders: false")
        elif c.ok and c.sha256 in first_with_hash:
            row.update(reason_code="duplicate",
                       reason=f"duplicate of {first_with_hash[c.sha256]} (identical file content)")
        elif c.ok and p.near_duplicates and c.phash is not None:
            matches = hamming_matches(np.array(kept_hashes, dtype=np.uint64), c.phash, p.near_duplicate_distance)
            if matches.size:
                row.update(reason_code="near_duplicate",
                           reason=f"near-duplicate of {kept_names[matches[0]]} (perceptual hash), which was kept "
                                  f"as the better copy (lossless, then larger)")
        if c.ok and not row["reason"]:
            if p.mode == "crop":
                target = p.size
                if c.width < target[0] or c.height < target[1]:
                    row["reason_code"] = "needs_upscale"
                    row["reason"] = (f"smaller than resolution {target[0]}x{target[1]} ({c.width}x{c.height}); "
                                     f"crop mode never upscales: lower 'resolution' or use mode: buckets")
            else:
                target, reduced = choose_bucket((c.width, c.height), buckets, p.bucket_step)
                if reduced:
                    row["note"] = "smaller bucket than resolution (image too small; not upscaled)"
            if not row["reason"]:
                name = output_name(c.file_name, p.output_format, taken)
                row.update(status="kept", bucket_width=target[0], bucket_height=target[1],
                           output_name=REG_PREFIX + name if role == "reg" else name)
                if c.phash is not None:
                    kept_hashes.append(c.phash)
                    kept_names.append(c.file_name)
        if c.ok:
            first_with_hash.setdefault(c.sha256, c.file_name)
        rows[index] = row
    return [rows[index] for index in range(len(checks))]


def render_key(sha256: str, size: tuple[int, int], background: tuple[int, int, int]) -> str:
    """What a rendered training image is made of (source bytes, bucket size, background): equal keys give equal
    files. Its hash names the image in the content-addressed store a past training set is reloaded from."""
    return f"{sha256}|{size[0]}x{size[1]}|{tuple(background)}"


def store_name(key: str, fmt: str) -> str:
    return f"{sha256_hex(key, 32)}.{fmt}"


class ImageRender:
    """Lazy render of one kept image; ``cache_key`` lets the image folder skip it when nothing changed."""

    def __init__(self, root: Any, file_name: str, sha256: str, size: tuple[int, int],
                 background: tuple[int, int, int]):
        self.root, self.file_name, self.size, self.background = root, file_name, size, background
        self.cache_key = render_key(sha256, size, background)

    def __call__(self) -> Image.Image:
        return fit_to(load_rgb(self.root / self.file_name, self.background), self.size)




def caption_flag(caption: tuple[str, str] | None, image_sha256: str, trigger: str) -> str:
    """Why a kept image's caption needs a look (the image is still kept), or ``""``.

    ``caption`` is ``(training prompt, sha256 of the image it was made for)``, or None when there is none.
    """
    if caption is None:
        return "no caption: run the captioning pipeline first"
    text, caption_sha = caption
    if caption_sha != image_sha256:
        return "stale caption: the image changed since captioning; re-run captioning"
    if len(split_tags(text)) <= (1 if trigger else 0):
        return "empty caption: only the trigger word; add tags in data/01_raw/reviewed_captions.csv"
    return ""


def training_prompt(caption_text: str, p: NormalizationParams, class_tokens: str = "") -> str:
    """Trigger word first, then ``front_keywords``, then the other tags, lower-cased and de-duplicated.

    An image in a kohya ``N_concept`` folder has the folder's class tokens as its trigger."""
    return normalize_prompt(str(caption_text), class_tokens or p.prompt.trigger, p.prompt.lowercase,
                            p.prompt.front_keywords)


def folder_table(report: Any) -> list[dict[str, Any]]:
    """Each source folder's role, kohya repeats, class tokens and kept/rejected counts (dataset_info.json)."""
    table: dict[tuple[str, str], dict[str, Any]] = {}
    for row in report.itertuples():
        entry = table.setdefault((row.role, row.folder), {
            "folder": row.folder, "role": row.role, "repeats": int(row.repeats), "class_tokens": row.class_tokens,
            "kept": 0, "rejected": 0})
        entry["kept" if row.status == "kept" else "rejected"] += 1
    return [table[key] for key in sorted(table)]


def sdxl_geometry(widths, heights, bucket_widths, bucket_heights) -> dict[str, list[int]]:
    """metadata.csv's SDXL micro-conditioning columns: the size before resizing and the crop's top-left."""
    crops = [crop_geometry((int(w), int(h)), (int(bw), int(bh)))
             for w, h, bw, bh in zip(widths, heights, bucket_widths, bucket_heights)]
    return {"original_width": [int(w) for w in widths], "original_height": [int(h) for h in heights],
            "crop_top": [top for top, _ in crops], "crop_left": [left for _, left in crops]}
