"""Run project pipelines in-process, as `kedro run` would."""

from __future__ import annotations

from pathlib import Path

import mlflow
from kedro.framework.session import KedroSession


def run(root: Path, *pipelines: str, **kwargs) -> None:
    try:
        with KedroSession.create(project_path=root, env="demo", **kwargs) as session:
            session.run(pipeline_names=list(pipelines))
    finally:
        # kedro-mlflow marks the run FINISHED in the store but leaves it on this thread's mlflow run stack;
        # a second session in the same process would then log into it. Each `kedro run` CLI call is its own
        # process, so only in-process test runs need this.
        while mlflow.active_run():
            mlflow.end_run()
