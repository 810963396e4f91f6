"""The whole default pipeline (captioning -> normalization -> training -> export -> evaluation -> generation)
through a KedroSession.

One `kedro run` of the default pipeline is shared by the tests of this module (``first_run``, module-scoped);
each test checks one thing about it, so the first failure hides nothing else. What later runs change (another
export version, a regenerated grid) is recorded right after the first run. The tests that run more pipelines on
that project (generation again, evaluation again, merge, notebook, retrain, accelerate entry point) come after
the read-only ones, in that order; each asserts what its own run changed, relative to the state before it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import mlflow
import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
from kedro.framework.startup import bootstrap_project
from kedro_helpers import build_project, kedro_runs, run, stage_run
from mlflow.tracking import MlflowClient
from nbclient import NotebookClient
from PIL import Image

from lora_pipeline.cli import main as lora_pipeline_cli
from lora_pipeline.core.files import sha256_file
from lora_pipeline.diffusion.dataset import build_examples, dataset_hash
from lora_pipeline.diffusion.lora_files import load_lora_file
from lora_pipeline.diffusion.training import Example

REPO_ROOT = Path(__file__).resolve().parents[2]
OUT = "data/07_model_output"


def _versions(folder):
    return sorted(p for p in folder.iterdir() if p.is_dir())


def _holdout_temp_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("holdout-*"))


@pytest.fixture(scope="module")
def _default_run(tmp_path_factory, tiny_models, _demo_images_template):
    """One run of the default pipeline, and what the tests read from right after it."""
    root = tmp_path_factory.mktemp("default_run") / "project"
    build_project(root, tiny_models, _demo_images_template)
    with pytest.MonkeyPatch.context() as mp:  # monkeypatch is function-scoped; this undoes the same at module end
        mp.chdir(root)  # the sqlite tracking URI and model paths are project-relative
        mp.setenv("KEDRO_ENV", "demo")
        # this run's own temp folder: another pytest worker's evaluation, at the same time, makes holdout-* folders
        # of its own in the shared one (this test read one of those as left behind)
        scratch = root.parent / "tmp"
        scratch.mkdir()
        mp.setattr(tempfile, "tempdir", str(scratch))
        bootstrap_project(root)
        holdout_before = _holdout_temp_dirs()
        run(root, "__default__")
        [last] = kedro_runs(root)  # the `kedro run`: parameters; one MLflow run per subject and stage inside it
        kohya_versions = _versions(root / OUT / "demo_lora.safetensors")
        [generated_version] = _versions(root / OUT / "generated")
        generated = sorted((generated_version / "generated").glob("*.png"))
        with Image.open(root / "data/08_reporting/comparison_grid.png") as grid:
            grid = grid.copy()
        yield SimpleNamespace(
            root=root, last=last, client=MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}"),
            holdout_before=holdout_before, holdout_after=_holdout_temp_dirs(),
            kohya_versions=kohya_versions, header=load_lora_file(kohya_versions[-1] / "demo_lora.safetensors")[1],
            stripes_header=load_lora_file(_versions(root / OUT / "demo_stripes.safetensors")[-1]
                                          / "demo_stripes.safetensors")[1],
            generated_version=generated_version, generated=generated,
            generated_bytes={p.name: p.read_bytes() for p in generated}, grid=grid,
            evaluation=stage_run(root, last, "demo_lora", "evaluation").data.metrics)


@pytest.fixture
def first_run(_default_run, monkeypatch):
    """The shared run, with this test in its project (a `project` test in between changes cwd and Kedro's)."""
    monkeypatch.chdir(_default_run.root)
    monkeypatch.setenv("KEDRO_ENV", "demo")
    bootstrap_project(_default_run.root)
    mlflow.set_tracking_uri(f"sqlite:///{_default_run.root / 'mlflow.db'}")
    return _default_run


def _training(r):
    return stage_run(r.root, r.last, "demo_lora", "training")


def _artifacts(r, run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in r.client.list_artifacts(run_id, path)}


# ---------- the dataset hash (no pipeline run)

def test_dataset_hash_follows_image_bytes_and_captions_not_order(tmp_path):
    paths = []
    for index, color in enumerate([(200, 30, 30), (30, 200, 30)]):
        paths.append(tmp_path / f"img_{index}.png")
        Image.new("RGB", (8, 8), color).save(paths[-1])

    def examples(captions=("a", "b")):
        return [Example(p, text, 8, 8, sha256_file(p)) for p, text in zip(paths, captions)]

    original = dataset_hash(examples())
    assert dataset_hash(examples()[::-1]) == original
    assert dataset_hash(examples(("a", "b, changed"))) != original
    Image.new("RGB", (8, 8), (200, 30, 31)).save(paths[0])  # one pixel value of one image
    assert dataset_hash(examples()) != original


# ---------- one run of the default pipeline: files

@pytest.mark.slow
def test_evaluation_cleans_up_its_temp_folders(first_run):
    assert first_run.holdout_after == first_run.holdout_before


@pytest.mark.slow
def test_kohya_export_is_one_fp16_unet_lora(first_run):
    assert len(first_run.kohya_versions) == 1
    state, _ = load_lora_file(first_run.kohya_versions[0] / "demo_lora.safetensors")
    assert state and all(k.startswith("lora_unet_") for k in state)
    assert all(t.dtype == torch.float16 for t in state.values())


@pytest.mark.slow
def test_kohya_export_header_describes_the_training(first_run):
    header = first_run.header
    assert header["ss_network_alpha"] == "8.0" and header["ss_network_dim"] == "4"
    assert header["ss_output_name"] == "demo_lora" and header["ss_num_train_images"] == "28"
    assert "lorachar" in json.loads(header["ss_tag_frequency"])["dataset"]


@pytest.mark.slow
def test_diffusers_export_has_the_lora_weights(first_run):
    [version] = _versions(first_run.root / OUT / "demo_lora_diffusers")
    assert (version / "demo_lora_diffusers" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_model_card_names_the_webui_tag_and_the_trigger(first_run):
    [version] = _versions(first_run.root / OUT / "demo_lora_README.md")
    card = (version / "demo_lora_README.md").read_text()
    assert "<lora:demo_lora:0.8>" in card and "lorachar" in card


# ---------- MLflow

@pytest.mark.slow
def test_kedro_run_logs_the_parameters(first_run):
    assert first_run.last.data.params["demo_lora.training.lora_rank"] == "4"


@pytest.mark.slow
def test_training_stage_run_is_tagged_with_subject_and_stage(first_run):
    training = _training(first_run)
    assert training.data.tags["subject"] == "demo_lora" and training.data.tags["stage"] == "training"


@pytest.mark.slow
def test_logged_dataset_hash_is_the_training_sets_and_the_exports(first_run):
    logged = _training(first_run).data.params["demo_lora.training.dataset_hash"]
    folder = first_run.root / "data/03_primary/demo_lora/dataset"
    metadata = pd.read_csv(folder / "metadata.csv", keep_default_na=False)
    assert logged == dataset_hash(build_examples(folder, metadata))
    assert logged == first_run.header["ss_dataset_hash"]


@pytest.mark.slow
def test_training_loss_goes_down(first_run):
    training = _training(first_run)
    losses = [m.value for m in first_run.client.get_metric_history(training.info.run_id, "demo_lora.train.loss")]
    assert len(losses) == 30
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


@pytest.mark.slow
def test_training_logs_peak_memory(first_run):
    assert _training(first_run).data.metrics["demo_lora.train.peak_memory_mb"] > 0


@pytest.mark.slow
def test_normalization_logs_the_images_kept(first_run):
    normalization = stage_run(first_run.root, first_run.last, "demo_lora", "normalization")
    assert normalization.data.metrics["demo_lora.normalization.images_kept"] == 28


@pytest.mark.slow
def test_training_run_has_the_summary_and_sample_images(first_run):
    run_id = _training(first_run).info.run_id
    assert {"samples", "demo_lora"} <= _artifacts(first_run, run_id)
    assert "demo_lora/training_summary.json" in _artifacts(first_run, run_id, "demo_lora")
    assert any(path.endswith(".png") for path in _artifacts(first_run, run_id, "samples/demo_lora"))


@pytest.mark.slow
def test_export_runs_log_each_subjects_lora(first_run):
    export = stage_run(first_run.root, first_run.last, "demo_lora", "export")
    assert _artifacts(first_run, export.info.run_id, "lora") >= {"lora/demo_lora.safetensors",
                                                                  "lora/demo_lora_README.md"}
    stripes = stage_run(first_run.root, first_run.last, "demo_stripes", "export")
    assert "lora/demo_stripes.safetensors" in _artifacts(first_run, stripes.info.run_id, "lora")


# ---------- evaluation: the LoRA lowers the fixed-noise denoising loss on its training images and on held-out ones

@pytest.mark.slow
def test_lora_lowers_the_loss_on_training_images(first_run):
    evaluation = first_run.evaluation
    assert evaluation["demo_lora.evaluation.loss_train_lora"] < evaluation["demo_lora.evaluation.loss_train_base"]


@pytest.mark.slow
def test_lora_lowers_the_loss_on_held_out_images(first_run):
    evaluation = first_run.evaluation
    assert evaluation["demo_lora.evaluation.loss_holdout_lora"] < evaluation["demo_lora.evaluation.loss_holdout_base"]


@pytest.mark.slow
def test_evaluation_logs_clip_and_style_scores(first_run):
    assert {"demo_lora.evaluation.clip_score_lora", "demo_lora.evaluation.style_similarity_lora"} <= set(
        first_run.evaluation)


@pytest.mark.slow
def test_evaluation_report_has_the_losses(first_run):
    [version] = _versions(first_run.root / "data/08_reporting/demo_lora/evaluation_report.md")
    assert "loss_train_lora" in (version / "evaluation_report.md").read_text()


# ---------- generation: WebUI "parameters" PNG text, a contact sheet and the comparison grid (also in MLflow)

@pytest.mark.slow
def test_generation_writes_one_image_per_prompt_and_seed(first_run):
    assert [p.name for p in first_run.generated] == ["000_00_seed1.png", "001_00_seed1.png", "001_01_seed2.png",
                                                     "002_00_seed7.png", "003_00_seed7.png"]


@pytest.mark.slow
def test_stacked_image_names_both_loras_their_hashes_and_versions(first_run):
    with Image.open(first_run.generated[0]) as image:  # two subjects stacked in one image
        parameters = image.text["parameters"]
    assert "<lora:demo_lora:0.6> <lora:demo_stripes:0.8>" in parameters and "Seed: 1" in parameters
    assert (f'Lora hashes: "demo_lora: {first_run.header["sshs_model_hash"][:12]}, '
            f'demo_stripes: {first_run.stripes_header["sshs_model_hash"][:12]}"') in parameters
    assert f'Lora versions: "demo_lora: {first_run.kohya_versions[-1].name}, demo_stripes: ' in parameters


@pytest.mark.slow
def test_single_lora_image_names_its_lora_and_seed(first_run):
    with Image.open(first_run.generated[1]) as image:
        parameters = image.text["parameters"]
    assert "<lora:demo_lora:0.8>" in parameters and "Seed: 1" in parameters


@pytest.mark.slow
def test_comparison_grid_weight_zero_is_the_base_model_and_full_weight_differs(first_run):
    # Rows: each subject at 0 / 0.5 / 1.0, then both together. At weight 0 both subjects' cells are the base
    # model's image (same seed); at 1.0 the LoRA changes it.
    grid = np.asarray(first_run.grid)
    rows, columns = 3, 3
    cell_w, row_h = grid.shape[1] // columns, grid.shape[0] // rows

    def image(row, column):  # the image part of a cell (below its label)
        return grid[(row + 1) * row_h - cell_w:(row + 1) * row_h, column * cell_w:(column + 1) * cell_w]

    assert np.array_equal(image(0, 0), image(1, 0))
    assert not np.array_equal(image(0, 0), image(0, 2)) and not np.array_equal(image(1, 0), image(1, 2))


@pytest.mark.slow
def test_kedro_run_logs_the_comparison_grid_and_contact_sheet(first_run):
    assert _artifacts(first_run, first_run.last.info.run_id, "generation") == {
        "generation/comparison_grid.png", "generation/contact_sheet.png", "generation/comparison_report.md"}


# ---------- later runs on the same project (in this order; each checks what its own run changed)

@pytest.mark.slow
def test_second_generation_run_adds_a_version_and_keeps_the_first(first_run):
    before = _versions(first_run.root / OUT / "generated")
    run(first_run.root, "generation")
    versions = _versions(first_run.root / OUT / "generated")
    assert len(versions) == len(before) + 1 and versions[0] == first_run.generated_version
    assert {p.name: p.read_bytes() for p in (first_run.generated_version / "generated").glob("*.png")} == \
        first_run.generated_bytes


@pytest.mark.slow
def test_evaluation_rerun_gives_the_same_loss(first_run):
    run(first_run.root, "evaluation")
    again = stage_run(first_run.root, kedro_runs(first_run.root)[0], "demo_lora", "evaluation")
    assert again.data.metrics["demo_lora.evaluation.loss_train_lora"] == \
        first_run.evaluation["demo_lora.evaluation.loss_train_lora"]


@pytest.mark.slow
def test_merge_writes_a_diffusers_folder_and_a_webui_checkpoint(first_run):
    run(first_run.root, "merge")  # base + 0.8 * LoRA
    merged = first_run.root / "data/06_models/merged"
    assert (merged / "demo_merged" / "model_index.json").is_file()
    assert (merged / "demo_merged.safetensors").is_file()


@pytest.mark.slow
def test_notebook_runs_against_the_outputs(first_run, monkeypatch):
    notebook = nbformat.read(REPO_ROOT / "notebooks" / "inspect_run.ipynb", as_version=4)
    monkeypatch.setenv("LORA_PROJECT", str(first_run.root))
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(first_run.root)}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "30 steps, loss" in outputs and "kept" in outputs


@pytest.mark.slow
def test_retrain_keeps_the_earlier_export(first_run):
    """A retrain starts a new run (the finished checkpoint is not "resumed") and adds an export version."""
    before = _versions(first_run.root / OUT / "demo_lora.safetensors")
    run(first_run.root, "training", "export")
    after = _versions(first_run.root / OUT / "demo_lora.safetensors")
    assert len(after) == len(before) + 1 and after[:len(before)] == before


@pytest.mark.slow
def test_accelerate_entry_point_trains_from_the_same_catalog(first_run):
    before = _versions(first_run.root / "data/06_models/demo_lora_training.safetensors")
    lora_pipeline_cli(["train-launch", "--env", "demo", "--project", str(first_run.root), "--subject", "demo_lora"],
                      standalone_mode=False)  # `lora-pipeline train-launch`, what `accelerate launch` runs
    after = _versions(first_run.root / "data/06_models/demo_lora_training.safetensors")
    assert len(after) == len(before) + 1 and after[:len(before)] == before


# ---------- own projects

@pytest.mark.slow
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


@pytest.mark.slow
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
