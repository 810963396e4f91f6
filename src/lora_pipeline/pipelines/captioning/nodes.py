"""Captioning nodes: thin adapters over ``lora_pipeline.prep.captions``."""

from __future__ import annotations

import logging

import pandas as pd

from lora_pipeline.core.cache import DiskCache, FileMemo
from lora_pipeline.core.config import CaptioningParams
from lora_pipeline.core.files import sha256_file
from lora_pipeline.datasets.image_folder import ImageFolder
from lora_pipeline.pipelines.tracking import as_mlflow_metrics
from lora_pipeline.prep.captions import (
    auto_caption_key,
    caption_in_batches,
    has_human_caption,
    load_captioner,
    metadata_captions,
    pick_caption,
)
from lora_pipeline.prep.images import load_rgb, read_sidecar_detected

logger = logging.getLogger(__name__)

CAPTION_COLUMNS = ["file_name", "sha256", "text", "source", "reviewed", "auto_caption", "note"]


def scan_images(raw_images: ImageFolder, caption_cache: DiskCache | None = None,
                p: CaptioningParams | None = None) -> pd.DataFrame:
    """One row per raw image: ``file_name``, content ``sha256``, ``has_sidecar`` and the kohya ``sidecar`` text
    (``captioning.caption_extension``, ``.txt`` by default; without such a file, the image's row of
    ``captioning.metadata_csv``, which ranks the same).

    Hashes are remembered by (path, size, mtime), so a re-run hashes only new or changed files."""
    p = p or CaptioningParams(backend="sidecar")
    listed = metadata_captions(p.metadata_csv, raw_images.root) if p.metadata_csv else {}
    unknown = sorted(set(listed) - set(raw_images.names))
    if unknown:
        logger.warning("%s names %d image(s) not in %s, e.g. %s", p.metadata_csv, len(unknown), raw_images.root,
                       unknown[0])
    paths = [raw_images.path(name) for name in raw_images.names]
    hashes = FileMemo(caption_cache, "sha256").map(sha256_file, paths, None, "hashing")
    rows = []
    for name, path, sha in zip(raw_images.names, paths, hashes):
        note = ""
        try:
            found = read_sidecar_detected(path, p.caption_extension)
        except ValueError as exc:
            logger.warning("Ignoring the sidecar caption of %s: %s", name, exc)
            found, note = None, f"sidecar unreadable ({exc}); an auto caption was used"
        if found is None and not note and name in listed:  # its metadata.csv row; a caption file beside it wins
            found = (listed[name], "utf-8")
        if found is not None and found[1] != "utf-8":
            note = f"sidecar read as {found[1]} (not UTF-8): check the caption, then re-save the file as UTF-8"
            logger.warning("%s: %s", name, note)
        rows.append((name, sha, found is not None, found[0] if found else "", note))
    return pd.DataFrame(rows, columns=["file_name", "sha256", "has_sidecar", "sidecar", "sidecar_note"])


def caption_images(
    manifest: pd.DataFrame,
    reviewed: pd.DataFrame,
    caption_cache: DiskCache,
    raw_images: ImageFolder,
    p: CaptioningParams,
) -> tuple[pd.DataFrame, dict[str, dict[str, float]]]:
    """Caption every image; human text always wins and only uncached images reach the captioner.

    Precedence: ``reviewed_captions.csv`` row (verbatim) > kohya ``.txt`` sidecar > auto caption.
    Auto captions are cached by image hash + captioner settings, so a re-run captions only new or
    changed images, and a settings change (other model, other tags) re-captions all.
    """
    # The model is loaded only for images no person captioned (the pre-run check already found it, if needed).
    reviewed_text = dict(zip(reviewed.file_name, reviewed.text))
    unknown = sorted(set(reviewed_text) - set(manifest.file_name))
    if unknown:
        logger.warning("reviewed_captions.csv names %d image(s) not in the raw folder, e.g. %s", len(unknown),
                       unknown[0])
    auto: dict[str, str] = {}
    unreadable: set[str] = set()
    to_caption: list[str] = []
    for row in manifest.itertuples():
        if has_human_caption(row.file_name in reviewed_text, row.has_sidecar, p) or p.backend == "sidecar":
            continue
        cached = caption_cache.get_json(auto_caption_key(row.sha256, p))
        if cached is None:
            to_caption.append(row.file_name)
        elif cached["caption"] is None:
            unreadable.add(row.file_name)  # same bytes failed to decode before; normalization reports it
        else:
            auto[row.file_name] = cached["caption"]
    n_cached = len(auto)
    if to_caption:
        fresh, failed = caption_in_batches(
            load_captioner(p), to_caption, lambda n: load_rgb(raw_images.path(n)), p.batch_size
        )
        hashes = dict(zip(manifest.file_name, manifest.sha256))
        for name, caption in fresh.items():
            caption_cache.put_json(auto_caption_key(hashes[name], p), {"caption": caption, "file_name": name})
        for name, error in failed.items():
            caption_cache.put_json(auto_caption_key(hashes[name], p), {"caption": None, "error": error})
        auto.update(fresh)
        unreadable.update(failed)

    rows = []
    for row in manifest.itertuples():
        text, source = pick_caption(reviewed_text.get(row.file_name), row.sidecar if row.has_sidecar else None,
                                    auto.get(row.file_name), p)
        note = getattr(row, "sidecar_note", "") if source in ("sidecar", "auto") else ""
        rows.append((row.file_name, row.sha256, text, source, source in ("reviewed", "sidecar"),
                     auto.get(row.file_name, ""), note))
    table = pd.DataFrame(rows, columns=CAPTION_COLUMNS)
    counts = table.source.value_counts().to_dict()
    n_new = counts.get("auto", 0) - n_cached
    logger.info(
        "Captions for %d images: %d reviewed, %d sidecar, %d auto (%d cached, %d new), %d without caption "
        "(%d unreadable)",
        len(table), counts.get("reviewed", 0), counts.get("sidecar", 0), counts.get("auto", 0),
        n_cached, n_new, counts.get("none", 0), len(unreadable),
    )
    metrics = {
        "images": len(table), "reviewed": counts.get("reviewed", 0), "sidecar": counts.get("sidecar", 0),
        "auto": counts.get("auto", 0), "auto_cached": n_cached, "auto_new": n_new,
        "uncaptioned": counts.get("none", 0), "unreadable": len(unreadable),
    }
    return table, as_mlflow_metrics(metrics)


def captions_to_metadata(captions: pd.DataFrame) -> pd.DataFrame:
    """``metadata.csv`` (diffusers imagefolder convention) for the raw folder: ``file_name,text``."""
    return captions[["file_name", "text"]].copy()
