"""Lineage a person can see (kedro viz in a real browser), lineage from a LoRA file, multi-process training,
and an Airflow DAG — each on a temp copy of the demo project."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import mlflow
import pytest
from kedro_helpers import run

from lora_pipeline.cli import lineage
from lora_pipeline.diffusion.lora_files import load_lora_file

pytestmark = pytest.mark.slow  # a whole pipeline through Kedro (see make test-fast)

ENV = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
       "KEDRO_ENV": "demo"}  # the environment whose subjects.yml the pipelines are registered for
BIN = Path(sys.executable).parent


def _kedro(project: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "kedro"), *args], cwd=project, env=ENV, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed here if missing (root + package registry); else the test is skipped."""
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists() and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True, timeout=900)
    if not Path(path).exists():
        pytest.skip("Chromium is not installed and could not be installed with apt-get (no root or no registry)")
    return path


def test_kedro_viz_shows_the_lineage_in_a_browser(project, chromium, tmp_path):
    built = _kedro(project, "viz", "build")
    assert "circular dependency" not in built.stdout + built.stderr
    graph = json.loads((project / "build" / "api" / "main").read_text())
    # the layers band is drawn (kedro-viz drops it on a layer cycle), in the order the data flows
    layers = graph["layers"]
    flow = ["raw", "intermediate", "primary", "models", "model_output", "reporting"]
    assert [layer for layer in layers if layer in flow] == flow, layers
    layer_of = {node["name"]: node.get("layer") for node in graph["nodes"]}
    assert {"train_lora", "demo_lora.lora_kohya", "demo_lora.raw_images", "demo_lora.quality_report",
            "demo_stripes.lora_kohya"} <= set(layer_of)
    assert (layer_of["demo_lora.raw_images"], layer_of["demo_lora.lora_kohya"],
            layer_of["demo_lora.quality_report"]) == ("raw", "model_output", "reporting")
    assert {"demo_lora", "demo_stripes", "demo_sdxl_lora"} <= set(graph["modular_pipelines"])  # one per subject

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(project / "build"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--window-size=1600,1000"]
    try:
        dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
        shot = tmp_path / "kedro_viz.png"
        subprocess.run([chromium, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=180)
    finally:
        server.shutdown()
    lowered = dom.lower()
    # each subject is one collapsible box (its namespace); generation reads every subject's export
    for subject in ("demo lora", "demo stripes", "demo sdxl lora"):
        assert subject in lowered or subject.replace(" ", "_") in lowered, dom[-3000:]
    assert "generate images" in lowered or "generate_images" in lowered
    assert shot.is_file() and shot.stat().st_size > 10_000
    if os.environ.get("VIZ_SCREENSHOT_DIR"):  # keep the screenshot for a person to look at
        shutil.copy(shot, Path(os.environ["VIZ_SCREENSHOT_DIR"]) / "kedro_viz.png")


def test_lineage_from_a_lora_file_and_two_process_training(project):
    run(project, "__default__")
    [version] = sorted((project / "data/07_model_output/demo_lora.safetensors").iterdir())
    lora_file = version / "demo_lora.safetensors"
    info, runs = lineage.find_runs(lora_file, f"sqlite:///{project / 'mlflow.db'}")
    [export_run] = runs  # the subject's export stage run
    header = load_lora_file(lora_file)[1]
    assert export_run.data.tags["lora.demo_lora.dataset_hash"] == header["ss_dataset_hash"] == info["dataset"]
    assert (export_run.data.tags["subject"], export_run.data.tags["stage"]) == ("demo_lora", "export")
    training = mlflow.get_run(header["lora_pipeline.training_run_id"])
    assert training.data.tags["stage"] == "training"  # one `kedro run` trained and exported:
    assert training.data.tags["mlflow.parentRunId"] == export_run.data.tags["mlflow.parentRunId"]
    printed = subprocess.run([sys.executable, "-m", "lora_pipeline.cli", "lineage", str(lora_file)], cwd=project, env=ENV,
                             capture_output=True, text=True, timeout=120).stdout
    assert "export run" in printed and export_run.info.run_id in printed and "kedro version" in printed
    cli = subprocess.run([str(BIN / "lora-pipeline"), "lineage", str(lora_file)], cwd=project, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and export_run.info.run_id in cli.stdout

    # One WebUI-style prompt, commas and all, through the generation stage (`kedro run --params` would split it).
    prompt = "lorachar, circle, simple background <lora:demo_lora:0.8>"
    result = subprocess.run([str(BIN / "lora-pipeline"), "generate", prompt, "--seed", "5", "--count", "2",
                             "--steps", "3", "--negative", "blurry, text", "--env", "demo"], cwd=project, env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    folder = Path(result.stdout.strip().splitlines()[-1].removeprefix("Images: "))
    assert "Loading data from" not in result.stdout + result.stderr  # catalog lines only with LORA_PIPELINE_VERBOSE=1
    for noise in ("register_new_resolver", "No LoRA keys associated to", "should be kept in float32"):
        assert noise not in result.stdout + result.stderr, noise
    images = sorted(folder.glob("*.png"))
    assert [p.name for p in images] == ["000_00_seed5.png", "000_01_seed6.png"]
    from PIL import Image

    with Image.open(images[0]) as image:
        parameters = image.text["parameters"]
    assert parameters.startswith("lorachar, circle, simple background <lora:demo_lora:0.8>")
    assert "Negative prompt: blurry, text" in parameters and "Steps: 3" in parameters and "Seed: 5" in parameters

    # Same training node under `accelerate launch` with two CPU processes (gloo).
    result = subprocess.run(
        [str(BIN / "accelerate"), "launch", "--num_processes", "2", "--cpu", "-m", "lora_pipeline.cli", "train-launch",
         "--env", "demo", "--project", str(project), "--subject", "demo_lora"], cwd=project, env=ENV,
        capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    versions = sorted((project / "data/06_models/demo_lora_training.safetensors").iterdir())
    assert len(versions) == 2
    state, _ = load_lora_file(versions[-1] / "demo_lora_training.safetensors")
    assert state and all(k.startswith("unet.") and ".lora_" in k for k in state)


def test_airflow_dag_is_generated_without_airflow(project):
    _kedro(project, "airflow", "create", "--env", "demo", "-p", "image", "-t", "dags", "--group-by", "namespace")
    [dag] = list((project / "dags").glob("*.py"))
    text = dag.read_text()
    # one Airflow task per subject (its whole namespace), independent of each other, then generation
    for task in ("demo-lora", "demo-stripes", "demo-sdxl-lora"):
        assert f'@task(task_id="{task}")' in text, text[-3000:]
        assert f'tasks["{task}"] >> tasks["generate-images"]' in text
    assert not any(f'tasks["{a}"] >> tasks["{b}"]' in text for a in ("demo-lora", "demo-stripes")
                   for b in ("demo-lora", "demo-stripes", "demo-sdxl-lora"))  # subjects are independent
    compile(text, str(dag), "exec")  # valid Python; importing it needs Airflow, which is not installed here


def test_airflow_runs_the_subjects_dag_for_real(project, tmp_path):
    """The engine past one machine: kedro-airflow's DAG (one task per subject) run by Airflow itself."""
    airflow = BIN / "airflow"
    if not airflow.exists():
        pytest.skip("Airflow is not installed in this environment: pip install -e '.[airflow]' (the test extra has it)")
    home = tmp_path / "airflow"
    dags = home / "dags"
    _kedro(project, "airflow", "create", "--env", "demo", "-p", "image", "-t", str(dags), "--group-by", "namespace")
    env = {**ENV, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(dags)}
    for command in (["db", "migrate"], ["dags", "test", "lora-pipeline"]):
        result = subprocess.run([str(airflow), *command], cwd=project, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "state=success" in log and "DagRun Finished" in log, log[-3000:]
    for subject in ("demo_lora", "demo_stripes", "demo_sdxl_lora"):
        assert list((project / f"data/07_model_output/{subject}.safetensors").glob("*/*.safetensors")), subject
    assert list((project / "data/07_model_output/generated").glob("*/generated/*.png"))
