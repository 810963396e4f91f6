"""Every MLflow write of the project: nodes, datasets' artifacts (through the hooks) and the hooks' runs.

Each function is a no-op without an active run, so a node called outside ``kedro run`` (a test, a notebook,
``lora-pipeline train-launch`` without a tracking store) needs no guard; node modules never import mlflow.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import mlflow


def as_mlflow_metrics(values: Mapping[str, float], step: int = 0) -> dict[str, dict[str, float]]:
    """Plain numbers shaped for kedro-mlflow's MlflowMetricsHistoryDataset."""
    return {name: {"value": float(value), "step": step} for name, value in values.items()}


def active_run_id() -> str | None:
    run = mlflow.active_run()
    return run.info.run_id if run is not None else None


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    if mlflow.active_run():
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_params(params: Mapping[str, Any]) -> None:
    if mlflow.active_run():
        mlflow.log_params(dict(params))


def _flatten(values: Mapping[str, Any], prefix: str):
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def log_parameter_groups(inputs: Mapping[str, Any]) -> None:
    """A node's ``params:<group>`` models as MLflow params, one per key: ``<group>.<key>[.<sub key>]``, the values
    the YAML (and --params, and subjects.yml) set, as kedro-mlflow logs dict parameters.

    kedro-mlflow flattens only dicts, and Kedro hands the nodes their groups as models (see
    :class:`~lora_pipeline.project.hooks.ValidateParametersHook`): it logs each as one string, under the group's
    name. This logs the keys people filter and compare runs on."""
    from pydantic import BaseModel

    if mlflow.active_run() is None:
        return
    params = {}
    for name, value in inputs.items():
        if name.startswith("params:") and isinstance(value, BaseModel):
            params.update(_flatten(value.model_dump(mode="json", exclude_unset=True), f"{name[7:]}."))
    if params:
        mlflow.log_params({key: str(value)[:6000] for key, value in params.items()})  # MLflow's length limit


def set_tags(tags: Mapping[str, Any]) -> None:
    """Tag the active run; empty values (None, "") are left out."""
    if mlflow.active_run():
        mlflow.set_tags({k: v for k, v in tags.items() if v is not None and v != ""})


def log_text(text: str, artifact_file: str) -> None:
    if mlflow.active_run():
        mlflow.log_text(text, artifact_file)


def log_dict(data: Mapping[str, Any], artifact_file: str) -> None:
    if mlflow.active_run():
        mlflow.log_dict(dict(data), artifact_file)


def log_image(image: Any, artifact_file: str) -> None:
    if mlflow.active_run():
        mlflow.log_image(image, artifact_file)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    if mlflow.active_run():
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_artifacts(folder: str | Path, artifact_path: str | None = None) -> None:
    if mlflow.active_run():
        mlflow.log_artifacts(str(folder), artifact_path=artifact_path)


def git_commit(path: str | None = None) -> str | None:
    """The project's current git commit, or None outside a git checkout."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def log_lineage_tags(**extra: str | None) -> None:
    """Tag the active MLflow run with the project's git commit (and any extra lineage tags)."""
    if mlflow.active_run():
        set_tags({"git_commit": git_commit(), **extra})


class StepMetricsLogger:
    """The trainers' ``on_metrics`` callback: ``<prefix>.<name>`` for every step, into the active MLflow run.

    Each step goes through MLflow's asynchronous logging (``synchronous=False``): the call only queues the
    metrics, MLflow's worker thread writes what has queued up in one batch. A synchronous write to the sqlite
    store takes ~10 ms, which per step was 5-7% of a small model's step in the profile (benchmarks/README.md).
    MLflow drains its queue when a run ends (``end_run`` -> ``set_terminated``) and at exit; leaving this
    context waits for the queue too, so the curve is complete when training returns. Use it as a context
    manager: it also turns SIGTERM into SystemExit, so a stopped job ends its runs (FAILED), which drains the
    queue: the step metrics up to the signal are all written.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._logged = False

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        if mlflow.active_run() is None:
            return
        mlflow.log_metrics({f"{self.prefix}.{k}": float(v) for k, v in metrics.items()}, step=step,
                           timestamp=int(time.time() * 1000), synchronous=False)
        self._logged = True

    def flush(self) -> None:
        """Wait until every queued step metric is written."""
        if self._logged:
            mlflow.flush_async_logging()
            self._logged = False

    def __enter__(self) -> "StepMetricsLogger":
        import signal
        import threading

        self._previous_handler = None
        if threading.current_thread() is threading.main_thread():
            # SIGTERM (a scheduler stopping the job, `kill`) becomes SystemExit, so this block and the runs
            # around it unwind: the queued step metrics are written and MLflow records the run as failed.
            def terminate(signum, frame):
                raise SystemExit(128 + signum)

            self._previous_handler = signal.signal(signal.SIGTERM, terminate)
        return self

    def __exit__(self, *exc_info) -> None:
        import signal

        self.flush()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)


# ----------------------------------------------------------------------------- runs (used by the hooks)

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


def tag_kedro_run(runner: str) -> list[str] | None:
    """Once per ``kedro run``, on kedro-mlflow's top-level run: the runner's name and this process; closes runs
    that killed processes left RUNNING (returned). None when there is no top-level run to tag (yet)."""
    parent = mlflow.active_run()
    if parent is None or "mlflow.parentRunId" in parent.data.tags:
        return None
    # kedro-mlflow tags the run with the runner object's repr; a name is what people filter on
    mlflow.set_tags({"runner": runner, **process_tags()})
    return close_abandoned_runs([parent.info.experiment_id])


def start_stage_run(subject: str, stage: str) -> bool:
    """Open (or, from another ParallelRunner worker, re-open) the nested run ``<subject>.<stage>`` under the
    active run, found by its tags. False when no run is active (nothing opened)."""
    parent = mlflow.active_run()
    if parent is None:
        return False
    found = mlflow.tracking.MlflowClient().search_runs(
        [parent.info.experiment_id], max_results=1,
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.subject = '{subject}' "
                      f"and tags.stage = '{stage}'")
    if found:
        mlflow.start_run(run_id=found[0].info.run_id, nested=True)
    else:
        mlflow.start_run(run_name=f"{subject}.{stage}", nested=True,
                         tags={"subject": subject, "stage": stage, **process_tags()})
    return True


def end_run(status: str = "FINISHED") -> None:
    """End the active run (a stage run, or kedro-mlflow's when a run stops before its first node)."""
    if mlflow.active_run() is not None:
        mlflow.end_run(status=status)
