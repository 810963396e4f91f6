"""Shape plain numbers for kedro-mlflow's MlflowMetricsHistoryDataset."""

from __future__ import annotations

from typing import Mapping


def as_mlflow_metrics(values: Mapping[str, float], step: int = 0) -> dict[str, dict[str, float]]:
    return {name: {"value": float(value), "step": step} for name, value in values.items()}
