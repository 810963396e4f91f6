"""Shape plain numbers for kedro-mlflow's MlflowMetricsHistoryDataset."""

from __future__ import annotations

import time
from typing import Mapping


def as_mlflow_metrics(values: Mapping[str, float], step: int = 0) -> dict[str, dict[str, float]]:
    return {name: {"value": float(value), "step": step} for name, value in values.items()}


def git_commit(path: str | None = None) -> str | None:
    """The project's current git commit, or None outside a git checkout."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def log_lineage_tags(**extra: str) -> None:
    """Tag the active MLflow run with the project's git commit (and any extra lineage tags)."""
    import mlflow

    if mlflow.active_run():
        mlflow.set_tags({k: v for k, v in {"git_commit": git_commit(), **extra}.items() if v})


class StepMetricsLogger:
    """The trainers' ``on_metrics`` callback: ``<prefix>.<name>`` for every step, into the active MLflow run.

    Metrics are buffered and written in one ``log_batch`` every ``flush_seconds`` (as TensorBoard's writer
    does), and at exit. A write to the sqlite store takes ~10 ms, which per step was 5-7% of a small model's
    step in the profile (benchmarks/README.md); batched, the full per-step curve costs one write per interval.
    Use it as a context manager so the last metrics are written when training ends or stops.
    """

    def __init__(self, prefix: str, flush_seconds: float = 10.0):
        self.prefix, self.flush_seconds = prefix, flush_seconds
        self._buffer: list = []
        self._run_id: str | None = None
        self._last_flush = time.monotonic()

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        import mlflow
        from mlflow.entities import Metric

        run = mlflow.active_run()
        if run is None:
            return
        if self._run_id not in (None, run.info.run_id):
            self.flush()
        self._run_id = run.info.run_id
        stamp = int(time.time() * 1000)
        self._buffer.extend(Metric(f"{self.prefix}.{k}", float(v), stamp, step) for k, v in metrics.items())
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        from mlflow.tracking import MlflowClient

        if self._buffer and self._run_id:
            client = MlflowClient()
            for start in range(0, len(self._buffer), 1000):  # the tracking API's per-request limit
                client.log_batch(self._run_id, metrics=self._buffer[start:start + 1000])
        self._buffer = []
        self._last_flush = time.monotonic()

    def __enter__(self) -> "StepMetricsLogger":
        return self

    def __exit__(self, *exc_info) -> None:
        self.flush()
