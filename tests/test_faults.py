"""Faults and bad input: kill -9, a full disk, odd paths, broken files, non-reproducible outputs."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import make_params, summary_for

from lora_pipeline.core import files as files_module
from lora_pipeline.core.cache import DiskCache
from lora_pipeline.core.checkpoints import list_checkpoints
from lora_pipeline.core.config import NormalizationParams, TrainingParams
from lora_pipeline.core.errors import ConfigError, DataError, ModelNotFoundError
from lora_pipeline.core.files import sha256_file
from lora_pipeline.datasets.image_folder import ImageFolderDataset
from lora_pipeline.diffusion.dataset import build_examples, resolve_init_lora
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.lora_files import build_kohya_file, load_lora_file, save_lora_file, tensor_hash
from lora_pipeline.diffusion.training import train
from lora_pipeline.pipelines.captioning.nodes import scan_images
from lora_pipeline.pipelines.normalization.nodes import build_training_metadata, inspect_images, render_images

KILL_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from lora_pipeline.core.config import TrainingParams
    from lora_pipeline.core.cache import DiskCache
    from lora_pipeline.diffusion.loading import load_diffusion_model
    from lora_pipeline.diffusion.training import Example, train
    import time
    from torch.optim.optimizer import register_optimizer_step_post_hook
    # Pace the steps so the parent's kill (at most 0.6 s after the first checkpoint) lands before the run
    # finishes on any machine: the tiny model alone trains 20 steps in under a second.
    register_optimizer_step_post_hook(lambda *_: time.sleep(0.1))
    args = json.loads(sys.argv[1])
    params = TrainingParams(**args["params"])
    examples = [Example(Path(e[0]), e[1], e[2], e[3], e[4]) for e in args["examples"]]
    train(load_diffusion_model(params.base_model), examples, params, DiskCache(args["cache"]),
          dataset_hash=args.get("dataset_hash", "d"))
""")


def _summary(params: TrainingParams):
    return summary_for(params, resolution=[64, 64], tag_frequency={})


def _kill_during_training(params: TrainingParams, examples, tmp_path, dataset_hash: str = "d") -> list:
    """Start training in a child process, SIGKILL it once a checkpoint of *this* run exists; return them."""
    payload = {"params": params.model_dump(), "cache": str(Path(params.checkpoint_dir).parent / "cache"),
               "dataset_hash": dataset_hash,
               "examples": [[str(e.path), e.text, e.width, e.height, e.sha256] for e in examples]}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    log = open(tmp_path / "child.log", "w+")  # a file, not a pipe: a full pipe would stall the child
    before = set(Path(params.checkpoint_dir, params.output_name).glob("run-*"))
    child = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, json.dumps(payload)], env=env,
                             stdout=subprocess.DEVNULL, stderr=log)

    def checkpoints() -> list:
        runs = set(Path(params.checkpoint_dir, params.output_name).glob("run-*")) - before
        return [c for run in runs for c in list_checkpoints(run)]

    deadline = time.time() + 240
    while not checkpoints() and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 0.6))
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, f"training ended before the kill: {(tmp_path / 'child.log').read_text()[-2000:]}"
    log.close()
    return checkpoints()


@pytest.mark.slow
def test_kill_9_during_training_then_resume_equals_an_uninterrupted_run(tiny_models, tiny_examples, tmp_path):
    settings = dict(max_steps=40, save_steps=4, dropout=0.1)
    params = make_params(tiny_models, tmp_path / "killed", **settings)
    assert _kill_during_training(params, tiny_examples, tmp_path)  # at least one intact checkpoint survived
    resumed = train(load_diffusion_model(params.base_model), tiny_examples,
                    make_params(tiny_models, tmp_path / "killed", resume="latest", **settings),
                    DiskCache(tmp_path / "killed" / "cache"), dataset_hash="d")
    assert resumed.resumed_from is not None
    straight = train(load_diffusion_model(params.base_model), tiny_examples, make_params(tiny_models, tmp_path / "a", **settings),
                     DiskCache(tmp_path / "a" / "cache"), dataset_hash="d")
    for key, tensor in straight.lora_state.items():
        assert torch.equal(tensor, resumed.lora_state[key]), key


