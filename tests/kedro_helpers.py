"""Run project pipelines in-process, as `kedro run` would."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
from kedro.framework.session import KedroSession

from lora_pipeline.demo import (
    build_demo_holdout,
    build_demo_stripes,
    write_demo_llm_data,
    write_demo_prompts,
    write_demo_review,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


# The demo subjects the whole-project tests run (each `kedro run` trains every one of them): the two SD1.x ones,
# SDXL and Flux.1. The newer families' demo subjects are checked through Kedro by
# tests/integration/test_family_subjects.py, and by their library tests.
TEST_SUBJECTS = ("demo_lora", "demo_stripes", "demo_sdxl_lora", "demo_flux")


def build_project(root: Path, tiny_models, images_template, subjects: tuple[str, ...] | None = TEST_SUBJECTS) -> Path:
    """A copy of the project at ``root``: its conf (no conf/local) with the demo ``subjects`` (None: all), the tiny
    models and the demo data."""
    import yaml

    root.mkdir(parents=True)
    shutil.copy(REPO_ROOT / "pyproject.toml", root)
    shutil.copytree(REPO_ROOT / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    if subjects is not None:
        listed = root / "conf" / "demo" / "subjects.yml"
        config = yaml.safe_load(listed.read_text(encoding="utf-8"))
        config["subjects"] = {name: config["subjects"][name] for name in subjects}
        listed.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    (root / "conf" / "local").mkdir()
    (root / "src").mkdir()  # Kedro checks it exists; the package itself is installed
    for name, path in tiny_models.items():
        shutil.copytree(path, root / "data" / "06_models" / name)
    shutil.copytree(images_template, root / "data" / "01_raw" / "demo_lora" / "images")
    write_demo_review(root / "data" / "01_raw" / "demo_lora" / "reviewed_captions.csv")
    build_demo_stripes(root / "data" / "01_raw" / "demo_stripes" / "images")
    write_demo_prompts(root / "data" / "01_raw" / "prompts.yml")
    build_demo_holdout(root / "data" / "01_raw" / "holdout")
    write_demo_llm_data(root / "data" / "01_raw" / "llm" / "conversations.jsonl")
    return root


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
