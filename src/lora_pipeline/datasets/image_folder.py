"""A folder of images as one catalog entry.

kedro-datasets' PartitionedDataset + pillow.ImageDataset loads every partition eagerly through PIL and
writes files in place; training sets need a lazy handle (names only, pixels streamed by the nodes),
per-file atomic writes, parallel encoding, and removal of stale outputs. Hence this small dataset.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping

from kedro.io import AbstractDataset, DatasetError, Version
from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

from lora_pipeline.core.files import atomic_path, atomic_write_text
from lora_pipeline.datasets.files import VersionedPathDataset
from lora_pipeline.prep.images import IMAGE_EXTENSIONS, list_images

logger = logging.getLogger(__name__)

ImageSource = Image.Image | Callable[[], Image.Image]
MANIFEST = ".manifest.json"


@dataclass(frozen=True)
class ImageFolder:
    """A handle on an image folder: its root and sorted relative file names. No pixels are loaded."""

    root: Path
    names: list[str] = field(default_factory=list)
    bad_names: list[str] = field(default_factory=list)  # files whose names are not valid UTF-8 (shown escaped)

    def path(self, name: str) -> Path:
        return self.root / name


def write_images(folder: Path, items: list[tuple[str, ImageSource]], save_args: dict[str, Any], workers: int) -> None:
    """Write each ``(relative name, image or callable)`` atomically, in threads; PNGs keep WebUI's ``parameters``."""

    def write(item: tuple[str, ImageSource]) -> None:
        name, source = item
        image = source() if callable(source) else source
        target = folder / name
        with atomic_path(target) as tmp:
            fmt = Image.registered_extensions().get(target.suffix.lower())
            extra = dict(save_args)
            if fmt == "PNG" and "parameters" in image.info:  # WebUI's "PNG Info" convention
                info = PngImagePlugin.PngInfo()
                info.add_text("parameters", image.info["parameters"])
                extra["pnginfo"] = info
            image.save(tmp, format=fmt, **extra)

    with ThreadPoolExecutor(workers) as pool:
        for _ in tqdm(pool.map(write, items), total=len(items), desc="writing images", unit="img"):
            pass


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class ImageFolderDataset(AbstractDataset[Mapping[str, ImageSource], ImageFolder]):
    """Load: an :class:`ImageFolder` handle. Save: ``{relative_name: PIL image or callable returning one}``.

    Saving writes each file atomically (temp file + rename), in ``workers`` threads (PIL releases the GIL
    while encoding), and deletes image files of an earlier run that are not in the new mapping.
    Callables let a node hand over lazy work so the whole set is never held in memory. A callable with a
    ``cache_key`` attribute is skipped when the file exists and ``.manifest.json`` records the same key, so
    a re-run after adding images only renders the new ones.
    """

    def __init__(
        self,
        path: str,
        save_args: dict[str, Any] | None = None,
        workers: int = 0,
        metadata: dict[str, Any] | None = None,
        required: bool = True,
        store: str | None = None,
    ):
        self._path = Path(path)
        # A content-addressed copy of every image ever written (hard links, so no extra space), named by its
        # render key: what a past training-set version is reloaded from. Never pruned.
        self._store = Path(store) if store else None
        self._required = required  # false: a missing or empty folder loads as no images (optional reg images)
        self._save_args = save_args or {}
        self._workers = workers or os.cpu_count() or 1
        self.metadata = metadata

    def load(self) -> ImageFolder:
        if not self._required and not (self._path.is_dir() and any(self._path.iterdir())):
            return ImageFolder(self._path, [])
        names = list_images(self._path)
        # A name that is not UTF-8 (caf\xe9.png from an old archive) cannot go into CSV, JSON or MLflow; it is
        # kept out of the stages and reported by normalization instead.
        good = [n for n in names if _utf8(n)]
        bad = [n.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for n in names if not _utf8(n)]
        return ImageFolder(self._path, good, bad)

    def save(self, data: Mapping[str, ImageSource]) -> None:
        self._path.mkdir(parents=True, exist_ok=True)
        for name in data:
            relative = PurePosixPath(name)
            if relative.is_absolute() or ".." in relative.parts:
                raise DatasetError(f"Refusing to write '{name}' outside {self._path}")

        manifest_path = self._path / MANIFEST
        try:
            previous = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            previous = {}
        manifest: dict[str, str] = {}
        todo = []
        for name, source in data.items():
            key = getattr(source, "cache_key", None)
            if key is not None:
                manifest[name] = key
                if previous.get(name) == key and (self._path / name).is_file():
                    continue  # unchanged since the last run: no decode, no encode
            todo.append((name, source))

        write_images(self._path, todo, self._save_args, self._workers)
        written = len(todo)
        if self._store is not None:
            self._fill_store(data)
        atomic_write_text(manifest_path, json.dumps(manifest, sort_keys=True))
        logger.info("Images in %s: %d written, %d unchanged", self._path, written, len(data) - written)
        wanted = set(data)
        for stale in self._path.rglob("*"):
            name = stale.relative_to(self._path).as_posix()
            if stale.is_file() and stale.suffix.lower() in IMAGE_EXTENSIONS and name not in wanted:
                stale.unlink()
                logger.info("Removed stale output image %s", stale)

    def _fill_store(self, data: Mapping[str, ImageSource]) -> None:
        from lora_pipeline.prep.selection import store_name

        self._store.mkdir(parents=True, exist_ok=True)
        for name, source in data.items():
            key = getattr(source, "cache_key", None)
            if key is None:
                continue
            target = self._store / store_name(key, Path(name).suffix.lstrip("."))
            if target.exists():
                continue
            try:
                os.link(self._path / name, target)
            except OSError:  # another filesystem, or no hard links: a copy
                import shutil

                shutil.copy2(self._path / name, target)

    def _exists(self) -> bool:
        return self._path.is_dir()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "workers": self._workers, "store": str(self._store or "")}


class VersionedImageFolderDataset(VersionedPathDataset):
    """Generated images: every run writes a new ``<path>/<version>/`` folder, so no earlier image is deleted.

    Load returns the newest (or the pinned) version as an :class:`ImageFolder`.
    """

    def __init__(self, filepath: str, version: Version | None = None, save_args: dict[str, Any] | None = None,
                 metadata: dict[str, Any] | None = None):
        super().__init__(filepath, version, metadata)
        self._save_args = save_args or {}

    def load(self) -> ImageFolder:
        folder = Path(self._get_load_path())
        return ImageFolder(folder, list_images(folder))

    def save(self, data: Mapping[str, ImageSource]) -> None:
        folder = Path(self._get_save_path())
        for name in data:
            relative = PurePosixPath(name)
            if relative.is_absolute() or ".." in relative.parts:
                raise DatasetError(f"Refusing to write '{name}' outside {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        write_images(folder, list(data.items()), self._save_args, os.cpu_count() or 1)
        logger.info("Wrote %d images to %s", len(data), folder)
