"""Shape plain numbers for kedro-mlflow's MlflowMetricsHistoryDataset."""

from __future__ import annotations

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
    """The trainers' ``on_metrics`` callback: logs ``<prefix>.<name>`` to the active MLflow run.

    Asynchronous (mlflow's background logging), so a database round-trip never stalls a training step;
    use it as a context manager so every queued metric is written when training ends.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        import mlflow

        if mlflow.active_run():
            mlflow.log_metrics({f"{self.prefix}.{k}": v for k, v in metrics.items()}, step=step, synchronous=False)

    def __enter__(self) -> "StepMetricsLogger":
        return self

    def __exit__(self, *exc_info) -> None:
        import mlflow

        mlflow.flush_async_logging()
