"""Normalization nodes: thin adapters over ``lora_pipeline.prep.selection`` (what is kept, and why not)."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from lora_pipeline.config import NormalizationParams, parse_params
from lora_pipeline.core.cache import DiskCache, FileMemo, settings_key
from lora_pipeline.datasets.image_folder import ImageFolder
from lora_pipeline.diffusion.families import native_resolution
from lora_pipeline.errors import DataError
from lora_pipeline.pipelines.metrics import as_mlflow_metrics
from lora_pipeline.prep.captions import tag_frequency
from lora_pipeline.prep.images import ImageCheck, check_image
from lora_pipeline.prep.selection import (
    CHECK_COLUMNS,
    ImageRender,
    caption_flag,
    sdxl_geometry,
    select_images,
    training_prompt,
)

logger = logging.getLogger(__name__)


def sized_params(params: dict[str, Any]) -> NormalizationParams:
    """Validated parameters with concrete sizes (``resolution: auto`` -> the base model family's native size)."""
    p = parse_params(NormalizationParams, params, "normalization")
    return p.sized(native_resolution(p.base_model, p.base_model_family))


def inspect_images(raw_images: ImageFolder, params: dict[str, Any], check_cache: DiskCache | None = None
                   ) -> pd.DataFrame:
    """Decode every image once (in parallel) and decide kept/rejected with a reason and a target size.

    Rejections: corrupt file, below ``min_size``, exact duplicate (same bytes), near duplicate
    (perceptual hash, optional), and in ``crop`` mode an image that would need upscaling.
    """
    p = sized_params(params)
    # Checks are remembered by (path, size, mtime) and the check settings: a re-run decodes only new files.
    memo = FileMemo(check_cache, f"check-{settings_key({'min': p.min_size, 'phash': p.near_duplicates})}")
    root = raw_images.root

    def check(path: Path) -> dict[str, Any]:
        name = path.relative_to(root).as_posix()
        return dataclasses.asdict(check_image(root, name, min_size=p.min_size, want_phash=p.near_duplicates))

    found = memo.map(check, [raw_images.path(n) for n in raw_images.names], p.workers, "checking images")
    checks = [ImageCheck(**{**c, "file_name": n}) for n, c in zip(raw_images.names, found)]
    rows = select_images(checks, p)
    checks_table = pd.DataFrame(rows, columns=CHECK_COLUMNS)
    rejected = checks_table[checks_table.status == "rejected"]
    for item in rejected.itertuples():
        logger.warning("Rejected %s: %s", item.file_name, item.reason)
    logger.info("Checked %d images: %d kept, %d rejected", len(checks_table), len(checks_table) - len(rejected),
                len(rejected))
    return checks_table


def render_images(
    raw_images: ImageFolder, quality_report: pd.DataFrame, params: dict[str, Any]
) -> dict[str, ImageRender]:
    """Lazy RGB renders of the kept images at their bucket size, keyed by output name.

    Takes the saved quality report as input so the report is on disk even when this node stops the run.
    """
    p = sized_params(params)
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
        row.output_name: ImageRender(raw_images.root, row.file_name, row.sha256,
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
    p = sized_params(params)
    # Plain dicts, not DataFrame.loc per row: .loc costs ~0.1 ms a call, which is most of a 10k-image re-run.
    caption_of = dict(zip(captions.file_name, zip(captions.text, captions.sha256)))
    report = image_checks.copy()
    texts, flags = [], []
    for row in report.itertuples():
        caption = caption_of.get(row.file_name)
        text = training_prompt(caption[0], p) if caption else ""
        texts.append(text)
        flags.append(caption_flag((text, caption[1]) if caption else None, row.sha256, p.prompt.trigger))
    report["text"] = texts
    report["caption_flag"] = flags
    kept = report[report.status == "kept"]
    metadata = pd.DataFrame({
        "file_name": kept.output_name, "text": kept.text,
        "width": kept.bucket_width.astype(int), "height": kept.bucket_height.astype(int),
        **sdxl_geometry(kept.width, kept.height, kept.bucket_width, kept.bucket_height),
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
        mlflow.log_text(report.to_csv(index=False), f"{p.subject or 'dataset'}/quality_report.csv")
        # Logged here rather than through kedro-mlflow's artifact dataset, which ParallelRunner cannot pickle.
        mlflow.log_dict(info, f"{p.subject or 'dataset'}/dataset_info.json")
    return metadata, metadata, report, info, as_mlflow_metrics(metrics)
