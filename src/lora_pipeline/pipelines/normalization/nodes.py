"""Normalization nodes: thin adapters over ``lora_pipeline.prep.selection`` (what is kept, and why not)."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from lora_pipeline.core.cache import DiskCache, FileMemo, settings_key
from lora_pipeline.core.config import NormalizationParams
from lora_pipeline.core.errors import DataError
from lora_pipeline.core.spec import DatasetInfo, FolderInfo
from lora_pipeline.datasets.image_folder import ImageFolder
from lora_pipeline.diffusion.families import native_resolution
from lora_pipeline.pipelines import tracking
from lora_pipeline.pipelines.tracking import as_mlflow_metrics
from lora_pipeline.prep.captions import normalize_prompt, tag_frequency
from lora_pipeline.prep.concepts import Concept, regularization_prompt
from lora_pipeline.prep.images import ImageCheck, check_image, read_sidecar
from lora_pipeline.prep.selection import (
    CHECK_COLUMNS,
    ImageRender,
    caption_flag,
    folder_table,
    rejected_row,
    render_key,
    sdxl_geometry,
    select_images,
    store_name,
    training_prompt,
)

logger = logging.getLogger(__name__)


def sized_params(p: NormalizationParams) -> NormalizationParams:
    """The parameters with concrete sizes (``resolution: auto`` -> the base model family's native size)."""
    return p.sized(native_resolution(p.base_model, p.base_model_family))


def inspect_images(raw_images: ImageFolder, params: NormalizationParams, check_cache: DiskCache | None = None,
                   reg_images: ImageFolder | None = None) -> pd.DataFrame:
    """Decode every image once (in parallel) and decide kept/rejected with a reason and a target size.

    Rejections: corrupt file, below ``min_size``, exact duplicate (same bytes), near duplicate
    (perceptual hash, optional), and in ``crop`` mode an image that would need upscaling. ``reg_images``
    (kohya's reg_data_dir) are checked the same way and reported with role ``reg``.
    """
    p = sized_params(params)
    # Checks are remembered by (path, size, mtime) and the check settings: a re-run decodes only new files.
    memo = FileMemo(check_cache, f"check-{settings_key({'min': p.min_size, 'phash': p.near_duplicates})}")
    sources = [(raw_images, "instance")] + ([(reg_images, "reg")] if reg_images and reg_images.names else [])
    checks, roles, sidecars = [], [], []
    for folder, role in sources:
        root = folder.root

        def check(path: Path, root: Path = root) -> dict[str, Any]:
            name = path.relative_to(root).as_posix()
            return dataclasses.asdict(check_image(root, name, min_size=p.min_size, want_phash=p.near_duplicates))

        found = memo.map(check, [folder.path(n) for n in folder.names], p.workers, f"checking {role} images")
        checks += [ImageCheck(**{**c, "file_name": n}) for n, c in zip(folder.names, found)]
        roles += [role] * len(folder.names)
        sidecars += [_reg_sidecar(folder.path(n), p.reg_caption_extension) if role == "reg" else None
                     for n in folder.names]
        if role == "reg":
            _warn_unread_reg_captions(folder, p.reg_caption_extension)
    rows = select_images(checks, p, roles, sidecars) + orphan_caption_rows(raw_images) + [
        rejected_row(name, "bad_file_name", "file name is not valid UTF-8 (undecodable bytes shown as \\x..); "
                                            "rename the file") for name in raw_images.bad_names]
    checks_table = pd.DataFrame(rows, columns=CHECK_COLUMNS)
    rejected = checks_table[checks_table.status == "rejected"]
    for item in rejected.itertuples():
        logger.warning("Rejected %s: %s", item.file_name, item.reason)
    logger.info("Checked %d images: %d kept, %d rejected", len(checks_table), len(checks_table) - len(rejected),
                len(rejected))
    return checks_table


CAPTION_SUFFIXES = (".txt", ".caption")


def orphan_caption_rows(raw_images: ImageFolder) -> list[dict[str, Any]]:
    """A report row for every caption file with no image beside it (a renamed or deleted image, a typo)."""
    images = {Path(name).with_suffix("").as_posix() for name in raw_images.names}
    rows = []
    for path in sorted(raw_images.root.rglob("*")):
        if path.suffix.lower() in CAPTION_SUFFIXES and path.is_file():
            name = path.relative_to(raw_images.root).as_posix()
            if Path(name).with_suffix("").as_posix() not in images:
                rows.append(rejected_row(name, "orphan_caption", "caption file without an image of the same name: "
                                                                 "rename it to match its image, or delete it"))
    return rows


def _warn_unread_reg_captions(folder: ImageFolder, extension: str) -> None:
    """Class images with a caption file of another kohya extension only: say so, instead of training them on
    their class token without a word."""
    unread = {name: other for name in folder.names if not folder.path(name).with_suffix(extension).is_file()
              for other in CAPTION_SUFFIXES if other != extension and folder.path(name).with_suffix(other).is_file()}
    if unread:
        name, other = next(iter(unread.items()))
        logger.warning("%d class image(s) in %s have a caption file that is not read (e.g. %s: %s, while "
                       "normalization.reg_caption_extension is %s): they train on their class token. Set "
                       "`normalization: {reg_caption_extension: '%s'}` for this subject (import-kohya sets it from "
                       "caption_extension).", len(unread), folder.root, name, other, extension, other)


def _reg_sidecar(path: Path, extension: str) -> str | None:
    try:
        return read_sidecar(path, extension)
    except ValueError as exc:
        logger.warning("Ignoring the caption of class image %s: %s", path, exc)
        return None


def render_images(
    raw_images: ImageFolder, quality_report: pd.DataFrame, params: NormalizationParams,
    reg_images: ImageFolder | None = None, train_metadata: pd.DataFrame | None = None,
) -> dict[str, ImageRender]:
    """Lazy RGB renders of the kept images at their bucket size, keyed by output name.

    ``quality_report`` is the image checks table (or the report: both have status, sizes and output names).
    The pipeline also passes ``train_metadata``, which orders this node after the report is saved (so it is
    on disk even when this node stops the run) and limits the renders to what the metadata lists.
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
    if train_metadata is not None:
        kept = kept[kept.output_name.isin(set(train_metadata.file_name))]
    roots = {"instance": raw_images.root, "reg": reg_images.root if reg_images else None}
    return {
        row.output_name: ImageRender(roots[getattr(row, "role", "instance") or "instance"], row.file_name,
                                     row.sha256, (int(row.bucket_width), int(row.bucket_height)), p.background)
        for row in kept.itertuples()
    }


def build_training_metadata(
    image_checks: pd.DataFrame, captions: pd.DataFrame, params: NormalizationParams
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, DatasetInfo, dict[str, dict[str, float]]]:
    """Normalize each kept image's prompt; return metadata.csv (twice: in the dataset folder and as a versioned
    snapshot), the quality report, dataset info and metrics.

    Prompts: trigger word first, then ``front_keywords``, then the remaining tags, lower-cased, stripped and
    de-duplicated. A caption that is empty, stale (image changed since captioning) or missing is flagged
    in the report; the image is still kept.
    """
    p = sized_params(params)
    # Plain dicts, not DataFrame.loc per row: .loc costs ~0.1 ms a call, which is most of a 10k-image re-run.
    caption_of = dict(zip(captions.file_name, zip(captions.text, captions.sha256)))
    caption_notes = dict(zip(captions.file_name, captions.note)) if "note" in captions.columns else {}
    report = image_checks.copy()
    for column, default in (("role", "instance"), ("folder", ""), ("repeats", 1), ("class_tokens", ""),
                            ("sidecar_caption", "")):
        if column not in report.columns:  # an image_checks.csv written before kohya folders were read
            report[column] = default
    texts, flags = [], []
    for row in report.itertuples():
        if row.role == "reg":  # class images skip captioning: their caption file, else the class token
            text = regularization_prompt(row.sidecar_caption, Concept(row.folder, int(row.repeats),
                                                                      row.class_tokens))
            text = normalize_prompt(text, "", p.prompt.lowercase, [])
            texts.append(text)
            flags.append("" if text else "empty caption: no caption file and no class token (name the folder "
                                         "N_class, e.g. 1_woman)")
            continue
        caption = caption_of.get(row.file_name)
        text = training_prompt(caption[0], p, row.class_tokens) if caption else ""
        texts.append(text)
        if row.status != "kept":
            flags.append("")  # a rejected image's reason says it all
            continue
        flags.append(caption_notes.get(row.file_name) or caption_flag(
            (text, caption[1]) if caption else None, row.sha256, row.class_tokens or p.prompt.trigger))
    report["text"] = texts
    report["caption_flag"] = flags
    kept = report[report.status == "kept"]
    metadata = pd.DataFrame({
        "file_name": kept.output_name, "text": kept.text,
        "width": kept.bucket_width.astype(int), "height": kept.bucket_height.astype(int),
        **sdxl_geometry(kept.width, kept.height, kept.bucket_width, kept.bucket_height),
        "repeats": kept.repeats.astype(int), "is_reg": (kept.role == "reg").astype(int),
        # the image's file in the content-addressed store: a past metadata version finds its exact images
        "store_file": [store_name(render_key(sha, (int(w), int(h)), p.background), p.output_format)
                       for sha, w, h in zip(kept.sha256, kept.bucket_width, kept.bucket_height)],
    })
    instance = kept[kept.role != "reg"]
    frequency = tag_frequency(instance.text)
    buckets = Counter(f"{w}x{h}" for w, h in zip(kept.bucket_width, kept.bucket_height))
    info = DatasetInfo(
        trigger=p.prompt.trigger, keep_tokens=p.prompt.keep_tokens, mode=p.mode, resolution=list(p.size),
        num_images=len(instance), num_reg_images=len(kept) - len(instance),
        num_rejected=int((report.status != "kept").sum()), buckets=dict(sorted(buckets.items())),
        tag_frequency=frequency, folders=[FolderInfo(**folder) for folder in folder_table(report)],
    )
    for folder in info.folders:
        logger.info("Folder %-24s %-8s repeats %-3d class tokens %-16r %d kept, %d rejected",
                    folder.folder or "(root)", folder.role, folder.repeats, folder.class_tokens, folder.kept,
                    folder.rejected)
    metrics = {
        "images_in": len(report), "images_kept": len(kept), "reg_images_kept": info.num_reg_images,
        "images_rejected": info.num_rejected,
        "captions_flagged": int((kept.caption_flag != "").sum()), "distinct_tags": len(frequency),
        "buckets": len(buckets),
    }
    for code, count in Counter(code for code in report.reason_code if code).items():
        metrics[f"rejected_{code}"] = count
    # Logged here rather than through kedro-mlflow's artifact dataset, which ParallelRunner cannot pickle.
    tracking.log_text(report.to_csv(index=False), f"{p.subject or 'dataset'}/quality_report.csv")
    tracking.log_dict(info.model_dump(mode="json"), f"{p.subject or 'dataset'}/dataset_info.json")
    return metadata, metadata, report, info, as_mlflow_metrics(metrics)
