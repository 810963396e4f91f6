"""A content-addressed disk cache (one small file per key), shared by captions and, later, latents.

Keys are hashes of the input content plus the settings that produced the value, so a changed image or
changed settings simply miss the cache; nothing stale can be returned. Writes are atomic.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lora_pipeline.lora.files import atomic_write_text, sha256_text


def settings_key(settings: dict[str, Any]) -> str:
    """A short stable hash of a settings dict (model id, captioner options ...)."""
    return sha256_text(json.dumps(settings, sort_keys=True, default=str))[:16]


class DiskCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _path(self, key: str, suffix: str) -> Path:
        return self.root / key[:2] / f"{key}{suffix}"

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

    def __repr__(self) -> str:
        return f"DiskCache({str(self.root)!r})"