def test_full_disk_while_saving_keeps_the_earlier_file(tmp_path, monkeypatch):
    target = tmp_path / "hero.safetensors"
    save_lora_file(target, {"lora_unet_x.alpha": torch.tensor(1.0)}, {"v": "1"})
    before = target.read_bytes()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files_module.os, "fsync", full)
    with pytest.raises(OSError, match=f"no space left on {tmp_path} while writing hero.safetensors"):
        save_lora_file(target, {"lora_unet_x.alpha": torch.tensor(2.0)}, {"v": "2"})
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hero.safetensors"]


def test_identical_inputs_give_a_bitwise_identical_lora(tiny_models, tiny_examples, tmp_path):
    hashes = []
    for run in ("a", "b"):
        params = make_params(tiny_models, tmp_path / run, max_steps=4, dropout=0.1, shuffle_tags=True)
        result = train(load_diffusion_model(params.base_model), tiny_examples, params, DiskCache(tmp_path / run / "cache"),
                       dataset_hash="d")
        state, metadata = build_kohya_file(result.lora_state, _summary(params), _summary(params).unet_config(), "fp16", "t", "tiny")
        hashes.append((tensor_hash(state), metadata["sshs_model_hash"]))
    assert hashes[0] == hashes[1]


def test_odd_paths_spaces_and_chinese_names_work_end_to_end(tiny_models, tmp_path):
    raw = tmp_path / "my photos 图片" / "原始 数据"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index, name in enumerate(["猫 的 照片.png", "dog photo (1).jpg", "画.webp", "mixed 名字 2.png"]):
        size = (640, 512) if index % 2 else (512, 512)
        Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(raw / name)
    (raw / "猫 的 照片.txt").write_text("sks, 猫, cat", encoding="utf-8")
    folder = ImageFolderDataset(str(raw)).load()
    manifest = scan_images(folder)
    assert manifest.set_index("file_name").loc["猫 的 照片.png"].sidecar == "sks, 猫, cat"
    params = NormalizationParams(resolution=64, bucket_min=64, bucket_max=128, bucket_step=32)
    checks = inspect_images(folder, params)
    assert (checks.status == "kept").all()
    captions = manifest.assign(text="sks, photo")[["file_name", "sha256", "text"]]
    metadata, *_ = build_training_metadata(checks, captions, params)
    out = ImageFolderDataset(str(tmp_path / "输出 dataset"))
    out.save(render_images(folder, checks, params))
    examples = build_examples(out.load(), metadata)
    training = make_params(tiny_models, tmp_path / "训练 run", max_steps=2, batch_size=1)
    result = train(load_diffusion_model(training.base_model), examples, training, DiskCache(tmp_path / "缓存 cache"),
                   dataset_hash="d")
    state, metadata_header = build_kohya_file(result.lora_state, _summary(training), _summary(training).unet_config(), "fp16", "名字 lora", "tiny")
    save_lora_file(tmp_path / "导出 out" / "名字 lora.safetensors", state, metadata_header)
    assert load_lora_file(tmp_path / "导出 out" / "名字 lora.safetensors")[1]["ss_output_name"] == "名字 lora"


