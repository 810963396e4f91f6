"""import-kohya: a realistic lora-scripts / sd-scripts TOML becomes a subject; nothing is dropped silently."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from lora_pipeline.core.config import CaptioningParams, NormalizationParams, parse_subjects
from lora_pipeline.core.errors import ConfigError, DataError
from lora_pipeline.prep.captions import apply_template
from lora_pipeline.prep.kohya_config import NO_EFFECT, read_config, read_toml, run_import, translate, write_subject
from lora_pipeline.project.subjects import subject_parameters

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
                                      "bucket_max": 1024, "bucket_step": 64, "reg_caption_extension": ".txt"}
    unmapped = dict(result.unmapped)
    for key in ("pretrained_model_name_or_path", "output_dir", "xformers", "save_model_as"):
        assert unmapped.get(key), key
    for key in ("clip_skip", "flip_aug", "save_every_n_epochs", "lr_scheduler_num_cycles", "prior_loss_weight",
                "train_data_dir", "reg_data_dir", "resolution", "optimizer_type", "optimizer_args",
                "v2"):  # v2 = false is the SD1.x default: accepted without a word
        assert key not in unmapped, key  # carried over
    # the entry is a valid subject whose merged parameters pass the run's own validation
    subject = parse_subjects({"subjects": {result.subject: entry}})[result.subject]
    params = subject_parameters({"training": {"base_model": "x"}}, result.subject, subject)
    from lora_pipeline.core.config import TrainingParams

    assert TrainingParams(**params["training"]).lora_rank == 32
    from lora_pipeline.core.config import NormalizationParams

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
    assert result.entry["normalization"]["reg_caption_extension"] == ".caption"  # kohya reads reg captions alike


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


# ----------------------------------------------------------------------------- kohya's two-file setup

TRAINING_TOML = """
[model_arguments]
pretrained_model_name_or_path = "/models/aki-base"
v2 = false
v_parameterization = false

[additional_network_arguments]
network_module = "networks.lora"
network_dim = 32
network_alpha = 16
network_train_unet_only = true

[optimizer_arguments]
optimizer_type = "Lion"
learning_rate = 3e-5

[training_arguments]
output_name = "aki"
clip_skip = 2
max_train_epochs = 4
{dataset_line}
"""

DATASET_TOML = """
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = [768, 512]
batch_size = 2
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 1024
bucket_reso_steps = 64

  [[datasets.subsets]]
  image_dir = "{images}"
  class_tokens = "aki"
  num_repeats = 8
  flip_aug = true
  color_aug = true
  random_crop = true
  caption_dropout_rate = 0.05
  caption_prefix = "masterpiece"
  shuffle_caption = false
"""


def _lora_scripts(tmp_path: Path, dataset_line: str = 'dataset_config = "aki_dataset.toml"') -> Path:
    """lora-scripts' layout: the two TOMLs in config/, the images elsewhere; returns the training TOML."""
    images = tmp_path / "lora-scripts" / "train" / "aki"
    images.mkdir(parents=True)
    config = tmp_path / "lora-scripts" / "config"
    config.mkdir()
    (config / "aki_dataset.toml").write_text(DATASET_TOML.format(images=images.as_posix()), encoding="utf-8")
    (config / "aki.toml").write_text(TRAINING_TOML.format(dataset_line=dataset_line), encoding="utf-8")
    return config / "aki.toml"


def test_dataset_config_is_followed_relative_to_the_training_toml(tmp_path, monkeypatch):
    training_toml = _lora_scripts(tmp_path)
    monkeypatch.chdir(tmp_path)  # not the TOML's folder: the relative dataset_config must still be found
    result = translate(read_config(training_toml))
    entry = result.entry
    assert entry["images"].endswith("lora-scripts/train/aki") and entry["trigger"] == "aki"
    assert entry["base_model"] == "/models/aki-base"
    training = entry["training"]
    assert training["lora_rank"] == 32 and training["optimizer"] == "lion" and training["learning_rate"] == 3e-5
    assert training["clip_skip"] == 2 and training["train_text_encoder"] is False
    assert training["repeats"] == 8 and training["batch_size"] == 2
    unmapped = dict(result.unmapped)
    assert "dataset_config" not in unmapped and not any("not a known" in reason for reason in unmapped.values())
    assert any("dataset_config: read" in note and "aki_dataset.toml" in note for note in result.notes)


def test_missing_dataset_config_names_the_file_and_where_it_was_looked_for(tmp_path):
    training_toml = _lora_scripts(tmp_path, 'dataset_config = "missing.toml"')
    with pytest.raises(ConfigError, match=r"aki.toml: dataset_config = 'missing.toml' not found \(looked for "
                                          r".*config/missing.toml"):
        read_config(training_toml)


