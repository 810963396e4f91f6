"""A disk cache folder as a catalog entry, so it shows up in the lineage graph (kedro viz)."""

from __future__ import annotations

from typing import Any

from kedro.io import AbstractDataset, DatasetError

from lora_pipeline.core.cache import DiskCache


class CacheDataset(AbstractDataset[None, DiskCache]):
    """Load: a :class:`DiskCache` over ``path``. Nodes read and add entries through it."""

    def __init__(self, path: str, metadata: dict[str, Any] | None = None):
        self._path = path
        self.metadata = metadata

    def load(self) -> DiskCache:
        return DiskCache(self._path)

    def save(self, data: None) -> None:
        raise DatasetError("A cache is filled through the DiskCache handle, not saved as a whole.")

    def _describe(self) -> dict[str, Any]:
        return {"path": self._path}
