"""Small path-level datasets: a raw input file handed to a node as a path, and a save_pretrained folder."""

from __future__ import annotations

import contextlib
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from kedro.io import AbstractDataset, AbstractVersionedDataset, DatasetError, Version

from lora_pipeline.core.errors import DataError, LoraPipelineError
from lora_pipeline.core.files import NoSpaceError, atomic_folder
from lora_pipeline.core.spec import PretrainedFolder


class DiskFullError(LoraPipelineError, DatasetError):
    """A full disk while saving an output: our error (``kedro run`` prints its one message, see
    :mod:`lora_pipeline.cli`) and a DatasetError, which Kedro's save wrapper expects."""


@contextlib.contextmanager
def disk_full_is_one_message() -> Iterator[None]:
    """Around a dataset's save: a full disk becomes :class:`DiskFullError` (what, where, what to do)."""
    try:
        yield
    except NoSpaceError as exc:
        raise DiskFullError(exc.strerror) from None


class RawFileDataset(AbstractDataset[None, Path]):
    """Load: the path of a user-provided file (checked to exist). Never written by the pipeline."""

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None):
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> Path:
        if not self._filepath.is_file():
            raise DataError(f"Input file {self._filepath} not found. Put your data there (see the README) or point "
                            f"the catalog entry at your file.")
        return self._filepath

    def save(self, data: None) -> None:
        raise DatasetError(f"{self._filepath} is raw input; the pipeline never writes it.")

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}


class VersionedPathDataset(AbstractVersionedDataset[Any, Any]):
    """Shared plumbing of the project's versioned file/folder datasets."""

    def __init__(self, filepath: str, version: Version | None = None, metadata: dict[str, Any] | None = None):
        super().__init__(filepath=PurePosixPath(filepath), version=version)
        self.metadata = metadata

    def _exists(self) -> bool:
        try:
            return Path(self._get_load_path()).exists()
        except DatasetError:  # no version saved yet
            return False

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "version": self._version}


class PretrainedFolderDataset(VersionedPathDataset):
    """Save: a :class:`PretrainedFolder` (parts with ``save_pretrained`` and our README.md), atomically; also a
    bare model or ``(model, tokenizer)``. Load returns the folder, which ``from_pretrained`` takes.
    """

    def __init__(self, filepath: str, version: Version | None = None, metadata: dict[str, Any] | None = None,
                 log_to_mlflow: str | None = None):
        super().__init__(filepath, version, metadata)
        self._log_to_mlflow = log_to_mlflow  # an artifact folder name: the saved folder is logged there

    def load(self) -> Path:
        return Path(self._get_load_path())

    def save(self, data: Any) -> None:
        target = Path(self._get_save_path())
        with disk_full_is_one_message(), atomic_folder(target) as tmp:
            folder = data if isinstance(data, PretrainedFolder) else \
                PretrainedFolder(data if isinstance(data, tuple) else (data,))
            for part in folder.parts:
                part.save_pretrained(tmp)
            if folder.model_card is not None:
                (Path(tmp) / "README.md").write_text(folder.model_card, encoding="utf-8")
        if self._log_to_mlflow:
            import mlflow

            from lora_pipeline.core.files import sha256_file

            if mlflow.active_run():
                mlflow.log_artifacts(str(target), artifact_path=self._log_to_mlflow)
                weights = target / "adapter_model.safetensors"
                if weights.is_file():  # what `lora-pipeline lineage <adapter folder>` looks up
                    mlflow.set_tag(f"{self._log_to_mlflow}.sha256", sha256_file(weights))
