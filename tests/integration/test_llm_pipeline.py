"""llm_data -> llm_training -> llm_export -> llm_eval (+ llm_merge) through a KedroSession on the demo JSONL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from kedro_helpers import run

from lora_pipeline.core.files import sha256_file

pytestmark = pytest.mark.slow  # a whole pipeline through Kedro (see make test-fast)


def _latest(folder):
    return sorted(p for p in folder.iterdir() if p.is_dir())[-1]


def _latest_report(project):
    folder = project / "data/08_reporting/llm_data_report.csv"
    return pd.read_csv(_latest(folder) / "llm_data_report.csv", keep_default_na=False)


def test_llm_track_end_to_end(project):
    raw = project / "data/01_raw/llm/conversations.jsonl"
    raw_hash = sha256_file(raw)
    subprocess.run("git init -q && git -c user.email=t@example.com -c user.name=t commit -q --allow-empty -m init",
                   shell=True, cwd=project, check=True)  # the run records the project's commit
    run(project, "llm", "llm_merge")
    assert sha256_file(raw) == raw_hash

    report = _latest_report(project)
    rejected = report[report.status == "rejected"].set_index("line").reason
    assert rejected[13].startswith("invalid JSON") and rejected[6] == "duplicate of line 4"
    assert set(report.status) == {"train", "validation", "rejected"} and 10 not in set(report.line)  # blank line
    cut = report[report.truncated_from > 0]  # demo max_length is 128: long rows are cut, and say so
    assert len(cut) and (cut.truncated_from > 128).all() and cut.note.str.startswith("truncated from").all()

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
    assert metrics["llm_data.truncated"] == len(cut) and last.data.params["llm.truncated_samples"] != "0"
    # lineage as on the image track: the adapter is an artifact, git commit and dataset hash are tags, every
    # effective parameter (defaults too) is a param, the runner tag is readable
    client = mlflow.tracking.MlflowClient()
    logged = {a.path for a in client.list_artifacts(last.info.run_id, "llm_adapter")}
    assert {"llm_adapter/adapter_model.safetensors", "llm_adapter/adapter_config.json", "llm_adapter/README.md"} <= logged
    # the card in the adapter folder and in MLflow is ours (what the run continued from), not PEFT's empty template
    card = (adapter / "README.md").read_text(encoding="utf-8")
    assert "Trained from a new adapter." in card and "More Information Needed" not in card
    logged_card = mlflow.artifacts.download_artifacts(run_id=last.info.run_id, artifact_path="llm_adapter/README.md",
                                                      dst_path=str(project / "downloaded"))
    assert Path(logged_card).read_text(encoding="utf-8") == card
    assert last.data.tags["llm.dataset_hash"] == last.data.params["llm.dataset_hash"] and len(last.data.tags["git_commit"]) == 40
    assert last.data.params["llm.effective.target_modules"] == "all-linear"
    assert last.data.params["llm.effective.packing"] == "False" and "llm.effective.data.split_salt" in last.data.params
    assert last.data.tags["runner"] == "SequentialRunner"
    assert "## JSON mode" in eval_report and "(9): male, 40, sore throat" in eval_report  # its own prompts
    printed = subprocess.run([str(Path(sys.executable).parent / "lora-pipeline"), "lineage", str(adapter)],
                             cwd=project, capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0 and last.info.run_id in printed.stdout, printed.stdout + printed.stderr
    first_losses = [m.value for m in client.get_metric_history(last.info.run_id, "llm.loss")]
    validation_before = set(report[report.status == "validation"].line)

    # New lines arrive: the next run continues the adapter, and the split moves no earlier example.
    with raw.open("a", encoding="utf-8") as handle:
        for i in range(30):
            handle.write(json.dumps({"prompt": f"Patient {i}: a rash on the arm for {i + 2} days",
                                     "response": "Likely contact dermatitis. Keep it clean and avoid scratching."},
                                    ensure_ascii=False) + "\n")
    run(project, "llm_data", "llm_training", "llm_export", runtime_params={"llm_training": {"init_adapter": "latest"}})
    again = _latest_report(project)
    old_lines = set(report.line)
    assert set(again[(again.status == "validation") & again.line.isin(old_lines)].line) == validation_before
    [second] = mlflow.search_runs(experiment_names=["lora_pipeline"], output_format="list", max_results=1,
                                  order_by=["start_time DESC"])
    assert second.data.tags["llm.init_from"].endswith("demo_llm_lora_adapter")
    continued = _latest(project / "data/07_model_output/demo_llm_lora_adapter") / "demo_llm_lora_adapter"
    assert "Continued from the adapter" in (continued / "README.md").read_text(encoding="utf-8")
    # its first step starts where the first run ended, not at the base model's loss
    start = client.get_metric_history(second.info.run_id, "llm.loss")[0].value
    assert start < (first_losses[0] + first_losses[-1]) / 2, (first_losses[0], first_losses[-1], start)