def test_second_import_merges_into_the_subject_and_says_what_changed(tmp_path):
    training_toml = _lora_scripts(tmp_path, "")  # the training TOML alone first, as users do
    conf = tmp_path / "conf"
    run_import(training_toml, "aki", conf, dry_run=False)
    report = run_import(training_toml.parent / "aki_dataset.toml", "aki", conf, dry_run=False)
    aki = yaml.safe_load((conf / "subjects.yml").read_text(encoding="utf-8"))["subjects"]["aki"]
    # what the training TOML set survives the dataset config's import
    assert aki["base_model"] == "/models/aki-base"
    training = aki["training"]
    assert (training["optimizer"], training["learning_rate"], training["lora_rank"], training["clip_skip"]) == \
        ("lion", 3e-5, 32, 2)
    assert training["train_text_encoder"] is False  # a dataset config says nothing about the text encoder
    # and the dataset config's values arrive
    assert aki["images"].endswith("train/aki") and aki["trigger"] == "aki" and training["repeats"] == 8
    assert aki["normalization"]["resolution"] == [768, 512]
    assert "(merged into its entry)" in report
    changed = report.split("Changed in the existing subject aki")[1]
    assert "  - training.repeats: (unset) -> 8" in changed and '  - trigger: "" -> "aki"' in changed
    assert "lora_rank" not in changed  # only what changed is listed
    again = run_import(training_toml.parent / "aki_dataset.toml", "aki", conf, dry_run=True)
    assert "Would change in the existing subject aki" in again and "nothing (it already holds these values)" in again


def test_import_keeps_the_comments_of_subjects_yml(config, tmp_path):
    conf = tmp_path / "local"
    conf.mkdir()
    (conf / "subjects.yml").write_text("# my LoRA library\nsubjects:\n  city:  # the SDXL one\n    trigger: cybercity\n"
                                       "    training: {max_steps: 20}   # short\n", encoding="utf-8")
    run_import(config, "aki", conf, dry_run=False)
    text = (conf / "subjects.yml").read_text(encoding="utf-8")
    assert text.startswith("# my LoRA library\n") and "city:  # the SDXL one" in text and "# short" in text
    assert yaml.safe_load(text)["subjects"]["aki"]["training"]["lora_rank"] == 32


# ----------------------------------------------------------------------------- dataset keys

def test_dataset_config_keys_are_mapped_or_reported(tmp_path):
    training_toml = _lora_scripts(tmp_path)
    dataset = training_toml.parent / "aki_dataset.toml"
    dataset.write_text(dataset.read_text(encoding="utf-8") + "  token_warmup_step = 3\n  shiny_new_key = 1\n",
                       encoding="utf-8")
    result = translate(read_config(dataset), subject="aki")
    entry = result.entry
    assert entry["normalization"] == {"resolution": [768, 512], "mode": "buckets", "bucket_min": 256,
                                      "bucket_max": 1024, "bucket_step": 64, "reg_caption_extension": ".txt"}
    training = entry["training"]
    assert training["flip_aug"] is True and training["caption_dropout"] == 0.05
    assert training["shuffle_tags"] is False  # the subset's value wins over [general], as in kohya
    assert training["keep_tokens"] == 1 and "train_text_encoder" not in training
    template = entry["captioning"]["template"]
    assert apply_template(template, "aki", "red hair, smiling") == "aki, masterpiece, red hair, smiling"
    unmapped = dict(result.unmapped)
    assert "color augmentation" in unmapped["datasets.subsets.color_aug"]
    assert "center-cropped" in unmapped["datasets.subsets.random_crop"]
    assert "token warm-up" in unmapped["datasets.subsets.token_warmup_step"]
    assert unmapped["datasets.subsets.shiny_new_key"] == "not a known sd-scripts dataset-config key"
    # everything else of the subset and its dataset was carried over
    assert set(unmapped) == {"datasets.subsets.color_aug", "datasets.subsets.random_crop",
                             "datasets.subsets.token_warmup_step", "datasets.subsets.shiny_new_key"}


def test_v2_and_v_parameterization_true_are_reported_false_is_silent():
    silent = translate({"pretrained_model_name_or_path": "/m", "v2": False, "v_parameterization": False})
    assert not {"v2", "v_parameterization"} & set(dict(silent.unmapped))
    loud = dict(translate({"pretrained_model_name_or_path": "/m", "v2": True, "v_parameterization": True}).unmapped)
    assert "SD2 is not supported" in loud["v2"]
    assert "prediction_type: v_prediction" in loud["v_parameterization"]


