import io

import numpy as np
import pytest
from PIL import Image

from lora_pipeline.core.errors import DataError
from lora_pipeline.prep import images as im


def _png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def test_list_images_missing_and_empty_folder_name_the_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        im.list_images(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=str(tmp_path)):
        im.list_images(tmp_path)


def test_list_images_is_sorted_recursive_and_skips_sidecars(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.JPG", "sub/c.webp", "a.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"")
    assert im.list_images(tmp_path) == ["a.JPG", "b.png", "sub/c.webp"]


def test_decode_rejects_corrupt_and_truncated_files():
    with pytest.raises(ValueError, match="corrupt"):
        im.decode(b"definitely not an image")
    whole = _png_bytes(Image.new("RGB", (64, 64), (10, 20, 30)))
    with pytest.raises(ValueError, match="corrupt"):
        im.decode(whole[: len(whole) // 2])


def test_exif_orientation_is_applied():
    stored = Image.new("RGB", (60, 40), (255, 0, 0))
    stored.paste((0, 0, 255), (0, 0, 10, 40))  # blue stripe on the stored image's left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90° clockwise
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif, quality=95)
    shown = im.decode(buffer.getvalue())
    assert shown.size == (40, 60)
    top_row = np.asarray(shown.convert("RGB"))[2, 20]
    assert top_row[2] > 200 and top_row[0] < 80  # the left stripe is now on top


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "I;16"])
def test_to_rgb_converts_every_mode(mode):
    source = Image.new("RGB", (8, 8), (120, 120, 120)).convert(mode) if mode != "I;16" else Image.new(
        "I;16", (8, 8), 30000)
    out = im.to_rgb(source)
    assert out.mode == "RGB" and out.size == (8, 8)
    if mode == "I;16":
        assert out.getpixel((0, 0)) == (117, 117, 117)  # 30000 of 65535: the type's range, not clipped or brightened


def test_to_rgb_composites_alpha_on_background():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    out = im.to_rgb(rgba, background=(0, 255, 0))
    assert out.getpixel((0, 0)) == (255, 0, 0)
    assert out.getpixel((3, 3)) == (0, 255, 0)


def test_palette_transparency_is_composited():
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 1), 1)
    decoded = im.decode(_png_bytes(palette, transparency=0))
    out = im.to_rgb(decoded, background=(255, 255, 255))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (0, 0, 255)


def test_buckets_are_multiples_of_step_and_within_area():
    buckets = im.make_buckets(512, 256, 1024, 64)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0
        assert 256 <= width <= 1024 and 256 <= height <= 1024
        assert width * height <= 512 * 512


def test_choose_bucket_matches_aspect_and_never_upscales():
    buckets = im.make_buckets(512, 256, 1024, 64)
    bucket, reduced = im.choose_bucket((1536, 1024), buckets, 64)
    # 3:2 lies between the 576x448 (1.29) and 640x384 (1.67) buckets; 640x384 is closer in log ratio.
    assert not reduced and bucket == (640, 384)
    small, reduced = im.choose_bucket((300, 200), buckets, 64)
    assert reduced and small[0] <= 300 and small[1] <= 200 and small[0] % 64 == 0


def test_fit_to_gives_exact_size():
    out = im.fit_to(Image.new("RGB", (700, 500)), (512, 384))
    assert out.size == (512, 384)


def test_check_image_reports_size_and_reasons(tmp_path):
    Image.new("RGB", (100, 80)).save(tmp_path / "small.png")
    Image.new("RGB", (600, 520)).save(tmp_path / "ok.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    small = im.check_image(tmp_path, "small.png", min_size=512, want_phash=False)
    assert not small.ok and small.reason_code == "too_small" and "100x80" in small.reason
    ok = im.check_image(tmp_path, "ok.png", min_size=512, want_phash=True)
    assert ok.ok and (ok.width, ok.height) == (600, 520) and ok.phash is not None
    bad = im.check_image(tmp_path, "bad.jpg", min_size=512, want_phash=False)
    assert not bad.ok and bad.reason_code == "corrupt"


def test_hamming_matches():
    hashes = np.array([0b1111, 0b0000, 0xFFFF_0000_0000_0000], dtype=np.uint64)
    assert im.hamming_matches(hashes, 0b0001, 1).tolist() == [1]
    assert im.hamming_matches(hashes, 0b0111, 1).tolist() == [0]
    assert im.hamming_matches(np.array([], dtype=np.uint64), 1, 3).size == 0
