"""llm_data -> llm_training -> llm_export -> llm_eval (+ llm_merge) through a KedroSession on the demo JSONL."""

from __future__ import annotations

import mlflow
import pandas as pd
from kedro_helpers import run

from lora_pipeline.core.files import sha256_file


def _latest(folder):
    return sorted(p for p in folder.iterdir() if p.is_dir())[-1]


def test_llm_track_end_to_end(project):
    raw = project / "data/01_raw/llm/conversations.jsonl"
    raw_hash = sha256_file(raw)
    run(project, "llm", "llm_merge")
    assert sha256_file(raw) == raw_hash

    report = pd.read_csv(project / "data/08_reporting/llm_data_report.csv", keep_default_na=False)
    rejected = report[report.status == "rejected"].set_index("line").reason
    assert rejected[13].startswith("invalid JSON") and rejected[6] == "duplicate of line 4"
    assert set(report.status) == {"train", "validation", "rejected"} and 10 not in set(report.line)  # blank line

    adapter = _latest(project / "data/07_model_output/demo_llm_lora_adapter") / "demo_llm_lora_adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    merged = _latest(project / "data/07_model_output/demo_llm_lora_merged") / "demo_llm_lora_merged"
    assert (merged / "model.safetensors").is_file()
    eval_report = (_latest(project / "data/08_reporting/llm_eval_report.md") / "llm_eval_report.md").read_text()
    assert "| prompt | reference | base | adapter |" in eval_report

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    [last] = mlflow.search_runs(experiment_names=["lora_pipeline"], output_format="list", max_results=1,
                                order_by=["start_time DESC"])
    metrics = last.data.metrics
    assert metrics["llm_eval.eval_loss_adapter"] < metrics["llm_eval.eval_loss_base"]
    assert metrics["llm_eval.json_valid_rate_constrained_adapter"] == 1.0
    assert metrics["llm_eval.json_valid_rate_constrained_base"] == 1.0
    assert "llm_eval.json_valid_rate_unconstrained_adapter" in metrics
    assert metrics["llm.tokens_per_second_mean"] > 0 and metrics["llm_data.rejected"] == 2
    assert len(last.data.params["llm.dataset_hash"]) == 64
