import pandas as pd
import pytest
from PIL import Image

from lora_pipeline.core.cache import DiskCache
from lora_pipeline.core.config import NormalizationParams
from lora_pipeline.core.errors import DataError
from lora_pipeline.core.files import sha256_file
from lora_pipeline.datasets.image_folder import ImageFolderDataset
from lora_pipeline.pipelines.normalization import nodes

PARAMS = NormalizationParams(min_size=512, resolution=128, bucket_min=64, bucket_max=256, bucket_step=32)


def _captions(checks: pd.DataFrame, text: str = "sks, circle") -> pd.DataFrame:
    return pd.DataFrame({"file_name": checks.file_name, "sha256": checks.sha256, "text": text})


def test_inspect_images_rejects_each_bad_file_with_a_reason(demo_images):
    checks = nodes.inspect_images(ImageFolderDataset(str(demo_images)).load(), PARAMS).set_index("file_name")
    assert checks.loc["corrupt.jpg"].reason_code == "corrupt"
    assert checks.loc["too_small.png"].reason_code == "too_small"
    assert "320x320" in checks.loc["too_small.png"].reason
    assert checks.loc["red_circle_0_copy.jpg"].reason_code == "duplicate"
    assert "red_circle_0.jpg" in checks.loc["red_circle_0_copy.jpg"].reason
    assert checks.loc["red_circle_0.jpg"].status == "kept"
    rotated = checks.loc["exif_rotated.jpg"]
    assert (rotated.orig_width, rotated.orig_height, rotated.width, rotated.height) == (704, 512, 512, 704)
    assert rotated.bucket_height > rotated.bucket_width
    kept = checks[checks.status == "kept"]
    assert (kept.bucket_width * kept.bucket_height <= 128 * 128).all()
    assert (checks.status == "rejected").sum() == 3


def test_near_duplicates_are_optional(demo_images):
    image = Image.open(demo_images / "blue_square_0.png").convert("RGB")
    image.resize((image.width + 4, image.height + 4)).save(demo_images / "blue_square_0_resized.png")
    raw = ImageFolderDataset(str(demo_images)).load()
    assert nodes.inspect_images(raw, PARAMS).set_index("file_name").loc["blue_square_0_resized.png"].status == "kept"
    near = nodes.inspect_images(raw, PARAMS.model_copy(update={"near_duplicates": True})).set_index("file_name")
    # the better copy stays: both lossless, the larger one wins, and the smaller one's reason names it
    assert near.loc["blue_square_0_resized.png"].status == "kept"
    assert near.loc["blue_square_0.png"].reason_code == "near_duplicate"
    assert "blue_square_0_resized.png" in near.loc["blue_square_0.png"].reason


def test_crop_mode_never_upscales(tmp_path):
    Image.new("RGB", (600, 600)).save(tmp_path / "a.png")
    Image.new("RGB", (1000, 800)).save(tmp_path / "b.png")
    raw = ImageFolderDataset(str(tmp_path)).load()
    checks = nodes.inspect_images(raw, NormalizationParams(mode="crop", resolution=768, bucket_max=1024, min_size=512))
    by_name = checks.set_index("file_name")
    assert by_name.loc["a.png"].reason_code == "needs_upscale"
    assert (by_name.loc["b.png"].bucket_width, by_name.loc["b.png"].bucket_height) == (768, 768)


def test_render_images_gives_rgb_at_bucket_size_and_leaves_raw_untouched(demo_images, tmp_path):
    before = {p.name: sha256_file(p) for p in demo_images.iterdir()}
    raw = ImageFolderDataset(str(demo_images)).load()
    checks = nodes.inspect_images(raw, PARAMS)
    renders = nodes.render_images(raw, checks, PARAMS)
    out = ImageFolderDataset(str(tmp_path / "out"))
    out.save(renders)
    kept = checks[checks.status == "kept"]
    assert sorted(renders) == sorted(kept.output_name)
    for row in kept.itertuples():
        with Image.open(tmp_path / "out" / row.output_name) as image:
            assert image.mode == "RGB" and image.size == (row.bucket_width, row.bucket_height)
    with Image.open(tmp_path / "out" / "transparent_rgba.png") as image:
        assert image.getpixel((0, 0)) == (255, 255, 255)  # transparent corner composited on white
    assert {p.name: sha256_file(p) for p in demo_images.iterdir()} == before


