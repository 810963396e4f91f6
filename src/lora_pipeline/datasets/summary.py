"""The training summary as a catalog entry: a typed :class:`TrainingSummary` in, the same object out."""

from __future__ import annotations

import json
from pathlib import Path

from lora_pipeline.core.errors import DataError
from lora_pipeline.core.files import atomic_write_text
from lora_pipeline.core.spec import TrainingSummary
from lora_pipeline.datasets.files import VersionedPathDataset


class TrainingSummaryDataset(VersionedPathDataset):
    """JSON on disk (versioned, atomic), :class:`TrainingSummary` in memory.

    kedro-datasets' JSONDataset would hand nodes a plain dict; every later stage reads rank, alpha and targets
    from this typed object instead.
    """

    def load(self) -> TrainingSummary:
        path = Path(self._get_load_path())
        try:
            return TrainingSummary.model_validate_json(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise DataError(f"{path} is not a training summary this version understands ({exc}). Re-run the "
                            f"training pipeline to write a new one.") from None

    def save(self, data: TrainingSummary) -> None:
        atomic_write_text(self._get_save_path(), json.dumps(data.to_json(), indent=2, ensure_ascii=False))