def test_bad_image_files_become_report_rows(tmp_path, monkeypatch):
    Image.new("RGB", (300, 300), (1, 2, 3)).save(tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    whole = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 3])
    Image.new("RGB", (700, 700), (9, 9, 9)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # 700x700 = 490k > 2x the limit: a "bomb"
    checks = inspect_images(ImageFolderDataset(str(tmp_path)).load(), NormalizationParams(min_size=64)).set_index("file_name")
    assert checks.loc["good.png"].status == "kept"
    for name in ("truncated.png", "bomb.png"):
        assert checks.loc[name].reason_code == "corrupt", name
    assert checks.loc["empty.png"].reason_code == "empty" and "0 bytes" in checks.loc["empty.png"].reason
    assert "DecompressionBomb" in checks.loc["bomb.png"].reason


def test_non_utf8_caption_and_non_image_folders(tmp_path, caplog):
    Image.new("RGB", (600, 600)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("caf\xe9 latin-1".encode("latin-1"))
    manifest = scan_images(ImageFolderDataset(str(tmp_path)).load())
    # read with the detected encoding, and flagged for a look (never silently replaced by an auto caption)
    assert manifest.iloc[0].has_sidecar and manifest.iloc[0].sidecar == "café latin-1"
    assert "not UTF-8" in manifest.iloc[0].sidecar_note and "not UTF-8" in caplog.text
    only_text = tmp_path / "texts"
    only_text.mkdir()
    (only_text / "notes.txt").write_text("x")
    with pytest.raises(Exception, match="holds no images"):  # Kedro wraps it in a DatasetError
        ImageFolderDataset(str(only_text)).load()


def test_bad_training_settings_stop_early(tiny_models, tiny_examples, tmp_path):
    with pytest.raises(ConfigError, match="lora_rank"):
        from lora_pipeline.core.config import parse_params
        parse_params(TrainingParams, {"base_model": "x", "lora_rank": -4}, "training")
    with pytest.raises(ConfigError, match="batch_size \\(64\\) is larger than the training set"):
        params = make_params(tiny_models, tmp_path, batch_size=64)
        train(load_diffusion_model(params.base_model), tiny_examples, params, DiskCache(tmp_path / "c"), dataset_hash="d")
    with pytest.raises(ModelNotFoundError, match="needs the network"):
        load_diffusion_model("someone/some-sd-model")


def test_init_lora_latest_resolves_the_newest_export(tmp_path):
    for version in ("2026-01-01T00.00.00.000Z", "2026-03-01T00.00.00.000Z"):
        folder = tmp_path / "hero.safetensors" / version
        folder.mkdir(parents=True)
        (folder / "hero.safetensors").write_bytes(b"x")
    params = TrainingParams(base_model="x", output_name="hero", init_lora="latest", export_dir=str(tmp_path))
    assert resolve_init_lora(params.init_lora, params.export_dir, params.output_name).parent.name == "2026-03-01T00.00.00.000Z"
    with pytest.raises(DataError, match="no export of 'other'"):
        resolve_init_lora(params.init_lora, params.export_dir, "other")



def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_kill_9_during_a_retrain_beside_an_older_longer_run(tiny_models, tiny_examples, tmp_path):
    """A retrain (more images) is killed while the subject also holds an older run with higher step numbers:
    it resumes its own checkpoint, never touches the older run, and ends bit-identical to an uninterrupted retrain."""
    settings = dict(save_steps=4, dropout=0.1, keep_checkpoints=2)
    older = make_params(tiny_models, tmp_path / "killed", max_steps=24, **settings)
    train(load_diffusion_model(older.base_model), tiny_examples[:6], older, DiskCache(tmp_path / "killed" / "cache"),
          dataset_hash="v1")
    subject = tmp_path / "killed" / "checkpoints" / "test_lora"
    [older_run] = subject.glob("run-*")
    older_files = _files(older_run)

    retrain = make_params(tiny_models, tmp_path / "killed", max_steps=20, resume="auto", **settings)
    survived = _kill_during_training(retrain, tiny_examples, tmp_path, dataset_hash="v2")
    assert survived and all(c.parent != older_run for c in survived)
    resumed = train(load_diffusion_model(retrain.base_model), tiny_examples,
                    retrain.model_copy(update={"resume": "latest"}), DiskCache(tmp_path / "killed" / "cache"),
                    dataset_hash="v2")
    assert resumed.resumed_from is not None and Path(resumed.resumed_from).parent == survived[0].parent
    assert _files(older_run) == older_files  # neither resumed from, nor pruned, nor rewritten

    straight = train(load_diffusion_model(retrain.base_model), tiny_examples,
                     make_params(tiny_models, tmp_path / "straight", max_steps=20, **settings),
                     DiskCache(tmp_path / "straight" / "cache"), dataset_hash="v2")
    for key, tensor in straight.lora_state.items():
        assert torch.equal(tensor, resumed.lora_state[key]), key


LOCK_HOLDER = textwrap.dedent("""
    import sys, time
    from lora_pipeline.core.lock import subject_lock
    with subject_lock(sys.argv[1], "test_lora"):
        print("locked", flush=True)
        time.sleep(120)
""")


def test_one_run_per_subject_and_a_stale_lock_is_taken_over(tiny_models, tiny_examples, tmp_path, monkeypatch, caplog):
    from lora_pipeline.core.lock import SubjectBusyError, subject_lock
    from lora_pipeline.core.spec import DatasetInfo
    from lora_pipeline.pipelines.training import nodes

    params = make_params(tiny_models, tmp_path, max_steps=2)
    subject = tmp_path / "checkpoints" / "test_lora"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(subject)], env=env, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        # the node stops before it loads anything, naming the holder
        monkeypatch.setattr(nodes, "load_diffusion_model", lambda *a, **k: pytest.fail("must not load the model"))
        with pytest.raises(SubjectBusyError, match=rf"subject test_lora is being trained by PID {holder.pid} since"):
            nodes.train_lora(None, None, DatasetInfo(), None, params)
        with pytest.raises(SubjectBusyError, match=f"PID {holder.pid}"):
            train(load_diffusion_model(params.base_model), tiny_examples, params, DiskCache(tmp_path / "cache"),
                  dataset_hash="d")
        assert sorted(p.name for p in subject.iterdir()) == [".train.lock", ".train.lock.holder"]  # nothing else
        with subject_lock(tmp_path / "checkpoints" / "other", "other"):  # other subjects are free meanwhile
            pass
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level(logging.INFO, logger="lora_pipeline.core.lock"):
        result = train(load_diffusion_model(params.base_model), tiny_examples, params, DiskCache(tmp_path / "cache"),
                       dataset_hash="d")  # the dead holder's lock file is taken over
    assert result.steps == 2 and list(subject.glob("run-*/checkpoint-*"))
    assert f"from PID {holder.pid}, which stopped without releasing it" in caplog.text


def test_a_cleanly_released_lock_is_not_taken_over(tmp_path, caplog):
    from lora_pipeline.core.lock import subject_lock

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    script = "import sys\nfrom lora_pipeline.core.lock import subject_lock\nwith subject_lock(sys.argv[1], 'x'):\n    pass"
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, check=True)
    with caplog.at_level(logging.INFO, logger="lora_pipeline.core.lock"):
        with subject_lock(tmp_path, "x"):
            pass
    assert "Taking over" not in caplog.text
    assert not (tmp_path / ".train.lock.holder").exists()


