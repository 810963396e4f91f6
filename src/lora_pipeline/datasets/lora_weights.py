"""LoRA weights as catalog entries (versioned, so every retrain keeps its own file)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io import AbstractVersionedDataset, Version

from lora_pipeline.lora.export import load_lora_file, save_diffusers_lora, save_lora_file


class LoraWeightsDataset(AbstractVersionedDataset[dict, dict]):
    """A ``.safetensors`` file <-> ``{"state": {name: tensor}, "metadata": {key: value}}``.

    kedro-datasets has no safetensors dataset with header metadata; writes are atomic.
    """

    def __init__(self, filepath: str, version: Version | None = None, log_to_mlflow: bool = False,
                 metadata: dict[str, Any] | None = None):
        super().__init__(filepath=PurePosixPath(filepath), version=version)
        self._log_to_mlflow = log_to_mlflow
        self.metadata = metadata

    def load(self) -> dict:
        state, header = load_lora_file(self._get_load_path())
        return {"state": state, "metadata": header}

    def save(self, data: dict) -> None:
        path = self._get_save_path()
        save_lora_file(path, data["state"], data.get("metadata", {}))
        if self._log_to_mlflow:
            import mlflow

            if mlflow.active_run():
                mlflow.log_artifact(str(path), artifact_path="lora")

    def _exists(self) -> bool:
        try:
            return Path(self._get_load_path()).exists()
        except Exception:  # noqa: BLE001 - no version saved yet
            return False

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "version": self._version}


class DiffusersLoraDataset(AbstractVersionedDataset[dict, Path]):
    """A diffusers LoRA folder (``pytorch_lora_weights.safetensors`` + adapter metadata).

    Save takes ``{"state": training-layout weights, "summary": training summary}``; load returns the folder
    path, which is what ``pipe.load_lora_weights`` wants.
    """

    def __init__(self, filepath: str, version: Version | None = None, metadata: dict[str, Any] | None = None):
        super().__init__(filepath=PurePosixPath(filepath), version=version)
        self.metadata = metadata

    def load(self) -> Path:
        return Path(self._get_load_path())

    def save(self, data: dict) -> None:
        save_diffusers_lora(self._get_save_path(), data["state"], data["summary"])

    def _exists(self) -> bool:
        try:
            return Path(self._get_load_path()).exists()
        except Exception:  # noqa: BLE001
            return False

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "version": self._version}
