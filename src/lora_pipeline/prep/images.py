"""Image checks and geometry: decode, EXIF orientation, RGB, minimum size, hashes, kohya aspect buckets."""

from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lora_pipeline.errors import DataError

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

    Raises ValueError for a file that is not UTF-8 (with a BOM it is fine), rather than guessing.
    """
    sidecar = Path(image_path).with_suffix(extension)
    if not sidecar.is_file():
        return None
    try:
        return sidecar.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{sidecar} is not UTF-8 ({exc.reason} at byte {exc.start}); re-save it as UTF-8") from None


def decode(data: bytes) -> Image.Image:
    """Fully decode image bytes and apply the EXIF orientation. Raises ValueError with a reason."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()  # verify() alone misses truncated pixel data
            return ImageOps.exif_transpose(opened)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"corrupt or unreadable image ({exc.__class__.__name__}: {exc})") from None


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
        # 16-bit greyscale: scale to 8 bit instead of clipping everything above 255 to white.
        array = np.asarray(image, dtype=np.float32)
        peak = float(array.max()) or 1.0
        image = Image.fromarray((array / peak * 255).astype(np.uint8), "L")
    return image.convert("RGB")


def perceptual_hash(image: Image.Image) -> int:
    """64-bit pHash as an int, for near-duplicate search by Hamming distance."""
    return int(str(imagehash.phash(image)), 16)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_buckets(resolution: int, minimum: int, maximum: int, step: int) -> list[tuple[int, int]]:
    """kohya-style aspect buckets: (w, h) multiples of ``step`` with w*h <= resolution**2."""
    max_area = resolution * resolution
    buckets = {(resolution, resolution)}
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
    digest = sha256_bytes(data)
    try:
        with Image.open(io.BytesIO(data)) as probe:
            orig_width, orig_height = probe.size
        image = decode(data)
    except (ValueError, UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        reason = str(exc) if str(exc).startswith("corrupt") else (
            f"corrupt or unreadable image ({exc.__class__.__name__}: {exc})")
        return ImageCheck(file_name, digest, ok=False, reason_code="corrupt", reason=reason)
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