def test_a_resolution_that_is_no_resolution_names_the_key():
    assert translate({"resolution": [640, 640]}).entry["normalization"]["resolution"] == 640
    with pytest.raises(ConfigError, match=r"datasets.resolution = 'big' is not a resolution: write one size"):
        translate({"datasets": [{"resolution": "big", "subsets": [{"image_dir": "/x"}]}]})


# ----------------------------------------------------------------------------- the subject's trigger

def _merged(result, shared: dict) -> dict:
    subject = parse_subjects({"subjects": {result.subject: result.entry}})[result.subject]
    return subject_parameters(shared, result.subject, subject)


GLOBAL = {"captioning": {"trigger": "lorachar"}, "normalization": {"prompt": {"trigger": "lorachar"}}}


def test_trigger_is_the_class_token_never_the_global_one(config, tmp_path):
    result = translate(read_toml(config), subject="aki")  # train/10_aki/
    assert result.entry["trigger"] == "aki"
    assert any("trigger: 'aki' (the class token of folder(s) 10_aki" in note for note in result.notes)
    params = _merged(result, GLOBAL)
    assert params["captioning"]["trigger"] == "aki" and params["normalization"]["prompt"]["trigger"] == "aki"


def test_without_one_class_token_the_trigger_is_explicitly_none(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "two" / "5_aki").mkdir(parents=True)
    (tmp_path / "two" / "5_bob").mkdir()
    for folder, says in (("plain", "no N_concept folder"), ("two", "have different class tokens")):
        result = translate({"train_data_dir": (tmp_path / folder).as_posix()}, subject="x")
        assert result.entry["trigger"] == "" and any(says in note for note in result.notes), folder
        params = _merged(result, GLOBAL)
        assert params["captioning"]["trigger"] == "" and params["normalization"]["prompt"]["trigger"] == ""


def test_a_merge_keeps_the_users_trigger_when_the_config_names_no_class_token(tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "subjects.yml").write_text("subjects:\n  aki:\n    trigger: akichan\n", encoding="utf-8")
    write_subject(translate({"network_dim": 16}, subject="aki"), conf)
    aki = yaml.safe_load((conf / "subjects.yml").read_text(encoding="utf-8"))["subjects"]["aki"]
    assert aki["trigger"] == "akichan" and aki["training"]["lora_rank"] == 16


# ----------------------------------------------------------------------------- class images' caption files

