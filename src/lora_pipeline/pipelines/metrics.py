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
        import signal
        import threading

        self._previous_handler = None
        if threading.current_thread() is threading.main_thread():
            # SIGTERM (a scheduler stopping the job, `kill`) becomes SystemExit, so this block and the runs
            # around it unwind: the buffered step metrics are written and MLflow records the run as failed.
            def terminate(signum, frame):
                raise SystemExit(128 + signum)

            self._previous_handler = signal.signal(signal.SIGTERM, terminate)
        return self

    def __exit__(self, *exc_info) -> None:
        import signal

        self.flush()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)


PROCESS_TAGS = ("lora_pipeline.host", "lora_pipeline.pid")


def process_tags() -> dict[str, str]:
    """Which process owns a run: how the next start tells a killed run from one still going."""
    import os
    import socket

    return {"lora_pipeline.host": socket.gethostname(), "lora_pipeline.pid": str(os.getpid())}


def close_abandoned_runs(experiment_ids: list[str]) -> list[str]:
    """Mark as KILLED the RUNNING runs that a process on this machine started and that process is gone
    (kill -9, a power cut): without this they show as running in MLflow forever. Runs of live processes and
    of other machines are left alone. Returns the run ids closed."""
    import os
    import socket

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    host = socket.gethostname()
    closed = []
    for run in client.search_runs(experiment_ids, filter_string="attributes.status = 'RUNNING'", max_results=500):
        tags = run.data.tags
        if tags.get("lora_pipeline.host") != host or not tags.get("lora_pipeline.pid", "").isdigit():
            continue
        try:
            os.kill(int(tags["lora_pipeline.pid"]), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # another user's live process
        client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    return closed
