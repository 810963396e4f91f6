"""Small path-level datasets: a raw input file handed to a node as a path, a save_pretrained folder, a
single-file checkpoint; and :class:`TrackedArtifact`, how a dataset says what belongs in MLflow."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping

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


@dataclass(frozen=True)
class TrackedArtifact:
    """What a save wrote that belongs in the run's record: a file or folder, the artifact folder it goes to, and
    tags. Datasets only set it (``dataset.tracked``); the project's tracking hook logs it into the active run, so
    no dataset talks to MLflow."""

    path: Path
    artifact_path: str
    tags: dict[str, str] = field(default_factory=dict)


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
    """Shared plumbing of the project's versioned file/folder datasets (``versioned: false`` in the catalog: one
    file or folder, replaced by each save)."""

    def __init__(self, filepath: str, version: Version | None = None, metadata: dict[str, Any] | None = None):
        super().__init__(filepath=PurePosixPath(filepath), version=version)
        self.metadata = metadata
        self.tracked: TrackedArtifact | None = None  # set by a save whose output MLflow should keep

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

    ``log_to_mlflow: <artifact folder>`` keeps the saved folder in the run (and the adapter weights' sha256 as
    the tag ``<artifact folder>.sha256``, what ``lora-pipeline lineage <adapter folder>`` looks up).
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
            from lora_pipeline.core.files import sha256_file

            weights = target / "adapter_model.safetensors"
            tags = {f"{self._log_to_mlflow}.sha256": sha256_file(weights)} if weights.is_file() else {}
            self.tracked = TrackedArtifact(target, self._log_to_mlflow, tags)


class CheckpointDataset(VersionedPathDataset):
    """A single-file model checkpoint: save a state dict as one ``.safetensors`` file (atomic); load returns its
    path, which the single-file loaders (and WebUI) take."""

    def load(self) -> Path:
        return Path(self._get_load_path())

    def save(self, data: Mapping[str, Any]) -> None:
        from safetensors.torch import save_file

        from lora_pipeline.core.files import atomic_path

        # clone: tensors that share storage (tied weights) cannot be written as they are
        with disk_full_is_one_message(), atomic_path(self._get_save_path()) as tmp:
            save_file({key: value.contiguous().clone() for key, value in data.items()}, str(tmp))