def test_runs_left_running_by_a_killed_process_are_closed_on_the_next_start(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from lora_pipeline.pipelines.tracking import close_abandoned_runs, process_tags

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("x")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    client = MlflowClient()
    killed = client.create_run(experiment, tags={**process_tags(), "lora_pipeline.pid": dead.stdout.strip()})
    alive = client.create_run(experiment, tags=process_tags())  # this very process
    elsewhere = client.create_run(experiment, tags={"lora_pipeline.host": "another-machine", "lora_pipeline.pid": "1"})
    assert close_abandoned_runs([experiment]) == [killed.info.run_id]
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
    assert {client.get_run(r.info.run_id).info.status for r in (alive, elsewhere)} == {"RUNNING"}


SIGTERM_SCRIPT = """
import os, signal, sys, mlflow
from lora_pipeline.pipelines.tracking import StepMetricsLogger
mlflow.set_tracking_uri(sys.argv[1])
mlflow.set_experiment("sigterm")
with mlflow.start_run() as run:
    print(run.info.run_id, flush=True)
    with StepMetricsLogger("t") as log:
        for step in range(5):
            log({"loss": 1.0 / (step + 1)}, step)
        os.kill(os.getpid(), signal.SIGTERM)
        sys.exit("not reached")
"""


@pytest.mark.slow
def test_sigterm_writes_the_buffered_step_metrics(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # no experiment from earlier tests
    result = subprocess.run([sys.executable, "-c", SIGTERM_SCRIPT, uri], capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 128 + 15, result.stderr[-2000:]
    mlflow.set_tracking_uri(uri)
    run_id = result.stdout.split()[0]
    assert len(MlflowClient().get_metric_history(run_id, "t.loss")) == 5
    assert MlflowClient().get_run(run_id).info.status == "FAILED"
