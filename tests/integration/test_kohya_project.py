"""Coming from kohya: a lora-scripts TOML with a `train/10_aki/` folder and `reg/1_woman/` class images is
imported, trained on the demo model and exported; the LoRA's header records what kohya's would, and the class
token (not the demo's global trigger) is the LoRA's trigger."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from kedro.framework.session import KedroSession
from kedro_helpers import kedro_runs, stage_run
from PIL import Image

from lora_pipeline.diffusion.lora_files import load_lora_file

pytestmark = pytest.mark.slow  # a whole pipeline through Kedro (see make test-fast)

TOML = """
[model_arguments]
pretrained_model_name_or_path = "data/06_models/tiny-sd"

[dataset_arguments]
train_data_dir = "{root}/train"
reg_data_dir = "{root}/reg"
resolution = "128,96"
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 256
bucket_reso_steps = 32
caption_extension = ".caption"
shuffle_caption = true
keep_tokens = 1
flip_aug = true

[training_arguments]
output_name = "aki"
max_train_steps = 6
train_batch_size = 2
clip_skip = 2
seed = 7
prior_loss_weight = 0.5
save_every_n_epochs = 1
cache_latents = true

[network_arguments]
network_module = "networks.lora"
network_dim = 4
network_alpha = 8
network_train_unet_only = true

[optimizer_arguments]
optimizer_type = "Lion"
optimizer_args = ["weight_decay=0.01"]
learning_rate = 1e-4
lr_scheduler = "cosine_with_restarts"
lr_scheduler_num_cycles = 2
"""


def _images(folder: Path, count: int, seed: int, caption: str | None = None) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        pixels = rng.integers(0, 255, (384, 512, 3), dtype=np.uint8)
        pixels[100:300, 150:350] = (200, 40 * index, 40)
        Image.fromarray(pixels).resize((768, 576)).save(folder / f"{index}.png")
        if caption:
            (folder / f"{index}.caption").write_text(caption, encoding="utf-8")


def test_kohya_config_and_folders_import_train_and_export(project):
    kohya = project / "kohya"
    _images(kohya / "train" / "10_aki", 2, 0, caption="aki, red hair, smiling")
    _images(kohya / "reg" / "1_woman", 3, 1)  # no captions: the class token is their prompt ...
    (kohya / "reg" / "1_woman" / "0.caption").write_text("woman, beach", encoding="utf-8")  # ... but this one's
    (kohya / "aki.toml").write_text(TOML.format(root=kohya.as_posix()), encoding="utf-8")
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "KEDRO_ENV": "demo"}
    cli = Path(sys.executable).parent / "lora-pipeline"
    imported = subprocess.run([str(cli), "import-kohya", str(kohya / "aki.toml"), "--conf", "conf/demo"],
                              cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert "Wrote subject aki" in imported.stdout and "trigger: 'aki' (the class token of folder(s) 10_aki" in \
        imported.stdout

    with KedroSession.create(project_path=project, env="demo") as session:
        session.run(pipeline_names=["captioning", "normalization", "training", "export"], namespaces=["aki"])
    while mlflow.active_run():
        mlflow.end_run()

    info = json.loads((project / "data/03_primary/aki/dataset/dataset_info.json").read_text())
    folders = {(f["role"], f["folder"]): f for f in info["folders"]}
    assert folders[("instance", "10_aki")]["repeats"] == 10 and folders[("instance", "10_aki")]["kept"] == 2
    assert folders[("reg", "1_woman")]["class_tokens"] == "woman" and folders[("reg", "1_woman")]["kept"] == 3
    assert info["resolution"] == [128, 96]
    [version] = sorted((project / "data/07_model_output/aki.safetensors").iterdir())
    state, header = load_lora_file(version / "aki.safetensors")
    assert all(key.startswith("lora_unet_") for key in state)  # network_train_unet_only
    assert header["ss_clip_skip"] == "2" and header["ss_num_train_images"] == "2"
    assert header["ss_num_reg_images"] == "3" and header["ss_prior_loss_weight"] == "0.5"
    assert header["ss_flip_aug"] == "True" and header["ss_optimizer"].endswith("Lion")
    assert json.loads(header["ss_dataset_dirs"]) == {"10_aki": {"n_repeats": 10, "img_count": 2}}
    assert json.loads(header["ss_reg_dataset_dirs"]) == {"1_woman": {"n_repeats": 1, "img_count": 3}}
    subsets = json.loads(header["ss_datasets"])[0]["subsets"]
    assert {(s["image_dir"], s["class_tokens"], s["is_reg"]) for s in subsets} == {("10_aki", "aki", False),
                                                                                  ("1_woman", "woman", True)}
    assert "aki" in json.loads(header["ss_tag_frequency"])["dataset"]
    assert header["modelspec.trigger_phrase"] == "aki"  # the class token, not the demo's global "lorachar"

    [last] = kedro_runs(project)
    assert last.data.params["aki.training.optimizer"] == "lion" and last.data.params["aki.training.clip_skip"] == "2"
    training = stage_run(project, last, "aki", "training")
    assert training.data.params["aki.training.optimizer_effective"] == "lion"
    metadata = pd.read_csv(project / "data/03_primary/aki/dataset/metadata.csv").set_index("file_name").text
    assert not metadata.str.contains("lorachar").any()
    assert metadata["10_aki/0.png"].startswith("aki, red hair")
    assert metadata["reg/1_woman/0.png"] == "woman, beach"  # its .caption file (caption_extension applies to reg)
    assert metadata["reg/1_woman/1.png"] == "woman"  # class images without one train with their class prompt
