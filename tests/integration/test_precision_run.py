"""The issue's repro through Kedro: a subject trained with kohya's usual mixed_precision: fp16 exports its LoRA
and logs its samples (the run used to crash in the samples after the last step and export nothing)."""

from __future__ import annotations

import mlflow
import pytest
import yaml
from kedro.framework.session import KedroSession
from kedro_helpers import kedro_runs, stage_run
from mlflow.tracking import MlflowClient

from lora_pipeline.diffusion.lora_files import load_lora_file

pytestmark = pytest.mark.slow  # a whole pipeline through Kedro (see make test-fast)


def test_an_fp16_subject_trains_samples_and_exports(project):
    subjects_file = project / "conf" / "demo" / "subjects.yml"
    subjects = yaml.safe_load(subjects_file.read_text(encoding="utf-8"))
    subjects["subjects"]["demo_lora"]["training"] = {"max_steps": 2, "save_steps": 2, "mixed_precision": "fp16",
                                                     "sample_every_steps": 0}
    subjects_file.write_text(yaml.safe_dump(subjects), encoding="utf-8")
    try:
        with KedroSession.create(project_path=project, env="demo") as session:
            session.run(pipeline_names=["data", "training", "export"], namespaces=["demo_lora"])
    finally:
        while mlflow.active_run():  # as kedro_helpers.run: kedro-mlflow leaves its run on the stack
            mlflow.end_run()

    [export] = sorted((project / "data/07_model_output/demo_lora.safetensors").glob("*/demo_lora.safetensors"))
    state, header = load_lora_file(export)
    assert state and header["ss_steps"] == "2"
    [last] = kedro_runs(project)
    training = stage_run(project, last, "demo_lora", "training")
    samples = [a.path for a in MlflowClient().list_artifacts(training.info.run_id, "samples/demo_lora")]
    assert any(path.endswith("step_000002_0.png") for path in samples), samples
    assert "lora.demo_lora.sample_error" not in training.data.tags
