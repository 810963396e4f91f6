"""Typed JSON catalog entries: a training summary, or any pydantic model (``dataset_info``), in and out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kedro.io import Version
from kedro.utils import load_obj
from pydantic import BaseModel, ValidationError

from lora_pipeline.core.errors import DataError
from lora_pipeline.core.files import atomic_write_text
from lora_pipeline.core.spec import TrainingSummary, training_summary_from_json
from lora_pipeline.datasets.files import VersionedPathDataset


class TrainingSummaryDataset(VersionedPathDataset):
    """JSON on disk (versioned, atomic), :class:`ImageTrainingSummary` or :class:`LLMTrainingSummary` in memory
    (the spec's family says which; files written before the two were split load too).

    kedro-datasets' JSONDataset would hand nodes a plain dict; every later stage reads rank, alpha and targets
    from this typed object instead.
    """

    def load(self) -> TrainingSummary:
        path = Path(self._get_load_path())
        try:
            return training_summary_from_json(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise DataError(f"{path} is not a training summary this version understands ({exc}). Re-run the "
                            f"training pipeline to write a new one.") from None

    def save(self, data: TrainingSummary) -> None:
        atomic_write_text(self._get_save_path(), json.dumps(data.to_json(), indent=2, ensure_ascii=False))


class ModelJSONDataset(VersionedPathDataset):
    """A pydantic model (``model:``, its import path) as indented, human-readable JSON (atomic writes).

    Load validates the file against the model, so a node gets the typed object or the error names the file.
    """

    def __init__(self, filepath: str, model: str, version: Version | None = None,
                 metadata: dict[str, Any] | None = None):
        super().__init__(filepath, version, metadata)
        self._model_path = model
        self._model: type[BaseModel] = load_obj(model)

    def load(self) -> BaseModel:
        path = Path(self._get_load_path())
        try:
            return self._model.model_validate_json(path.read_text(encoding="utf-8"))
        except ValidationError as exc:
            raise DataError(f"{path} is not a valid {self._model.__name__} ({exc.error_count()} problem(s): "
                            f"{exc.errors()[0]['msg']} at {'.'.join(map(str, exc.errors()[0]['loc']))}). "
                            f"Re-run the stage that writes it.") from None

    def save(self, data: BaseModel) -> None:
        if not isinstance(data, self._model):
            raise DataError(f"{self._filepath} holds a {self._model.__name__}, not a {type(data).__name__}")
        atomic_write_text(self._get_save_path(), json.dumps(data.model_dump(mode="json"), indent=2,
                                                            ensure_ascii=False))

    def _describe(self) -> dict[str, Any]:
        return {**super()._describe(), "model": self._model_path}
