"""Run project pipelines in-process, as `kedro run` would."""

from __future__ import annotations

from pathlib import Path

import mlflow
from kedro.framework.session import KedroSession


def run(root: Path, *pipelines: str, namespaces: list[str] | None = None, **kwargs) -> None:
    try:
        with KedroSession.create(project_path=root, env="demo", **kwargs) as session:
            session.run(pipeline_names=list(pipelines), namespaces=namespaces)
    finally:
        # kedro-mlflow marks the run FINISHED in the store but leaves it on this thread's mlflow run stack;
        # a second session in the same process would then log into it. Each `kedro run` CLI call is its own
        # process, so only in-process test runs need this.
        while mlflow.active_run():
            mlflow.end_run()


def kedro_runs(root: Path) -> list:
    """The MLflow runs of `kedro run`s (newest first), without their per-subject stage runs."""
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["lora_pipeline"], output_format="list", order_by=["start_time DESC"])
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


def stage_run(root: Path, parent, subject: str, stage: str):
    """The run of one subject's stage inside the `kedro run` whose MLflow run is ``parent``."""
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    [found] = mlflow.search_runs(
        experiment_names=["lora_pipeline"], output_format="list",
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.subject = '{subject}' "
                      f"and tags.stage = '{stage}'")
    return found
