"""pipelines/tracking.py: the one module that writes to MLflow."""

import mlflow
from mlflow.tracking import MlflowClient
from PIL import Image

from lora_pipeline.pipelines import tracking
from lora_pipeline.pipelines.tracking import StepMetricsLogger


def _fresh_store(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("metrics-test")  # not an experiment id left over from another test's store


def _history(run_id, key):
    return [(m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key)]


def test_step_metrics_are_queued_asynchronously_then_all_written(tmp_path, monkeypatch):
    _fresh_store(tmp_path)
    calls = []
    log_metrics = mlflow.log_metrics
    monkeypatch.setattr(mlflow, "log_metrics", lambda *a, **k: calls.append(k.get("synchronous")) or
                        log_metrics(*a, **k))
    with mlflow.start_run() as run:
        with StepMetricsLogger("train") as log:
            for step in range(1, 201):
                log({"loss": 1.0 / step, "lr": 1e-4}, step)
        # leaving the block waits for MLflow's queue: the whole curve is there, every step once
        assert sorted(_history(run.info.run_id, "train.loss")) == [(s, 1.0 / s) for s in range(1, 201)]
        assert len(_history(run.info.run_id, "train.lr")) == 200
    assert calls == [False] * 200  # MLflow's asynchronous logging, not one synchronous write per step


def test_step_metrics_of_a_run_that_ends_are_written_by_its_end(tmp_path):
    _fresh_store(tmp_path)
    log = StepMetricsLogger("llm")
    with mlflow.start_run() as run:
        for step in range(50):
            log({"loss": float(step)}, step)
    # no flush of ours: ending the run drains MLflow's queue
    assert len(_history(run.info.run_id, "llm.loss")) == 50


def test_without_an_active_run_every_helper_is_a_no_op(tmp_path):
    _fresh_store(tmp_path)
    assert mlflow.active_run() is None and tracking.active_run_id() is None
    StepMetricsLogger("train")({"loss": 1.0}, 1)
    tracking.log_metrics({"a": 1.0})
    tracking.log_params({"a": 1})
    tracking.set_tags({"a": "b"})
    tracking.log_text("x", "x.md")
    tracking.log_dict({"a": 1}, "a.json")
    tracking.log_image(Image.new("RGB", (4, 4)), "a.png")
    (tmp_path / "f.txt").write_text("x")
    tracking.log_artifact(tmp_path / "f.txt", "files")
    tracking.log_artifacts(tmp_path, "files")
    tracking.log_lineage_tags(extra="x")
    tracking.end_run()
    assert mlflow.search_runs(output_format="list") == []


def test_helpers_write_into_the_active_run_and_drop_empty_tags(tmp_path):
    _fresh_store(tmp_path)
    (tmp_path / "f.txt").write_text("x")
    with mlflow.start_run() as run:
        assert tracking.active_run_id() == run.info.run_id
        tracking.log_metrics({"a": 2}, step=3)
        tracking.log_params({"p": 1})
        tracking.set_tags({"t": "v", "empty": "", "none": None})
        tracking.log_text("hello", "notes/x.md")
        tracking.log_artifact(tmp_path / "f.txt", "files")
    data = MlflowClient().get_run(run.info.run_id).data
    assert data.metrics == {"a": 2.0} and data.params == {"p": "1"}
    assert data.tags["t"] == "v" and "empty" not in data.tags and "none" not in data.tags
    assert {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "notes")} == {"notes/x.md"}
    assert {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "files")} == {"files/f.txt"}


def test_no_node_module_imports_mlflow():
    from pathlib import Path

    import lora_pipeline

    root = Path(lora_pipeline.__file__).parent
    offenders = [str(p.relative_to(root)) for folder in ("pipelines", "datasets") for p in (root / folder).rglob("*.py")
                 if p.name != "tracking.py" and ("import mlflow" in p.read_text() or "from mlflow" in p.read_text())]
    assert offenders == []