def test_all_rejected_is_an_error_that_points_at_the_report(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "tiny.png")
    raw = ImageFolderDataset(str(tmp_path)).load()
    checks = nodes.inspect_images(raw, PARAMS)
    with pytest.raises(DataError, match="All 1 images .* rejected .*too_small.*quality_report.csv"):
        nodes.render_images(raw, checks, PARAMS)


def test_build_training_metadata_normalizes_prompts_and_flags_captions(demo_images):
    raw = ImageFolderDataset(str(demo_images)).load()
    checks = nodes.inspect_images(raw, PARAMS)
    captions = _captions(checks, "Circle, SIMPLE background,  circle, sks")
    captions.loc[captions.file_name == "blue_circle_1.png", "text"] = "sks"
    captions.loc[captions.file_name == "blue_square_0.png", "sha256"] = "changed"
    captions = captions[captions.file_name != "palette.png"]
    prompt = {"trigger": "sks", "front_keywords": ["simple background"], "keep_tokens": 2}
    params = NormalizationParams(**{**PARAMS.model_dump(), "prompt": prompt})
    metadata, snapshot, report, info, metrics = nodes.build_training_metadata(checks, captions, params)
    assert snapshot is metadata
    kept = checks[checks.status == "kept"]
    assert list(metadata.columns) == ["file_name", "text", "width", "height", "original_width", "original_height",
                                      "crop_top", "crop_left", "repeats", "is_reg", "store_file"]
    assert sorted(metadata.file_name) == sorted(kept.output_name)
    by_out = metadata.set_index("file_name")
    # SDXL size conditioning: the pre-resize size, and the center crop's offset in the resized image
    for row in metadata.itertuples():
        scale = max(row.width / row.original_width, row.height / row.original_height)
        assert row.crop_left == (round(row.original_width * scale) - row.width) // 2
        assert row.crop_top == (round(row.original_height * scale) - row.height) // 2
    assert (metadata.crop_left > 0).any() or (metadata.crop_top > 0).any()
    assert by_out.loc["red_circle_1.png"].text == "sks, simple background, circle"
    flags = report.set_index("file_name").caption_flag
    assert flags["blue_circle_1.png"].startswith("empty caption")
    assert flags["blue_square_0.png"].startswith("stale caption")
    assert flags["palette.png"].startswith("no caption")
    assert flags["red_circle_1.png"] == ""
    assert len(report) == len(checks)
    assert info.keep_tokens == 2 and info.num_images == len(kept)
    assert info.tag_frequency["sks"] == len(kept) - 1  # palette.png has no caption at all
    assert metrics["images_rejected"]["value"] == 3 and metrics["rejected_duplicate"]["value"] == 1


def test_a_rerun_decodes_only_new_images(demo_images, tmp_path, monkeypatch):
    cache = DiskCache(tmp_path / "checks")
    first = nodes.inspect_images(ImageFolderDataset(str(demo_images)).load(), PARAMS, cache)
    Image.new("RGB", (600, 600), "red").save(demo_images / "zz_new.png")
    decoded = []
    real_check = nodes.check_image
    monkeypatch.setattr(nodes, "check_image", lambda root, name, **kw: decoded.append(name) or real_check(
        root, name, **kw))
    again = nodes.inspect_images(ImageFolderDataset(str(demo_images)).load(), PARAMS, cache)
    assert decoded == ["zz_new.png"]
    pd.testing.assert_frame_equal(again[again.file_name != "zz_new.png"].reset_index(drop=True), first)
    assert again.set_index("file_name").loc["zz_new.png"].status == "kept"
