"""import-kohya: a realistic lora-scripts / sd-scripts TOML becomes a subject; nothing is dropped silently."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lora_pipeline.config import parse_subjects
from lora_pipeline.errors import ConfigError
from lora_pipeline.kohya_import import read_toml, translate, write_subject
from lora_pipeline.subjects import subject_parameters

LORA_SCRIPTS_TOML = """
[model_arguments]
v2 = false
pretrained_model_name_or_path = "./sd-models/model.safetensors"

[dataset_arguments]
train_data_dir = "{train}"
reg_data_dir = "{reg}"
resolution = "768,512"
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 1024
bucket_reso_steps = 64
caption_extension = ".txt"
shuffle_caption = true
keep_tokens = 1

[training_arguments]
output_name = "aki-v2"
output_dir = "./output"
save_model_as = "safetensors"
max_train_epochs = 10
train_batch_size = 2
save_every_n_epochs = 2
mixed_precision = "bf16"
clip_skip = 2
seed = 1337
xformers = true
gradient_checkpointing = true
gradient_accumulation_steps = 2
max_grad_norm = 1.0
cache_latents = true
prior_loss_weight = 1.0
min_snr_gamma = 5
noise_offset = 0.05
flip_aug = true

[network_arguments]
network_module = "networks.lora"
network_dim = 32
network_alpha = 16
network_dropout = 0.1
network_train_unet_only = false

[optimizer_arguments]
optimizer_type = "Prodigy"
optimizer_args = ["weight_decay=0.01", "betas=0.9,0.99", "use_bias_correction=True"]
learning_rate = 1e-4
unet_lr = 2e-4
text_encoder_lr = 5e-5
lr_scheduler = "cosine_with_restarts"
lr_warmup_steps = 50
lr_scheduler_num_cycles = 3
"""


@pytest.fixture
def config(tmp_path) -> Path:
    train = tmp_path / "train"
    (train / "10_aki").mkdir(parents=True)
    path = tmp_path / "aki.toml"
    (tmp_path / "reg" / "1_woman").mkdir(parents=True)
    path.write_text(LORA_SCRIPTS_TOML.format(train=train.as_posix(), reg=(tmp_path / "reg").as_posix()),
                    encoding="utf-8")
    return path


def test_realistic_lora_scripts_config_maps_every_value(config):
    result = translate(read_toml(config))
    assert result.subject == "aki_v2"  # a valid namespace and <lora:NAME>
    entry = result.entry
    assert entry["base_model"] == "./sd-models/model.safetensors" and entry["images"].endswith("/train")
    assert entry["reg_images"].endswith("/reg")
    assert entry["training"] == {
        "seed": 1337, "batch_size": 2, "epochs": 10, "lora_rank": 32, "alpha": 16, "dropout": 0.1,
        "text_encoder_lr": 5e-5, "lr_warmup_steps": 50, "min_snr_gamma": 5, "noise_offset": 0.05,
        "gradient_checkpointing": True, "gradient_accumulation_steps": 2, "max_grad_norm": 1.0,
        "shuffle_tags": True, "keep_tokens": 1, "cache_latents": True, "save_every_n_epochs": 2,
        "lr_scheduler_num_cycles": 3, "prior_loss_weight": 1.0, "clip_skip": 2, "flip_aug": True,
        "learning_rate": 2e-4, "mixed_precision": "bf16", "optimizer": "prodigy",
        "optimizer_args": {"weight_decay": 0.01, "betas": (0.9, 0.99), "use_bias_correction": True},
        "lr_scheduler": "cosine_with_restarts", "train_text_encoder": True}
    assert entry["normalization"] == {"resolution": [768, 512], "mode": "buckets", "bucket_min": 256,
                                      "bucket_max": 1024, "bucket_step": 64}
    unmapped = dict(result.unmapped)
    for key in ("pretrained_model_name_or_path", "output_dir", "xformers", "save_model_as", "v2"):
        assert unmapped.get(key), key
    for key in ("clip_skip", "flip_aug", "save_every_n_epochs", "lr_scheduler_num_cycles", "prior_loss_weight",
                "train_data_dir", "reg_data_dir", "resolution", "optimizer_type", "optimizer_args"):
        assert key not in unmapped, key  # carried over
    # the entry is a valid subject whose merged parameters pass the run's own validation
    subject = parse_subjects({"subjects": {result.subject: entry}})[result.subject]
    params = subject_parameters({"training": {"base_model": "x"}}, result.subject, subject)
    from lora_pipeline.config import TrainingParams

    assert TrainingParams(**params["training"]).lora_rank == 32
    from lora_pipeline.config import NormalizationParams

    assert NormalizationParams(**params["normalization"]).size == (768, 512)


def test_dataset_config_subsets_and_flat_configs(tmp_path):
    dataset = tmp_path / "dataset.toml"
    dataset.write_text("""
[general]
shuffle_caption = true
caption_extension = '.caption'

[[datasets]]
resolution = 1024
batch_size = 4

  [[datasets.subsets]]
  image_dir = '/data/train/aki'
  num_repeats = 10
  class_tokens = 'aki woman'
  keep_tokens = 2

  [[datasets.subsets]]
  image_dir = '/data/reg/woman'
  is_reg = true
""", encoding="utf-8")
    result = translate(read_toml(dataset), subject="aki")
    assert result.entry["images"] == "/data/train/aki" and result.entry["trigger"] == "aki woman"
    assert result.entry["training"]["repeats"] == 10 and result.entry["training"]["keep_tokens"] == 2
    assert result.entry["training"]["batch_size"] == 4 and result.entry["training"]["shuffle_tags"] is True
    assert result.entry["normalization"]["resolution"] == 1024
    assert result.entry["reg_images"] == "/data/reg/woman"
    assert result.entry["captioning"] == {"caption_extension": ".caption"}


def test_import_writes_subjects_yml_keeping_other_subjects(config, tmp_path):
    conf = tmp_path / "local"
    conf.mkdir()
    (conf / "subjects.yml").write_text("subjects:\n  city:\n    trigger: cybercity\n", encoding="utf-8")
    path = write_subject(translate(read_toml(config), subject="aki"), conf)
    written = yaml.safe_load(path.read_text(encoding="utf-8"))["subjects"]
    assert written["city"] == {"trigger": "cybercity"} and written["aki"]["training"]["lora_rank"] == 32


def test_cli_dry_run_prints_the_entry_and_the_reasons(config, tmp_path):
    cli = Path(sys.executable).parent / "lora-pipeline"
    result = subprocess.run([str(cli), "import-kohya", str(config), "--dry-run"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = yaml.safe_load(result.stdout.split("\nNot carried over")[0])
    assert printed["subjects"]["aki_v2"]["training"]["lora_rank"] == 32
    assert "output_dir: outputs go to data/07_model_output" in result.stdout
    assert not (tmp_path / "conf").exists()  # a dry run writes nothing


def test_unreadable_toml_names_the_file(tmp_path):
    bad = tmp_path / "broken.toml"
    bad.write_text("[training_arguments\nseed = 1", encoding="utf-8")
    with pytest.raises(ConfigError, match="broken.toml: not a readable TOML"):
        read_toml(bad)
