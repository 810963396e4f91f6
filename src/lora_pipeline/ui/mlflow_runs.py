"""What the MLflow store says about a running job: its stage run (found by the subject, stage and the PID the
project tags every run with) and the sample images the trainer logged into it as they are written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

EXPERIMENT = "lora_pipeline"  # conf/base/mlflow.yml


@dataclass(frozen=True)
class StageRun:
    run_id: str
    experiment_id: str
    status: str
    samples: list[Path]  # samples/<subject>/step_*.png, oldest first


def stage_run(tracking_uri: str, subject: str, stage: str, pid: int) -> StageRun | None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return None
    found = client.search_runs([experiment.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                               filter_string=f"tags.subject = '{subject}' and tags.stage = '{stage}' and "
                                             f"tags.`lora_pipeline.pid` = '{pid}'")
    if not found:
        return None
    run = found[0]
    artifacts = Path(unquote(urlparse(run.info.artifact_uri).path))
    samples = sorted((artifacts / "samples" / subject).glob("*.png")) if artifacts.is_dir() else []
    return StageRun(run.info.run_id, experiment.experiment_id, run.info.status, samples)


def run_link(experiment_id: str, run_id: str, mlflow_ui: str = "http://127.0.0.1:5000") -> str:
    """The run's page in ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` (its default address)."""
    return f"{mlflow_ui}/#/experiments/{experiment_id}/runs/{run_id}"
