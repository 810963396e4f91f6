"""A content-addressed disk cache (one small file per key), shared by captions and, later, latents.

Keys are hashes of the input content plus the settings that produced the value, so a changed image or
changed settings simply miss the cache; nothing stale can be returned. Writes are atomic.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lora_pipeline.lora.files import atomic_path, atomic_write_text, sha256_text


def settings_key(settings: dict[str, Any]) -> str:
    """A short stable hash of a settings dict (model id, captioner options ...)."""
    return sha256_text(json.dumps(settings, sort_keys=True, default=str))[:16]


class DiskCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _path(self, key: str, suffix: str) -> Path:
        return self.root / key[:2] / f"{key}{suffix}"

    def has(self, key: str, suffix: str = ".json") -> bool:
        return self._path(key, suffix).exists()

    def get_json(self, key: str) -> Any | None:
        path = self._path(key, ".json")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            path.unlink(missing_ok=True)  # a damaged entry is a miss, never an error
            return None

    def put_json(self, key: str, value: Any) -> None:
        atomic_write_text(self._path(key, ".json"), json.dumps(value, ensure_ascii=False))

    def get_tensors(self, key: str) -> dict[str, Any] | None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self._path(key, ".safetensors")
        if not path.exists():
            return None
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError):
            path.unlink(missing_ok=True)
            return None

    def put_tensors(self, key: str, tensors: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        with atomic_path(self._path(key, ".safetensors")) as tmp:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))

    def __repr__(self) -> str:
        return f"DiskCache({str(self.root)!r})"


def file_sha256(path: str | os.PathLike, cache: "DiskCache | None") -> str:
    """sha256 of a file, remembered by (path, size, mtime) as git does, so unchanged files are not re-read."""
    from lora_pipeline.lora.files import sha256_file

    if cache is None:
        return sha256_file(path)
    stat = Path(path).stat()
    key = "sha-" + settings_key({"path": str(Path(path).resolve()), "size": stat.st_size, "mtime": stat.st_mtime_ns})
    hit = cache.get_json(key)
    if hit is None:
        hit = sha256_file(path)
        cache.put_json(key, hit)
    return hit
