"""Image checks and geometry: decode, EXIF orientation, RGB, minimum size, hashes, kohya aspect buckets."""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lora_pipeline.core.errors import DataError
from lora_pipeline.core.files import sha256_hex

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def list_images(folder: str | os.PathLike) -> list[str]:
    """Sorted image paths relative to ``folder`` (recursive). Raises DataError if none are found."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(
            f"Image folder '{root}' does not exist. Put your training images there "
            f"(or point the catalog entry 'raw_images' at your folder) and re-run."
        )
    names = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )
    if not names:
        raise DataError(
            f"Image folder '{root}' holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}). "
            f"Copy your training images into it and re-run."
        )
    return names


def read_sidecar(image_path: str | os.PathLike, extension: str = ".txt") -> str | None:
    """The kohya caption next to an image (``a.png`` -> ``a.txt``, or ``a.caption`` with that extension), or None.

    Raises ValueError for a file whose encoding cannot be read (see :func:`read_sidecar_detected`)."""
    found = read_sidecar_detected(image_path, extension)
    return None if found is None else found[0]


def read_sidecar_detected(image_path: str | os.PathLike, extension: str = ".txt") -> tuple[str, str] | None:
    """``(caption, encoding)`` of an image's sidecar, or None without one.

    UTF-8 (with or without BOM) is read as is. Captions saved on a Chinese or Japanese Windows are often GBK
    or Shift-JIS: their encoding is detected with charset-normalizer, and the caller flags the caption for a
    look, since a short text can be detected wrongly. Undetectable bytes raise ValueError naming the file.
    """
    sidecar = Path(image_path).with_suffix(extension)
    if not sidecar.is_file():
        return None
    raw = sidecar.read_bytes()
    try:
        return raw.decode("utf-8-sig").strip(), "utf-8"
    except UnicodeDecodeError as exc:
        found = detect_caption_encoding(raw)
        if found is not None:
            return found
        raise ValueError(f"{sidecar} is not UTF-8 ({exc.reason} at byte {exc.start}) and its encoding could not "
                         f"be detected; re-save it as UTF-8") from None


CAPTION_ENCODINGS = ["cp1252", "gb18030", "big5", "shift_jis", "euc_kr", "cp1251"]  # what caption files use


def detect_caption_encoding(raw: bytes) -> tuple[str, str] | None:
    """``(text, encoding)`` for a caption that is not UTF-8, or None.

    Western text first: when every non-ASCII character of the cp1252 reading is a Latin letter (``café``),
    that is the reading (charset-normalizer alone calls one accented letter Cyrillic); otherwise
    charset-normalizer picks among the encodings caption files are written in."""
    import unicodedata

    try:
        western = raw.decode("cp1252")
        if all(ord(ch) < 128 or "LATIN" in unicodedata.name(ch, "") for ch in western):
            return western.strip(), "cp1252"
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    best = from_bytes(raw, cp_isolation=CAPTION_ENCODINGS).best()
    return (str(best).strip(), best.encoding) if best is not None and best.encoding else None


def decode(data: bytes) -> Image.Image:
    """Fully decode image bytes and apply the EXIF orientation. Raises ValueError with a reason."""
    if not data:
        raise ValueError("empty file (0 bytes): the copy or download did not finish")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()  # verify() alone misses truncated pixel data
            return ImageOps.exif_transpose(opened)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        detail = str(exc).replace(" <_io.BytesIO object", "").split(" at 0x")[0]
        raise ValueError(f"corrupt or unreadable image ({exc.__class__.__name__}: {detail})") from None


def load_rgb(path: str | os.PathLike, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Decode a file, apply EXIF orientation and return RGB (transparency composited on ``background``)."""
    return to_rgb(decode(Path(path).read_bytes()), background)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: map the type's range to 8 bit (not the image's peak, which would brighten it).
        array = np.asarray(image, dtype=np.float32)
        full_scale = 65535.0 if image.mode.startswith("I;16") or array.max() <= 65535 else float(2**31 - 1)
        image = Image.fromarray(np.round(array / full_scale * 255).clip(0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def perceptual_hash(image: Image.Image) -> int:
    """64-bit pHash as an int, for near-duplicate search by Hamming distance."""
    return int(str(imagehash.phash(image)), 16)


def make_buckets(resolution: int | tuple[int, int], minimum: int, maximum: int, step: int) -> list[tuple[int, int]]:
    """kohya-style aspect buckets: (w, h) multiples of ``step`` with w*h <= the base resolution's area
    (``resolution`` is a square side or kohya's non-square ``(width, height)``)."""
    width0, height0 = resolution if isinstance(resolution, tuple) else (resolution, resolution)
    max_area = width0 * height0
    buckets = {(width0, height0), (height0, width0)}
    for width in range(minimum, maximum + 1, step):
        height = min(maximum, (max_area // width) // step * step)
        if height >= minimum:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def choose_bucket(size: tuple[int, int], buckets: list[tuple[int, int]], step: int) -> tuple[tuple[int, int], bool]:
    """The bucket whose aspect ratio is closest to ``size``; never larger than the image.

    Returns ``(bucket, reduced)``; ``reduced`` is True when the image was too small for its bucket and got
    a smaller one of the same aspect instead of being upscaled (kohya's ``bucket_no_upscale``).
    """
    width, height = size
    aspect = math.log(width / height)
    bucket = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))
    scale = max(bucket[0] / width, bucket[1] / height)
    if scale <= 1.0:
        return bucket, False
    shrink = min(width / bucket[0], height / bucket[1])
    reduced = (max(step, int(bucket[0] * shrink) // step * step), max(step, int(bucket[1] * shrink) // step * step))
    return reduced, True


def crop_geometry(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """Where :func:`fit_to`'s center crop starts in the resized image, as ``(top, left)``: SDXL conditions on it."""
    width, height = size
    scale = max(target[0] / width, target[1] / height)
    return (max(0, round(height * scale) - target[1]) // 2, max(0, round(width * scale) - target[0]) // 2)


def fit_to(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Resize to cover ``target`` (keeping aspect) with Lanczos, then center-crop to it exactly."""
    return ImageOps.fit(image, target, method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


@dataclass(frozen=True)
class ImageCheck:
    """What a first decode of one raw file found out."""

    file_name: str
    sha256: str
    ok: bool
    reason_code: str = ""  # corrupt | too_small (more are added by the dataset-level checks)
    reason: str = ""
    orig_width: int = 0
    orig_height: int = 0
    width: int = 0  # after EXIF orientation
    height: int = 0
    mode: str = ""
    phash: int | None = None


def check_image(root: str | os.PathLike, file_name: str, min_size: int, want_phash: bool) -> ImageCheck:
    """Decode one file and test it against the minimum size. Never raises for a bad image."""
    data = (Path(root) / file_name).read_bytes()
    digest = sha256_hex(data)
    try:
        image = decode(data)  # ValueError with the reason (empty file, corrupt, ...)
        with Image.open(io.BytesIO(data)) as probe:
            orig_width, orig_height = probe.size
    except ValueError as exc:
        code = "empty" if not data else "corrupt"
        return ImageCheck(file_name, digest, ok=False, reason_code=code, reason=str(exc))
    width, height = image.size
    base = dict(orig_width=orig_width, orig_height=orig_height, width=width, height=height, mode=image.mode)
    if min(width, height) < min_size:
        reason = f"too small: {width}x{height}, the short side must be at least min_size={min_size}"
        return ImageCheck(file_name, digest, ok=False, reason_code="too_small", reason=reason, **base)
    phash = perceptual_hash(to_rgb(image)) if want_phash else None
    return ImageCheck(file_name, digest, ok=True, phash=phash, **base)


def hamming_matches(hashes: np.ndarray, query: int, max_distance: int) -> np.ndarray:
    """Indices of ``hashes`` (uint64) within ``max_distance`` bits of ``query``."""
    if hashes.size == 0:
        return np.empty(0, dtype=np.int64)
    distance = np.bitwise_count(hashes ^ np.uint64(query))
    return np.flatnonzero(distance <= max_distance)
