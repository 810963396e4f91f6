"""The whole default pipeline (captioning -> normalization -> training -> export) through a KedroSession."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import nbformat
import numpy as np
import torch
from kedro_helpers import kedro_runs, run, stage_run
from mlflow.tracking import MlflowClient
from nbclient import NotebookClient
from PIL import Image

from lora_pipeline import train_launch
from lora_pipeline.diffusion.lora_files import load_lora_file

REPO_ROOT = Path(__file__).resolve().parents[2]


def _versions(folder):
    return sorted(p for p in folder.iterdir() if p.is_dir())


def test_default_pipeline_trains_exports_and_tracks(project, monkeypatch):
    import tempfile

    leftovers = set(Path(tempfile.gettempdir()).glob("holdout-*"))
    run(project, "__default__")
    assert set(Path(tempfile.gettempdir()).glob("holdout-*")) == leftovers  # evaluation cleans up after itself

    kohya_versions = _versions(project / "data/07_model_output/demo_lora.safetensors")
    assert len(kohya_versions) == 1
    state, header = load_lora_file(kohya_versions[0] / "demo_lora.safetensors")
    assert state and all(k.startswith("lora_unet_") for k in state)
    assert all(t.dtype == torch.float16 for t in state.values())
    assert header["ss_network_alpha"] == "8.0" and header["ss_network_dim"] == "4"
    assert header["ss_output_name"] == "demo_lora" and header["ss_num_train_images"] == "28"
    assert "lorachar" in json.loads(header["ss_tag_frequency"])["dataset"]
    [diffusers_version] = _versions(project / "data/07_model_output/demo_lora_diffusers")
    assert (diffusers_version / "demo_lora_diffusers" / "pytorch_lora_weights.safetensors").is_file()
    [card_version] = _versions(project / "data/07_model_output/demo_lora_README.md")
    card = (card_version / "demo_lora_README.md").read_text()
    assert "<lora:demo_lora:0.8>" in card and "lorachar" in card

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    client = MlflowClient()
    [last] = kedro_runs(project)  # the `kedro run`: parameters; one MLflow run per subject and stage inside it
    assert last.data.params["demo_lora.training.lora_rank"] == "4"
    training = stage_run(project, last, "demo_lora", "training")
    assert training.data.tags["subject"] == "demo_lora" and training.data.tags["stage"] == "training"
    assert len(training.data.params["demo_lora.training.dataset_hash"]) == 64
    losses = [m.value for m in client.get_metric_history(training.info.run_id, "demo_lora.train.loss")]
    assert len(losses) == 30
    assert np.mean(losses[-10:]) < np.mean(losses[:10])  # the loss goes down
    assert training.data.metrics["demo_lora.train.peak_memory_mb"] > 0
    assert stage_run(project, last, "demo_lora", "normalization").data.metrics[
        "demo_lora.normalization.images_kept"] == 28
    artifacts = {a.path for a in client.list_artifacts(training.info.run_id)}
    assert {"samples", "demo_lora"} <= artifacts
    assert "demo_lora/training_summary.json" in {a.path for a in client.list_artifacts(training.info.run_id,
                                                                                         "demo_lora")}
    samples = [a.path for a in client.list_artifacts(training.info.run_id, "samples/demo_lora")]
    assert any(path.endswith(".png") for path in samples)
    export = stage_run(project, last, "demo_lora", "export")
    assert {a.path for a in client.list_artifacts(export.info.run_id, "lora")} >= {
        "lora/demo_lora.safetensors", "lora/demo_lora_README.md"}
    stripes_export = stage_run(project, last, "demo_stripes", "export")
    assert "lora/demo_stripes.safetensors" in {a.path for a in client.list_artifacts(stripes_export.info.run_id,
                                                                                     "lora")}

    # Evaluation: the LoRA lowers the fixed-noise denoising loss on its training images and on held-out ones.
    evaluation = stage_run(project, last, "demo_lora", "evaluation").data.metrics
    assert evaluation["demo_lora.evaluation.loss_train_lora"] < evaluation["demo_lora.evaluation.loss_train_base"]
    assert evaluation["demo_lora.evaluation.loss_holdout_lora"] < evaluation["demo_lora.evaluation.loss_holdout_base"]
    assert "demo_lora.evaluation.clip_score_lora" in evaluation and "demo_lora.evaluation.style_similarity_lora" in evaluation
    [report_version] = _versions(project / "data/08_reporting/demo_lora/evaluation_report.md")
    assert "loss_train_lora" in (report_version / "evaluation_report.md").read_text()

    # Generation: WebUI "parameters" PNG text, a contact sheet and the comparison grid (also in MLflow).
    [first_version] = _versions(project / "data/07_model_output/generated")
    generated = sorted((first_version / "generated").glob("*.png"))
    assert [p.name for p in generated] == ["000_00_seed3.png", "001_00_seed1.png", "001_01_seed2.png",
                                           "002_00_seed7.png", "003_00_seed7.png"]
    export_version = _versions(project / "data/07_model_output/demo_lora.safetensors")[-1].name
    stripes_header = load_lora_file(_versions(project / "data/07_model_output/demo_stripes.safetensors")[-1]
                                    / "demo_stripes.safetensors")[1]
    with Image.open(generated[0]) as image:  # two subjects stacked in one image
        parameters = image.text["parameters"]
        assert "<lora:demo_lora:0.6> <lora:demo_stripes:0.8>" in parameters and "Seed: 3" in parameters
        assert (f'Lora hashes: "demo_lora: {header["sshs_model_hash"][:12]}, '
                f'demo_stripes: {stripes_header["sshs_model_hash"][:12]}"') in parameters
        assert f'Lora versions: "demo_lora: {export_version}, demo_stripes: ' in parameters
    with Image.open(generated[1]) as image:
        assert "<lora:demo_lora:0.8>" in image.text["parameters"] and "Seed: 1" in image.text["parameters"]
    first_bytes = {p.name: p.read_bytes() for p in generated}
    run(project, "generation")  # a second run adds a version; the first run's images stay as they were
    versions = _versions(project / "data/07_model_output/generated")
    assert len(versions) == 2 and versions[0] == first_version
    assert {p.name: p.read_bytes() for p in (first_version / "generated").glob("*.png")} == first_bytes
    with Image.open(project / "data/08_reporting/comparison_grid.png") as grid:
        assert grid.size == (3 * 96, 3 * (96 + 18))  # each subject at 0 / 0.5 / 1.0, then both together
    assert {a.path for a in client.list_artifacts(last.info.run_id, "generation")} == {
        "generation/comparison_grid.png", "generation/contact_sheet.png"}

    run(project, "evaluation")  # the same figure on a second run
    again = stage_run(project, kedro_runs(project)[0], "demo_lora", "evaluation")
    assert again.data.metrics["demo_lora.evaluation.loss_train_lora"] == evaluation["demo_lora.evaluation.loss_train_lora"]

    # Merge: a diffusers folder and a WebUI single-file checkpoint of base + 0.8 * LoRA.
    run(project, "merge")
    merged = project / "data/06_models/merged"
    assert (merged / "demo_merged" / "model_index.json").is_file() and (merged / "demo_merged.safetensors").is_file()

    # The notebook runs against these outputs.
    notebook = nbformat.read(REPO_ROOT / "notebooks" / "inspect_run.ipynb", as_version=4)
    monkeypatch.setenv("LORA_PROJECT", str(project))
    monkeypatch.setenv("KEDRO_ENV", "demo")
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(project)}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "30 steps, loss" in outputs and "kept" in outputs

    # A retrain keeps the earlier export and starts a new run (the finished checkpoint is not "resumed").
    run(project, "training", "export")
    assert len(_versions(project / "data/07_model_output/demo_lora.safetensors")) == 2

    # The accelerate entry point trains from the same catalog and parameters.
    train_launch.main(["--env", "demo", "--project", str(project), "--subject", "demo_lora"])
    assert len(_versions(project / "data/06_models/demo_lora_training.safetensors")) == 3


def test_subjects_in_parallel_equal_sequential_and_stay_apart(project):
    """ParallelRunner trains the subjects at once (one process each); every LoRA equals the sequential one, and
    each subject has its own files. Run as `kedro run` is, in a fresh process: forking this test process, whose
    torch thread pool is already running, would deadlock the workers."""
    import subprocess
    import sys

    run(project, "data")
    run(project, "training")
    sequential = {s: _versions(project / f"data/06_models/{s}_training.safetensors")[-1] / f"{s}_training.safetensors"
                  for s in ("demo_lora", "demo_stripes", "demo_sdxl_lora")}
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([str(Path(sys.executable).parent / "kedro"), "run", "--env", "demo", "--pipelines",
                             "training", "--runner", "ParallelRunner"], cwd=project, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for subject, first in sequential.items():
        versions = _versions(project / f"data/06_models/{subject}_training.safetensors")
        assert len(versions) == 2
        again = load_lora_file(versions[-1] / f"{subject}_training.safetensors")[0]
        before = load_lora_file(first)[0]
        assert again.keys() == before.keys() and all(torch.equal(again[k], before[k]) for k in before), subject
    # separate paths and summaries per subject
    stripes = json.loads((_versions(project / "data/06_models/demo_stripes_summary.json")[-1]
                          / "demo_stripes_summary.json").read_text())
    assert stripes["output_name"] == "demo_stripes" and stripes["trigger"] == "stripechar"
    assert stripes["num_images"] == 8 and stripes["steps"] == 20
    sdxl = json.loads((_versions(project / "data/06_models/demo_sdxl_lora_summary.json")[-1]
                       / "demo_sdxl_lora_summary.json").read_text())
    assert sdxl["spec"]["family"] == "sdxl" and sdxl["num_images"] == 28


def test_new_images_in_one_subject_retrain_only_that_subject(project):
    """`lora-pipeline run` trains subjects whose images or parameters changed; the others are a no-op that says
    so, and their outputs keep their bytes and get no new version."""
    import subprocess
    import sys

    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}
    cli = [str(Path(sys.executable).parent / "lora-pipeline"), "run", "--env", "demo"]

    def lora_pipeline_run() -> str:
        result = subprocess.run(cli, cwd=project, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    def outputs(subject: str) -> dict[str, bytes]:
        return {str(p.relative_to(project)): p.read_bytes() for p in sorted((project / "data").rglob("*"))
                if p.is_file() and f"{subject}." in p.name and "07_model_output" in str(p)}

    first = lora_pipeline_run()
    assert "Running subject(s): demo_lora, demo_stripes, demo_sdxl_lora" in first
    assert "No subject changed" in lora_pipeline_run()
    lora_before = outputs("demo_lora")
    stripes_versions = len(_versions(project / "data/07_model_output/demo_stripes.safetensors"))
    added = project / "data/01_raw/demo_stripes/images/stripes_extra.png"
    Image.new("RGB", (640, 640), (200, 30, 30)).save(added)
    added.with_suffix(".txt").write_text("stripes, red background, bold\n", encoding="utf-8")

    again = lora_pipeline_run()
    assert "Subject demo_lora: unchanged" in again and "Running subject(s): demo_stripes" in again
    assert outputs("demo_lora") == lora_before  # same bytes, no new version
    assert len(_versions(project / "data/07_model_output/demo_stripes.safetensors")) == stripes_versions + 1
    newest = _versions(project / "data/06_models/demo_stripes_summary.json")[-1] / "demo_stripes_summary.json"
    assert json.loads(newest.read_text())["num_images"] == 9

    # Reproduce the first run: its training-set version (metadata + images from the store) gives the same bytes.
    from kedro.framework.session import KedroSession

    first_set = _versions(project / "data/03_primary/demo_stripes/metadata_history/metadata.csv")[0].name
    with KedroSession.create(project_path=project, env="demo") as session:
        session.run(pipeline_names=["training"], namespaces=["demo_stripes"],
                    load_versions={"demo_stripes.train_metadata_snapshot": first_set})
    while mlflow.active_run():
        mlflow.end_run()
    weights = _versions(project / "data/06_models/demo_stripes_training.safetensors")
    name = "demo_stripes_training.safetensors"
    assert (weights[-1] / name).read_bytes() == (weights[0] / name).read_bytes()
    reproduced = _versions(project / "data/06_models/demo_stripes_summary.json")[-1] / "demo_stripes_summary.json"
    assert json.loads(reproduced.read_text())["num_images"] == 8
