import mlflow
from mlflow.tracking import MlflowClient

from lora_pipeline.pipelines.metrics import StepMetricsLogger


def _fresh_store(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("metrics-test")  # not an experiment id left over from another test's store


def _history(run_id, key):
    return [(m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key)]


def test_step_metrics_are_buffered_then_all_written(tmp_path):
    _fresh_store(tmp_path)
    with mlflow.start_run() as run:
        with StepMetricsLogger("train", flush_seconds=3600) as log:
            for step in range(1, 6):
                log({"loss": 1.0 / step, "lr": 1e-4}, step)
            assert _history(run.info.run_id, "train.loss") == []  # buffered: no write per step
        assert sorted(_history(run.info.run_id, "train.loss")) == [(s, 1.0 / s) for s in range(1, 6)]
        assert len(_history(run.info.run_id, "train.lr")) == 5


def test_step_metrics_flush_on_interval_and_without_a_run_do_nothing(tmp_path):
    _fresh_store(tmp_path)
    StepMetricsLogger("train")({"loss": 1.0}, 1)  # no active run: ignored, no error
    with mlflow.start_run() as run:
        log = StepMetricsLogger("llm", flush_seconds=0)
        log({"loss": 2.0}, 1)
        assert _history(run.info.run_id, "llm.loss") == [(1, 2.0)]
