"""Normalization nodes: thin adapters over ``lora_pipeline.prep.images`` and ``lora.captions``."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from PIL import Image

from lora_pipeline.config import NormalizationParams, parse_params
from lora_pipeline.core.cache import DiskCache, FileMemo, settings_key
from lora_pipeline.datasets.image_folder import ImageFolder
from lora_pipeline.errors import DataError
from lora_pipeline.pipelines.metrics import as_mlflow_metrics
from lora_pipeline.prep.captions import normalize_prompt, split_tags, tag_frequency
from lora_pipeline.prep.images import (
    ImageCheck,
    check_image,
    choose_bucket,
    crop_geometry,
    fit_to,
    hamming_matches,
    load_rgb,
    make_buckets,
)

logger = logging.getLogger(__name__)

CHECK_COLUMNS = [
    "file_name", "sha256", "status", "reason_code", "reason", "orig_width", "orig_height", "width", "height",
    "bucket_width", "bucket_height", "output_name", "note",
]


def _output_name(file_name: str, fmt: str, taken: set[str]) -> str:
    """``sub/a.jpg`` -> ``sub/a.png``; ``sub/a_jpg.png`` if another input already claimed that name."""
    path = PurePosixPath(file_name)
    name = path.with_suffix(f".{fmt}").as_posix()
    if name in taken:
        name = path.with_name(f"{path.stem}_{path.suffix.lstrip('.')}.{fmt}").as_posix()
    taken.add(name)
    return name


def inspect_images(raw_images: ImageFolder, params: dict[str, Any], check_cache: DiskCache | None = None
                   ) -> pd.DataFrame:
    """Decode every image once (in parallel) and decide kept/rejected with a reason and a target size.

    Rejections: corrupt file, below ``min_size``, exact duplicate (same bytes), near duplicate
    (perceptual hash, optional), and in ``crop`` mode an image that would need upscaling.
    """
    p = parse_params(NormalizationParams, params, "normalization")
    # Checks are remembered by (path, size, mtime) and the check settings: a re-run decodes only new files.
    memo = FileMemo(check_cache, f"check-{settings_key({'min': p.min_size, 'phash': p.near_duplicates})}")
    root = raw_images.root

    def check(path: Path) -> dict[str, Any]:
        name = path.relative_to(root).as_posix()
        return dataclasses.asdict(check_image(root, name, min_size=p.min_size, want_phash=p.near_duplicates))

    found = memo.map(check, [raw_images.path(n) for n in raw_images.names], p.workers, "checking images")
    checks = [ImageCheck(**{**c, "file_name": n}) for n, c in zip(raw_images.names, found)]
    buckets = make_buckets(p.resolution, p.bucket_min, p.bucket_max, p.bucket_step)
    first_with_hash: dict[str, str] = {}
    kept_hashes: list[int] = []
    kept_names: list[str] = []
    taken: set[str] = set()
    rows = []
    for c in checks:
        row = dict(file_name=c.file_name, sha256=c.sha256, status="rejected", reason_code=c.reason_code,
                   reason=c.reason,
                   orig_width=c.orig_width, orig_height=c.orig_height, width=c.width, height=c.height,
                   bucket_width=0, bucket_height=0, output_name="", note="")
        if c.ok and c.sha256 in first_with_hash:
            row.update(reason_code="duplicate",
                       reason=f"duplicate of {first_with_hash[c.sha256]} (identical file content)")
        elif c.ok and p.near_duplicates and c.phash is not None:
            matches = hamming_matches(np.array(kept_hashes, dtype=np.uint64), c.phash, p.near_duplicate_distance)
            if matches.size:
                row.update(reason_code="near_duplicate",
                           reason=f"near-duplicate of {kept_names[matches[0]]} (perceptual hash)")
        if c.ok and not row["reason"]:
            if p.mode == "crop":
                target, reduced = (p.resolution, p.resolution), min(c.width, c.height) < p.resolution
                if reduced:
                    row["reason_code"] = "needs_upscale"
                    row["reason"] = (f"smaller than resolution {p.resolution} ({c.width}x{c.height}); crop mode "
                                     f"never upscales: lower 'resolution' or use mode: buckets")
            else:
                target, reduced = choose_bucket((c.width, c.height), buckets, p.bucket_step)
                if reduced:
                    row["note"] = "smaller bucket than resolution (image too small; not upscaled)"
            if not row["reason"]:
                row.update(status="kept", bucket_width=target[0], bucket_height=target[1],
                           output_name=_output_name(c.file_name, p.output_format, taken))
                if c.phash is not None:
                    kept_hashes.append(c.phash)
                    kept_names.append(c.file_name)
        if c.ok:
            first_with_hash.setdefault(c.sha256, c.file_name)
        rows.append(row)
    checks_table = pd.DataFrame(rows, columns=CHECK_COLUMNS)
    rejected = checks_table[checks_table.status == "rejected"]
    for item in rejected.itertuples():
        logger.warning("Rejected %s: %s", item.file_name, item.reason)
    logger.info("Checked %d images: %d kept, %d rejected", len(checks_table), len(checks_table) - len(rejected),
                len(rejected))
    return checks_table


class _Render:
    """Lazy render of one kept image; ``cache_key`` lets the image folder skip it when nothing changed."""

    def __init__(self, root: Any, file_name: str, sha256: str, size: tuple[int, int],
                 background: tuple[int, int, int]):
        self.root, self.file_name, self.size, self.background = root, file_name, size, background
        self.cache_key = f"{sha256}|{size[0]}x{size[1]}|{background}"

    def __call__(self) -> Image.Image:
        return fit_to(load_rgb(self.root / self.file_name, self.background), self.size)


def render_images(
    raw_images: ImageFolder, quality_report: pd.DataFrame, params: dict[str, Any]
) -> dict[str, _Render]:
    """Lazy RGB renders of the kept images at their bucket size, keyed by output name.

    Takes the saved quality report as input so the report is on disk even when this node stops the run.
    """
    p = parse_params(NormalizationParams, params, "normalization")
    kept = quality_report[quality_report.status == "kept"]
    if kept.empty:
        reasons = Counter(quality_report.reason_code)
        summary = ", ".join(f"{count}x {reason}" for reason, count in reasons.most_common(3))
        raise DataError(
            f"All {len(quality_report)} images in {raw_images.root} were rejected ({summary}). "
            f"See the newest data/08_reporting/quality_report.csv/<version>/ for each file's reason; fix or "
            f"replace the images, or adjust parameters_normalization.yml (e.g. min_size), and re-run."
        )
    return {
        row.output_name: _Render(raw_images.root, row.file_name, row.sha256,
                                 (int(row.bucket_width), int(row.bucket_height)), p.background)
        for row in kept.itertuples()
    }


def build_training_metadata(
    image_checks: pd.DataFrame, captions: pd.DataFrame, params: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any], dict[str, dict[str, float]]]:
    """Normalize each kept image's prompt; return metadata.csv (twice: in the dataset folder and as a versioned
    snapshot), the quality report, dataset info and metrics.

    Prompts: trigger word first, then ``front_keywords``, then the remaining tags, lower-cased, stripped and
    de-duplicated. A caption that is empty, stale (image changed since captioning) or missing is flagged
    in the report; the image is still kept.
    """
    p = parse_params(NormalizationParams, params, "normalization")
    # Plain dicts, not DataFrame.loc per row: .loc costs ~0.1 ms a call, which is most of a 10k-image re-run.
    caption_of = dict(zip(captions.file_name, zip(captions.text, captions.sha256)))
    report = image_checks.copy()
    texts, flags = [], []
    for row in report.itertuples():
        text, flag = "", ""
        if row.file_name not in caption_of:
            flag = "no caption: run the captioning pipeline first"
        else:
            caption_text, caption_sha = caption_of[row.file_name]
            text = normalize_prompt(str(caption_text), p.prompt.trigger, p.prompt.lowercase, p.prompt.front_keywords)
            if caption_sha != row.sha256:
                flag = "stale caption: the image changed since captioning; re-run captioning"
            elif len(split_tags(text)) <= (1 if p.prompt.trigger else 0):
                flag = "empty caption: only the trigger word; add tags in data/01_raw/reviewed_captions.csv"
        texts.append(text)
        flags.append(flag)
    report["text"] = texts
    report["caption_flag"] = flags
    kept = report[report.status == "kept"]
    crops = [crop_geometry((int(w), int(h)), (int(bw), int(bh)))
             for w, h, bw, bh in zip(kept.width, kept.height, kept.bucket_width, kept.bucket_height)]
    metadata = pd.DataFrame({
        "file_name": kept.output_name, "text": kept.text,
        "width": kept.bucket_width.astype(int), "height": kept.bucket_height.astype(int),
        # SDXL's micro-conditioning: the size before resizing and the crop's top-left corner.
        "original_width": kept.width.astype(int), "original_height": kept.height.astype(int),
        "crop_top": [top for top, _ in crops], "crop_left": [left for _, left in crops],
    })
    frequency = tag_frequency(kept.text)
    buckets = Counter(f"{w}x{h}" for w, h in zip(kept.bucket_width, kept.bucket_height))
    info = {
        "trigger": p.prompt.trigger, "keep_tokens": p.prompt.keep_tokens, "mode": p.mode,
        "resolution": p.resolution, "num_images": len(kept), "num_rejected": int((report.status != "kept").sum()),
        "buckets": dict(sorted(buckets.items())), "tag_frequency": frequency,
    }
    metrics = {
        "images_in": len(report), "images_kept": len(kept), "images_rejected": info["num_rejected"],
        "captions_flagged": int((kept.caption_flag != "").sum()), "distinct_tags": len(frequency),
        "buckets": len(buckets),
    }
    for code, count in Counter(code for code in report.reason_code if code).items():
        metrics[f"rejected_{code}"] = count
    if mlflow.active_run():
        mlflow.log_text(report.to_csv(index=False), "quality_report.csv")
    return metadata, metadata, report, info, as_mlflow_metrics(metrics)
