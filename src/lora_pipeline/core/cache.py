"""A content-addressed disk cache (one small file per key): captions, VAE latents and text embeddings, and the
remembered per-file values of :class:`FileMemo` (content hashes, image checks).

Keys are hashes of the input content plus the settings that produced the value, so a changed image or
changed settings simply miss the cache; nothing stale can be returned. Writes are atomic.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from lora_pipeline.core.files import atomic_path, atomic_write_text, json_sha256


def settings_key(settings: dict[str, Any]) -> str:
    """A short stable hash of a settings dict (model id, captioner options ...)."""
    return json_sha256(settings, 16)


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


class FileMemo:
    """Values computed from files (content hash, image check), remembered by (path, size, mtime) as git does.

    All entries of one ``namespace`` live in a single JSON index, so a re-run over 10k unchanged images reads
    one file instead of 10k small ones. Any write to a file changes its mtime, so a changed file is recomputed.
    The stat is taken before computing: a file that changes while being read is recomputed next time.
    Call :meth:`save` once at the end (atomic write); thread-safe for concurrent ``compute`` calls.
    """

    def __init__(self, cache: "DiskCache | None", namespace: str):
        self.cache, self.key = cache, f"memo-{namespace}"
        loaded = cache.get_json(self.key) if cache is not None else None
        self.entries: dict[str, list] = loaded if isinstance(loaded, dict) else {}
        self.changed = False

    def _lookup(self, path: str | os.PathLike) -> tuple[tuple[str, int, int], Any | None]:
        """The file's identity (absolute path, size, mtime) and its remembered value, or None."""
        stat = os.stat(path)
        identity = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)  # abspath: resolve() costs 10x more
        entry = self.entries.get(identity[0])
        return identity, (entry[2] if entry and entry[:2] == list(identity[1:]) else None)

    def get(self, path: str | os.PathLike) -> Any | None:
        return self._lookup(path)[1]

    def compute(self, path: str | os.PathLike, fn: "Callable[[Path], Any]") -> Any:
        (where, size, mtime), value = self._lookup(path)
        if value is None:
            value = fn(Path(path))
            self.entries[where] = [size, mtime, value]
            self.changed = True
        return value

    def map(self, fn: "Callable[[Path], Any]", paths: "list[Path]", workers: int | None, desc: str) -> list[Any]:
        """``[fn(path) for path in paths]``: remembered values directly, the rest in ``workers`` threads
        (PIL and hashlib release the GIL) behind a progress bar; then the index is saved."""
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        values = [self.get(path) for path in paths]
        todo = [i for i, value in enumerate(values) if value is None]
        if todo:
            with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
                computed = pool.map(lambda i: self.compute(paths[i], fn), todo)
                for i, value in zip(todo, tqdm(computed, total=len(todo), desc=desc, unit="img")):
                    values[i] = value
        self.save()
        return values

    def save(self) -> None:
        if self.cache is not None and self.changed:
            self.cache.put_json(self.key, self.entries)
            self.changed = False
