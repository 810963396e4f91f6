"""A new user's messy folder: odd names and encodings, empty files, orphan captions, near-duplicates, 16-bit
scans, full disks, and the file modes of what the pipeline writes."""

from __future__ import annotations

import errno
import os
import stat

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lora_pipeline.core.cache import DiskCache
from lora_pipeline.core.config import CaptioningParams, NormalizationParams
from lora_pipeline.core.files import atomic_path, atomic_write_text
from lora_pipeline.datasets.image_folder import ImageFolderDataset
from lora_pipeline.pipelines.captioning import nodes as captioning
from lora_pipeline.pipelines.normalization import nodes as normalization
from lora_pipeline.prep.images import load_rgb

PARAMS = NormalizationParams(min_size=32, resolution=64, bucket_step=32, bucket_min=64, bucket_max=128,
                             near_duplicates=True, prompt={"trigger": "sks"})


def _photo(path, seed=0, size=(96, 96), fmt=None, quality=None):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)  # smooth: a JPEG copy stays a near-duplicate
    image = Image.fromarray(base).resize(size, Image.Resampling.BICUBIC)
    image.save(path, format=fmt, **({"quality": quality} if quality else {}))


def _normalize(folder, params=PARAMS, captions=None):
    raw = ImageFolderDataset(str(folder)).load()
    checks = normalization.inspect_images(raw, params, None)
    if captions is None:
        kept = checks[checks.status != "rejected"]
        captions = pd.DataFrame({"file_name": kept.file_name, "sha256": kept.sha256,
                                 "text": ["sks, photo"] * len(kept)})
    return raw, checks, normalization.build_training_metadata(checks, captions, params)


def test_messy_folder_every_file_gets_a_row_and_a_reason(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    _photo(folder / "original.png", seed=1)
    _photo(folder / "a_copy.jpg", seed=1, fmt="JPEG", quality=85)  # sorts first, but is the lossy copy
    (folder / "empty.png").write_bytes(b"")
    (folder / "forgotten.txt").write_text("sks, an image that was deleted", encoding="utf-8")
    _photo(os.path.join(os.fsencode(folder), b"caf\xe9.png").decode("utf-8", "surrogateescape"), seed=2)
    raw, checks, (metadata, _, report, info, _) = _normalize(folder)
    reasons = dict(zip(report.file_name, report.reason))
    codes = dict(zip(report.file_name, report.reason_code))
    assert codes["a_copy.jpg"] == "near_duplicate" and "original.png" in reasons["a_copy.jpg"]  # the PNG is kept
    assert "original.png" in set(metadata.file_name)
    assert reasons["empty.png"].startswith("corrupt or unreadable image") is False
    assert "empty file (0 bytes)" in reasons["empty.png"] and "BytesIO" not in reasons["empty.png"]
    assert codes["forgotten.txt"] == "orphan_caption"
    assert codes["caf\\xe9.png"] == "bad_file_name" and "rename" in reasons["caf\\xe9.png"]
    assert raw.bad_names == ["caf\\xe9.png"]
    # rejected rows never carry a caption flag; the report is written whole
    assert set(report[report.status == "rejected"].caption_flag) == {""}
    report.to_csv(tmp_path / "report.csv", index=False)  # writable: no surrogate left in any cell


def test_a_gbk_sidecar_is_read_and_flagged_not_replaced(tmp_path, tiny_models):
    folder = tmp_path / "raw"
    folder.mkdir()
    _photo(folder / "a.png", seed=3)
    (folder / "a.txt").write_bytes("红色头发，微笑，户外，长发".encode("gbk"))
    raw = ImageFolderDataset(str(folder)).load()
    params = CaptioningParams(backend="sidecar", trigger="sks")
    cache = DiskCache(tmp_path / "cache")
    manifest = captioning.scan_images(raw, cache, params)
    captions, _ = captioning.caption_images(manifest, pd.DataFrame(columns=["file_name", "text"]), cache, raw, params)
    assert captions.text[0] == "sks, 红色头发，微笑，户外，长发" and captions.source[0] == "sidecar"
    assert "not UTF-8" in captions.note[0]
    _, checks, (_, _, report, _, _) = _normalize(folder, captions=captions)
    assert "not UTF-8" in report.caption_flag[0]


def test_16_bit_greyscale_keeps_its_brightness(tmp_path):
    array = np.full((64, 64), 33668, dtype=np.uint16)  # 131.5 of 255 on the 16-bit scale
    array[:8, :8] = 40000
    Image.fromarray(array).save(tmp_path / "scan.png")
    assert Image.open(tmp_path / "scan.png").mode.startswith("I")
    mean = np.asarray(load_rgb(tmp_path / "scan.png"), dtype=np.float32).mean()
    expected = array.astype(np.float32).mean() / 65535 * 255
    assert abs(mean - expected) < 0.6


def test_outputs_get_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "out.json", "{}")
        assert stat.S_IMODE((tmp_path / "out.json").stat().st_mode) == 0o644
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.json", "{}")
        assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_a_full_disk_names_the_folder_and_leaves_no_temp_file(tmp_path):
    with pytest.raises(OSError, match=f"no space left on {tmp_path}") as info:
        with atomic_path(tmp_path / "lora.safetensors") as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError, match="no space left"):
        with atomic_path(tmp_path / "lora.safetensors"):
            raise RuntimeError("unexpected pos 76032 vs 75984")  # how safetensors reports a short write
    assert list(tmp_path.iterdir()) == []