def _png(path: Path, caption: tuple[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (96, 96), (200, 30, 30)).save(path)
    if caption:
        path.with_suffix(caption[0]).write_text(caption[1], encoding="utf-8")


def test_class_images_read_the_imported_caption_extension(tmp_path, caplog):
    from lora_pipeline.datasets.image_folder import ImageFolderDataset
    from lora_pipeline.pipelines.normalization.nodes import inspect_images

    _png(tmp_path / "train" / "10_aki" / "a.png", (".caption", "aki, red hair"))
    _png(tmp_path / "reg" / "1_woman" / "0.png", (".caption", "woman, beach"))
    _png(tmp_path / "reg" / "1_woman" / "1.png")
    result = translate({"train_data_dir": (tmp_path / "train").as_posix(),
                        "reg_data_dir": (tmp_path / "reg").as_posix(), "caption_extension": ".caption"}, subject="aki")
    # the project's shared default is .txt (conf/base/parameters_normalization.yml)
    shared = {"normalization": {"min_size": 64, "base_model_family": "sd1", "reg_caption_extension": ".txt"}}
    params = NormalizationParams(**_merged(result, shared)["normalization"])
    raw, reg = (ImageFolderDataset(str(tmp_path / folder)).load() for folder in ("train", "reg"))
    checks = inspect_images(raw, params, None, reg).set_index("file_name")
    assert checks.loc["1_woman/0.png"].sidecar_caption == "woman, beach"
    assert checks.loc["1_woman/1.png"].sidecar_caption == ""  # no caption file: its class token is its prompt
    # with the other extension configured, the .caption files are named in a warning, not ignored silently
    with caplog.at_level("WARNING"):
        txt = params.model_copy(update={"reg_caption_extension": ".txt"})
        checks = inspect_images(raw, txt, None, reg).set_index("file_name")
    assert checks.loc["1_woman/0.png"].sidecar_caption == ""
    assert "1 class image(s)" in caplog.text and "reg_caption_extension: '.caption'" in caplog.text


# ----------------------------------------------------------------------------- lora-scripts' flat YAML

FLAT_YAML = """
train_data_dir: ./data/images
metadata_path: ./data/metadata.csv
base_model: runwayml/stable-diffusion-v1-5
lora_rank: 16
alpha: 8
batch_size: 2
epochs: 12
learning_rate: 2e-4  # YAML 1.1 reads this as a string
output_dir: ./output
save_steps: 500
dropout: 0.1
"""


def _flat_yaml(tmp_path: Path, header: str = "file_name,text") -> Path:
    data = tmp_path / "tutorial" / "data"
    _png(data / "images" / "001.png")
    _png(data / "images" / "002.png")
    (data / "metadata.csv").write_text(f"{header}\nimages/001.png,\"a cat, sitting\"\n002.png,a dog\n",
                                       encoding="utf-8")
    config = tmp_path / "tutorial" / "my_lora_config.yaml"
    config.write_text(FLAT_YAML, encoding="utf-8")
    return config


def test_flat_yaml_config_maps_every_key(tmp_path, monkeypatch):
    config = _flat_yaml(tmp_path)
    monkeypatch.chdir(tmp_path)  # its relative paths are found beside the config
    result = translate(read_config(config), subject="tutorial")
    entry = result.entry
    data = (tmp_path / "tutorial" / "data").resolve().as_posix()
    assert entry["images"] == f"{data}/images" and entry["captioning"] == {"metadata_csv": f"{data}/metadata.csv"}
    assert entry["base_model"] == "runwayml/stable-diffusion-v1-5" and entry["trigger"] == ""
    assert entry["training"] == {"lora_rank": 16, "alpha": 8, "batch_size": 2, "epochs": 12, "learning_rate": 2e-4,
                                 "save_steps": 500, "dropout": 0.1}
    assert dict(result.unmapped) == {"output_dir": NO_EFFECT["output_dir"]}  # the one key with no equivalent
    assert any("2 caption(s)" in note for note in result.notes)


def test_flat_yaml_dry_run_on_the_command_line(tmp_path):
    config = _flat_yaml(tmp_path)
    cli = Path(sys.executable).parent / "lora-pipeline"
    result = subprocess.run([str(cli), "import-kohya", str(config), "--dry-run"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = yaml.safe_load(result.stdout.split("\n\n")[0])
    assert printed["subjects"]["imported"]["training"]["lora_rank"] == 16
    assert "  - output_dir: outputs go to" in result.stdout


def test_metadata_csv_with_wrong_columns_names_the_file_and_the_allowed_ones(tmp_path):
    config = _flat_yaml(tmp_path, header="image,description")
    with pytest.raises(DataError, match=r"metadata.csv: a captions metadata.csv needs a 'file_name' column and a "
                                        r"caption column named 'text', 'caption', 'prompt'; it has 'image', "
                                        r"'description'"):
        translate(read_config(config))


def test_metadata_csv_captions_rank_below_reviewed_above_auto(tmp_path, monkeypatch):
    from lora_pipeline.core.cache import DiskCache
    from lora_pipeline.datasets.image_folder import ImageFolderDataset
    from lora_pipeline.pipelines.captioning import nodes

    images = tmp_path / "images"
    for name in ("001.png", "002.png", "003.png", "004.png"):
        _png(images / name)
    (images / "004.txt").write_text("from the sidecar file", encoding="utf-8")
    (tmp_path / "metadata.csv").write_text("file_name,caption\nimages/001.png,a cat\nimages/002.png,a dog\n"
                                           "images/004.png,from the csv\n", encoding="utf-8")
    monkeypatch.setattr(nodes, "resolve_model", lambda *args: None, raising=False)  # no model is needed
    monkeypatch.setattr(nodes, "load_captioner", lambda params: type("Auto", (), {
        "name": "auto", "caption": staticmethod(lambda batch: ["auto words"] * len(batch))})())
    params = CaptioningParams(backend="blip", model="unused", trigger="", metadata_csv=str(tmp_path / "metadata.csv"))
    raw = ImageFolderDataset(str(images)).load()
    manifest = nodes.scan_images(raw, None, params)
    reviewed = pd.DataFrame({"file_name": ["002.png"], "text": ["reviewed by hand"]})
    table, _ = nodes.caption_images(manifest, reviewed, DiskCache(tmp_path / "cache"), raw, params)
    by_name = table.set_index("file_name")
    assert (by_name.loc["001.png"].text, by_name.loc["001.png"].source) == ("a cat", "sidecar")
    assert (by_name.loc["002.png"].text, by_name.loc["002.png"].source) == ("reviewed by hand", "reviewed")
    assert (by_name.loc["003.png"].text, by_name.loc["003.png"].source) == ("auto words", "auto")
    assert by_name.loc["004.png"].text == "from the sidecar file"  # a caption file beside the image wins
