"""LoRA weights as catalog entries (versioned, so every retrain keeps its own file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import Version

from lora_pipeline.datasets.files import VersionedPathDataset, disk_full_is_one_message
from lora_pipeline.diffusion.lora_files import load_lora_file, save_diffusers_lora, save_lora_file


class LoraWeightsDataset(VersionedPathDataset):
    """A ``.safetensors`` file <-> ``{"state": {name: tensor}, "metadata": {key: value}}``.

    kedro-datasets has no safetensors dataset with header metadata; writes are atomic.
    """

    def __init__(self, filepath: str, version: Version | None = None, log_to_mlflow: bool = False,
                 metadata: dict[str, Any] | None = None):
        super().__init__(filepath, version, metadata)
        self._log_to_mlflow = log_to_mlflow

    def load(self) -> dict:
        state, header = load_lora_file(self._get_load_path())
        return {"state": state, "metadata": header}

    def save(self, data: dict) -> None:
        path = self._get_save_path()
        with disk_full_is_one_message():
            save_lora_file(path, data["state"], data.get("metadata", {}))
        if self._log_to_mlflow:
            import mlflow

            if mlflow.active_run():
                mlflow.log_artifact(str(path), artifact_path="lora")


class DiffusersLoraDataset(VersionedPathDataset):
    """A diffusers LoRA folder (``pytorch_lora_weights.safetensors`` + adapter metadata).

    Save takes ``{"state": training-layout weights, "summary": training summary}``; load returns the folder
    path, which is what ``pipe.load_lora_weights`` wants.
    """

    def load(self) -> Path:
        return Path(self._get_load_path())

    def save(self, data: dict) -> None:
        with disk_full_is_one_message():
            save_diffusers_lora(self._get_save_path(), data["state"], data["summary"])
