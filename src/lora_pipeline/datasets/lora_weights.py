"""LoRA weights as catalog entries (versioned, so every retrain keeps its own file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import Version

from lora_pipeline.core.spec import DiffusersLora, LoraFile
from lora_pipeline.datasets.files import TrackedArtifact, VersionedPathDataset, disk_full_is_one_message
from lora_pipeline.diffusion.lora_files import load_lora_file, save_diffusers_lora, save_lora_file


class LoraWeightsDataset(VersionedPathDataset):
    """A ``.safetensors`` file <-> :class:`LoraFile` (tensors and header metadata).

    kedro-datasets has no safetensors dataset with header metadata; writes are atomic. ``log_to_mlflow: true``
    keeps each saved file in the run, under ``lora/``.
    """

    def __init__(self, filepath: str, version: Version | None = None, log_to_mlflow: bool = False,
                 metadata: dict[str, Any] | None = None):
        super().__init__(filepath, version, metadata)
        self._log_to_mlflow = log_to_mlflow

    def load(self) -> LoraFile:
        state, header = load_lora_file(self._get_load_path())
        return LoraFile(state, header)

    def save(self, data: LoraFile) -> None:
        path = Path(self._get_save_path())
        with disk_full_is_one_message():
            save_lora_file(path, data.state, data.metadata)
        if self._log_to_mlflow:
            self.tracked = TrackedArtifact(path, "lora")


class DiffusersLoraDataset(VersionedPathDataset):
    """A diffusers LoRA folder (``pytorch_lora_weights.safetensors`` + adapter metadata).

    Save takes a :class:`DiffusersLora` (training-layout weights and the training summary); load returns the
    folder path, which is what ``pipe.load_lora_weights`` wants.
    """

    def load(self) -> Path:
        return Path(self._get_load_path())

    def save(self, data: DiffusersLora) -> None:
        with disk_full_is_one_message():
            save_diffusers_lora(self._get_save_path(), data.weights.state, data.summary)
