"""Import a kohya sd-scripts / lora-scripts config as a subject of this project.

Reads the sectioned (``[model_arguments]``, ``[network_arguments]`` ...) or flat training TOML, the dataset config
it names (``dataset_config = "x.toml"``, or given on its own: ``[[datasets]]`` / ``[[datasets.subsets]]``), and the
flat YAML that lora-scripts tutorials show, and turns what has an equivalent here into one ``subjects.yml`` entry
(its overrides by stage). Every key without an equivalent is reported with the reason; nothing is dropped silently.
A second import into an existing subject merges into it and lists what it changed.
"""

from __future__ import annotations

import ast
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, MutableMapping

try:  # Python 3.11+; tomli is the same parser for 3.10
    import tomllib
except ImportError:  # pragma: no cover
    import tomli as tomllib

from lora_pipeline.core.config import SUBJECT_NAME, CaptioningParams, NormalizationParams, SubjectParams, TrainingParams
from lora_pipeline.core.errors import ConfigError
from lora_pipeline.prep.concepts import KOHYA_FOLDER

OPTIMIZERS = {"adamw": "adamw", "adamw8bit": "adamw8bit", "prodigy": "prodigy", "lion": "lion",
              "adafactor": "adafactor"}
SCHEDULERS = {"constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"}
PRECISION = {"no": "no", "fp16": "fp16", "bf16": "bf16", "float": "no"}
# Keys that only steer kohya's own process or files: there is nothing to carry over.
NO_EFFECT = {
    "output_dir": "outputs go to data/07_model_output/<subject>.safetensors/<version>/ (versioned)",
    "logging_dir": "runs are logged to MLflow (mlflow ui)", "log_prefix": "runs are logged to MLflow",
    "log_with": "runs are logged to MLflow", "save_model_as": "exports are always .safetensors (+ a diffusers folder)",
    "save_precision": "set export.precision (fp16 by default)", "xformers": "torch SDPA attention is used",
    "sdpa": "torch SDPA attention is always used", "mem_eff_attn": "torch SDPA attention is used",
    "cache_latents_to_disk": "latents are cached on disk by content hash", "max_data_loader_n_workers":
    "set training.data_workers", "persistent_data_loader_workers": "no equivalent needed",
    "sample_prompts": "set training.sample_prompts in subjects.yml",
    "sample_every_n_steps": "set training.sample_every_steps", "network_module": "",
    "save_state": "checkpoints always hold optimizer/scheduler/RNG state for exact resume",
    "huggingface_repo_id": "uploads are out of scope", "wandb_api_key": "runs are logged to MLflow",
}
# Dataset keys kohya accepts in the dataset config's [general], [[datasets]] and [[datasets.subsets]] (most also
# as training arguments) that map one to one: kohya key -> (group, key) here.
DATASET_KEYS = {
    "shuffle_caption": ("training", "shuffle_tags"), "keep_tokens": ("training", "keep_tokens"),
    "flip_aug": ("training", "flip_aug"), "caption_dropout_rate": ("training", "caption_dropout"),
    "num_repeats": ("training", "repeats"), "batch_size": ("training", "batch_size"),
    "min_bucket_reso": ("normalization", "bucket_min"), "max_bucket_reso": ("normalization", "bucket_max"),
    "bucket_reso_steps": ("normalization", "bucket_step"),
}
# Dataset keys without an equivalent here, with why.
NOT_CARRIED_DATASET = {
    "color_aug": "color augmentation is not available (kohya's also turns latent caching off)",
    "random_crop": "images are scaled to their bucket and center-cropped once (latents are cached): no random crops",
    "face_crop_aug_range": "face-crop augmentation is not available",
    "caption_tag_dropout_rate": "tag dropout is not available; training.caption_dropout drops whole captions",
    "caption_dropout_every_n_epochs": "not available; training.caption_dropout drops captions at random",
    "token_warmup_min": "token warm-up is not available: the whole caption is used from the first step",
    "token_warmup_step": "token warm-up is not available: the whole caption is used from the first step",
    "keep_tokens_separator": "not available; training.keep_tokens counts the leading tags kept in place",
    "secondary_separator": "not available: captions are comma-separated tags",
    "enable_wildcard": "not available: captions are comma-separated tags",
    "alpha_mask": "masked loss is not available; transparent pixels are filled with normalization.background",
    "cache_info": "no effect needed: image checks are cached by path, size and mtime",
    "metadata_file": "kohya's fine-tuning metadata JSON is not read: give captions as sidecar files or a "
                     "metadata.csv (captioning.metadata_csv)",
    "conditioning_data_dir": "ControlNet training is out of scope",
    "network_multiplier": "no per-dataset LoRA multiplier: every image trains at 1.0",
    "validation_seed": "no validation split of the training images; evaluation.holdout_dir holds unseen images",
    "validation_split": "no validation split of the training images; evaluation.holdout_dir holds unseen images",
    "custom_attributes": "not available", "resize_interpolation": "images are resized with Lanczos",
    "debug_dataset": "no effect needed: the quality report lists every image and its prompt",
}
# kohya's dataset-config keys at any level: a config of only these is a dataset config, which says nothing about
# training (an import of it must not reset, say, train_text_encoder of the subject it is merged into).
DATASET_CONFIG_KEYS = {*DATASET_KEYS, *NOT_CARRIED_DATASET, "datasets", "resolution", "enable_bucket",
                       "bucket_no_upscale", "caption_extension", "caption_prefix", "caption_suffix", "image_dir",
                       "class_tokens", "is_reg"}
# The flat YAML of lora-scripts tutorials: its key -> the sd-scripts key it means (the others share the name).
FLAT_YAML_KEYS = {"base_model": "pretrained_model_name_or_path", "lora_rank": "network_dim",
                  "alpha": "network_alpha", "dropout": "network_dropout", "batch_size": "train_batch_size",
                  "epochs": "max_train_epochs", "save_steps": "save_every_n_steps"}
FLAT_YAML_SIGNATURE = {*FLAT_YAML_KEYS, "train_data_dir", "metadata_path", "learning_rate", "output_dir"}
SUBJECT_KEYS_ORDER = ("trigger", "base_model", "images", "reg_images")
WHOLE_VALUES = {"optimizer_args"}  # mappings that a merge replaces rather than merges key by key


@dataclass
class KohyaConfig:
    """A config as read: flat keys (``datasets`` as in kohya's dataset config), and where it came from."""

    values: dict[str, Any]
    folder: Path = field(default_factory=Path.cwd)  # relative paths are also looked up here
    sources: list[Path] = field(default_factory=list)  # the files read, the training config first
    kind: str = "toml"  # toml (sd-scripts) or yaml (lora-scripts tutorials' flat YAML)
    names: dict[str, str] = field(default_factory=dict)  # sd-scripts key -> this file's key (flat YAML aliases)


@dataclass
class KohyaImport:
    """What an import produced: the subject's entry, every key that was not carried over (with why), what was
    decided on the way (``notes``), and the keys written only for a new subject (``defaults``)."""

    subject: str
    entry: dict[str, Any]
    unmapped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    defaults: set[str] = field(default_factory=set)

    def yaml(self) -> str:
        return _dump({"subjects": {self.subject: _styled(self.entry)}})


@dataclass
class _Parts:
    """The entry under construction, by group, and what was said about it."""

    entry: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    normalization: dict[str, Any] = field(default_factory=dict)
    captioning: dict[str, Any] = field(default_factory=dict)
    affixes: dict[str, str] = field(default_factory=dict)  # caption_prefix / caption_suffix
    unmapped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    trigger_from: str = ""  # the key that gave the trigger (class_tokens)


# ----------------------------------------------------------------------------- reading configs

_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")

def read_toml(path: str | Path) -> dict[str, Any]:
    """A kohya TOML as one flat dict (sections merged); ``datasets`` (the dataset config) kept as it is."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable TOML file ({exc}). Give the kohya / lora-scripts training "
                          f"config (.toml), its dataset config (.toml), or a lora-scripts YAML config "
                          f"(.yaml/.yml).") from None
    return _flatten(data)


def _flatten(data: Mapping[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and (key.endswith(("_arguments", "_args")) or key == "general"):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def read_flat_yaml(path: str | Path) -> KohyaConfig:
    """The flat YAML config of lora-scripts tutorials (``train_data_dir``, ``base_model``, ``lora_rank`` ...)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not a readable YAML file ({exc}). Fix the file and re-run.") from None
    # YAML 1.1 (PyYAML) reads 1e-4 (no dot) as a string; lora-scripts tutorials write learning rates that way
    flat = {k: float(v) if isinstance(v, str) and _SCIENTIFIC.match(v) else v
            for k, v in (_flatten(data) if isinstance(data, dict) else {}).items()}
    if not set(flat) & FLAT_YAML_SIGNATURE:
        raise ConfigError(f"{path}: not a lora-scripts YAML config: it has none of the keys "
                          f"{', '.join(sorted(FLAT_YAML_SIGNATURE))} (found: {', '.join(map(str, flat)) or 'none'}). "
                          f"Give that config, or a kohya training TOML.")
    values = {FLAT_YAML_KEYS.get(key, key): value for key, value in flat.items()}
    names = {FLAT_YAML_KEYS[key]: key for key in flat if key in FLAT_YAML_KEYS}
    return KohyaConfig(values, path.parent, [path], "yaml", names)


def read_config(path: str | Path) -> KohyaConfig:
    """A training TOML with the dataset config it names followed, a dataset config alone, or a flat YAML
    (by extension: ``.yaml``/``.yml``)."""
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        return read_flat_yaml(path)
    values = read_toml(path)
    sources = [path]
    if (named := values.pop("dataset_config", None)) is not None:
        dataset = _dataset_config_path(str(named), path)
        values.update(read_toml(dataset))  # kohya: the dataset config's values win over the training config's
        sources.append(dataset)
    return KohyaConfig(values, path.parent, sources)


def _dataset_config_path(named: str, config: Path) -> Path:
    """``dataset_config`` as written: absolute, or relative to the training TOML's folder (else to here)."""
    given = Path(named).expanduser()
    for candidate in ([given] if given.is_absolute() else [config.parent / given, given]):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{config}: dataset_config = {named!r} not found (looked for {config.parent / given}; a "
                      f"relative path is read from the training TOML's folder). Fix the path in {config.name}, or "
                      f"import the dataset config on its own: `lora-pipeline import-kohya DATASET.toml --subject "
                      f"NAME`.")


# ----------------------------------------------------------------------------- values

def _subject_name(raw: str) -> str:
    name = re.sub(r"\W+", "_", raw.strip()).strip("_") or "imported"
    return name if re.match(SUBJECT_NAME, name) else f"lora_{name}"


def _resolution(value: Any, key: str) -> int | list[int]:
    """kohya's ``resolution`` (512, "512", "768,512", or the TOML array [768, 512]): one side, or [width, height]."""
    parts = value if isinstance(value, (list, tuple)) else str(value).replace("x", ",").split(",")
    try:
        sides = [int(str(part).strip()) for part in parts if str(part).strip()]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2):
        raise ConfigError(f"{key} = {value!r} is not a resolution: write one size (512), \"768,512\" or [768, 512] "
                          f"(width, height), then re-run the import.")
    return sides[0] if len(sides) == 1 or sides[0] == sides[1] else sides


def _extension(value: Any) -> str:
    return str(value) if str(value).startswith(".") else f".{value}"


def _optimizer_args(values: Any) -> dict[str, Any]:
    """kohya's ``optimizer_args = ["weight_decay=0.01", "betas=0.9,0.99"]`` as keyword arguments."""
    args = {}
    for item in values if isinstance(values, list) else str(values).split():
        key, _, raw = str(item).partition("=")
        try:
            value = ast.literal_eval(raw) if "," not in raw else tuple(ast.literal_eval(v) for v in raw.split(","))
        except (ValueError, SyntaxError):
            value = raw  # a bare word such as a schedule name
        args[key.strip()] = value
    return args


def _locate(value: str, folder: Path, key: str, notes: list[str]) -> str:
    """A path as written if it exists from here; else the one beside the config (written absolute); else as
    written, with a note that it is not there (yet)."""
    given = Path(str(value)).expanduser()
    if given.exists():
        return str(value)
    beside = folder / given
    if not given.is_absolute() and beside.exists():
        found = beside.resolve().as_posix()
        notes.append(f"{key}: {value} was found relative to the config's folder: written as {found}")
        return found
    notes.append(f"{key}: {value} does not exist from here: fix `{key}:` in subjects.yml if it moved")
    return str(value)


def _class_tokens(images: str) -> dict[str, str]:
    """``{folder: class tokens}`` of the image folder's kohya ``N_concept`` sub-folders (none if it is missing)."""
    root = Path(images).expanduser()
    folders = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return {name: " ".join(match.group(2).split()) for name in folders if (match := KOHYA_FOLDER.match(name))}


# ----------------------------------------------------------------------------- translating

def translate(config: KohyaConfig | Mapping[str, Any], subject: str | None = None) -> KohyaImport:
    """Map a read config to one subject entry; unknown or unsupported keys end up in ``unmapped``."""
    cfg = config if isinstance(config, KohyaConfig) else KohyaConfig(dict(config))
    c = dict(cfg.values)
    parts = _Parts()
    training, normalization, captioning, entry = parts.training, parts.normalization, parts.captioning, parts.entry
    unmapped = parts.unmapped
    name = _subject_name(subject or str(c.get("output_name") or "imported"))
    is_training = cfg.kind == "toml" and any(key not in DATASET_CONFIG_KEYS for key in c)
    if len(cfg.sources) > 1:
        parts.notes.append(f"dataset_config: read {cfg.sources[1]}")

    def take(key: str) -> Any:
        return c.pop(key, None)

    direct = {"seed": "seed", "train_batch_size": "batch_size", "max_train_steps": "max_steps",
              "max_train_epochs": "epochs", "network_dim": "lora_rank", "network_alpha": "alpha",
              "network_dropout": "dropout", "text_encoder_lr": "text_encoder_lr", "lr_warmup_steps": "lr_warmup_steps",
              "min_snr_gamma": "min_snr_gamma", "noise_offset": "noise_offset",
              "gradient_checkpointing": "gradient_checkpointing",
              "gradient_accumulation_steps": "gradient_accumulation_steps", "max_grad_norm": "max_grad_norm",
              "save_every_n_steps": "save_steps", "cache_latents": "cache_latents",
              "save_every_n_epochs": "save_every_n_epochs", "lr_scheduler_num_cycles": "lr_scheduler_num_cycles",
              "prior_loss_weight": "prior_loss_weight", "clip_skip": "clip_skip"}
    for key, target in direct.items():
        value = take(key)
        if value is not None:
            training[target] = value
    if (value := take("learning_rate")) is not None:
        training["learning_rate"] = value
    if (value := take("unet_lr")) is not None:
        training["learning_rate"] = value  # kohya: unet_lr wins over learning_rate for the UNet
    if (value := take("pretrained_model_name_or_path")) is not None:
        entry["base_model"] = value
        if str(value).endswith((".safetensors", ".ckpt")):
            unmapped.append(("pretrained_model_name_or_path", "a single-file base also needs training."
                             "single_file_config: a local diffusers folder of the same family (configs only)"))
    has_datasets = "datasets" in c
    for key, target in (("train_data_dir", "images"), ("reg_data_dir", "reg_images")):
        if value := take(key):  # an empty reg_data_dir means none
            if has_datasets:
                unmapped.append((key, "ignored, as kohya ignores it once dataset_config is set: the dataset "
                                      "config's subsets (image_dir) name the folders"))
            else:
                entry[target] = value  # train_data_dir's N_concept folders give repeats and class tokens here too
    if (value := take("metadata_path")) is not None:
        _metadata_path(str(value), cfg.folder, parts)
    if (value := take("mixed_precision")) is not None:
        training["mixed_precision"] = PRECISION.get(str(value), str(value))
    if (value := take("optimizer_type")) is not None:
        optimizer = OPTIMIZERS.get(str(value).lower())
        if optimizer:
            training["optimizer"] = optimizer
        else:
            unmapped.append(("optimizer_type", f"{value} is not available ({', '.join(OPTIMIZERS)}); AdamW is used"))
    if value := take("optimizer_args"):
        training["optimizer_args"] = _optimizer_args(value)
    if (value := take("lr_scheduler")) is not None:
        if value in SCHEDULERS:
            training["lr_scheduler"] = value
        else:
            unmapped.append(("lr_scheduler", f"{value} is not available (one of {', '.join(sorted(SCHEDULERS))})"))
    unet_only = take("network_train_unet_only")
    if is_training:  # kohya trains the text encoder too unless told not to
        training["train_text_encoder"] = not bool(unet_only)
    elif cfg.kind == "yaml":
        parts.notes.append("train_text_encoder: the config does not say; the UNet alone is trained (this project's "
                           "default): set training.train_text_encoder: true for the text encoder too")
    if take("network_train_text_encoder_only"):
        unmapped.append(("network_train_text_encoder_only", "training the text encoder alone is not supported; "
                         "the UNet is always trained"))
    if take("v2"):  # v2 = false is the SD1.x / SDXL default: nothing to say
        unmapped.append(("v2", "SD2 is not supported (families: sd1, sdxl): train on an SD1.x or SDXL base"))
    if take("v_parameterization"):
        unmapped.append(("v_parameterization", "no switch here: training follows the base model's scheduler, so "
                         "check that its scheduler/scheduler_config.json (for a single file: training."
                         "single_file_config's) says prediction_type: v_prediction"))
    if (value := take("network_module")) is not None and value != "networks.lora":
        unmapped.append(("network_module", f"{value}: only plain LoRA (networks.lora) is trained here"))
    take("output_name")
    c = _dataset_keys(c, "", parts)  # [general] and the same-named training arguments
    if training.get("clip_skip", 1) > 2:
        unmapped.append(("clip_skip", f"clip_skip {training.pop('clip_skip')}: 1 or 2 here (WebUI's range for "
                         "SD1.x); the last layer is used"))
    if has_datasets:
        _dataset_config(c.pop("datasets"), parts)
    unknown = "not a known key of lora-scripts YAML configs" if cfg.kind == "yaml" else \
        "not a known sd-scripts training key"
    for key in sorted(c):
        unmapped.append((key, NO_EFFECT.get(key) or unknown))
    _caption_affixes(parts)
    for key in ("images", "reg_images"):
        if key in entry:
            entry[key] = _locate(entry[key], cfg.folder, key, parts.notes)
    defaults = _trigger(parts)
    result = {key: entry[key] for key in SUBJECT_KEYS_ORDER if key in entry}
    result.update({k: v for k, v in (("captioning", captioning), ("normalization", normalization),
                                     ("training", training)) if v})
    _check(name, result)
    reported = [(cfg.names.get(key, key), reason) for key, reason in unmapped if reason]
    return KohyaImport(name, result, reported, parts.notes, defaults)


def _dataset_keys(values: Mapping[str, Any], where: str, parts: _Parts) -> dict[str, Any]:
    """Apply the dataset keys of one level (``where`` prefixes the names reported); returns the others."""
    left = {}
    for key, value in values.items():
        name = f"{where}{key}"
        if key in DATASET_KEYS:
            group, target = DATASET_KEYS[key]
            getattr(parts, group)[target] = value
        elif key == "resolution":
            parts.normalization["resolution"] = _resolution(value, name)
        elif key == "enable_bucket":
            parts.normalization["mode"] = "buckets" if value else "crop"
        elif key == "caption_extension":
            parts.captioning["caption_extension"] = _extension(value)
            # kohya reads the class images' caption files with the same extension
            parts.normalization["reg_caption_extension"] = _extension(value)
        elif key in ("caption_prefix", "caption_suffix"):
            if value:
                parts.affixes[key] = str(value)
        elif key == "image_dir":
            parts.entry["images"] = value
        elif key == "class_tokens":
            parts.entry["trigger"], parts.trigger_from = " ".join(str(value).split()), name
        elif key == "bucket_no_upscale":
            if not value:
                parts.unmapped.append((name, "buckets never upscale here: a small image gets a smaller bucket of its "
                                             "aspect (kohya's bucket_no_upscale = true)"))
        elif key in NOT_CARRIED_DATASET:
            parts.unmapped.append((name, NOT_CARRIED_DATASET[key]))
        elif key != "is_reg":
            left[key] = value
    return left


def _dataset_config(datasets: list[dict[str, Any]], parts: _Parts) -> None:
    """kohya's dataset config: the first instance subset maps, over its dataset's keys over [general] (kohya's
    precedence), and the first regularization subset (``is_reg``) becomes the reg image folder; more subsets are
    reported."""
    pairs = [(dataset, subset) for dataset in datasets for subset in dataset.get("subsets", [])]
    instance = [(d, s) for d, s in pairs if not s.get("is_reg")]
    regularization = [(d, s) for d, s in pairs if s.get("is_reg")]
    if len(instance) > 1:
        parts.unmapped.append(("datasets.subsets", f"{len(instance)} instance subsets: only the first was imported; "
                               "make one subject per subset, or merge the folders"))
    if instance:
        dataset, subset = instance[0]
        for where, values in (("datasets.", {k: v for k, v in dataset.items() if k != "subsets"}),
                              ("datasets.subsets.", subset)):
            for key in _dataset_keys(values, where, parts):
                parts.unmapped.append((f"{where}{key}", "not a known sd-scripts dataset-config key"))
    if regularization:
        dataset, subset = regularization[0]
        parts.entry["reg_images"] = subset.get("image_dir")
        extension = subset.get("caption_extension", dataset.get("caption_extension"))
        if extension:
            parts.normalization["reg_caption_extension"] = _extension(extension)
        if len(regularization) > 1:
            parts.unmapped.append(("datasets.subsets.is_reg", f"{len(regularization)} regularization subsets: only "
                                   "the first was imported; put them side by side in one reg folder as N_class "
                                   "folders"))
        if subset.get("class_tokens") or subset.get("num_repeats", 1) != 1:
            parts.unmapped.append(("datasets.subsets.is_reg.class_tokens", "a reg folder's class token and repeats "
                                   "come from its N_class sub-folders here (e.g. reg/1_woman/): move the class "
                                   "images into one"))
        for key in sorted(set(subset) - {"image_dir", "is_reg", "caption_extension", "class_tokens", "num_repeats"}):
            parts.unmapped.append((f"datasets.subsets.is_reg.{key}", "settings of the class-image subset are not "
                                   "carried over: class images train on their caption file, else their class token"))


def _caption_affixes(parts: _Parts) -> None:
    """kohya's caption_prefix / caption_suffix as the captioning template (the trigger stays first)."""
    if not parts.affixes:
        return
    prefix, suffix = parts.affixes.get("caption_prefix"), parts.affixes.get("caption_suffix")
    parts.captioning["template"] = ("{trigger}, " + (f"{_literal(prefix)}, " if prefix else "") + "{caption}" +
                                    (f", {_literal(suffix)}" if suffix else ""))
    parts.notes.append(f"caption_prefix / caption_suffix: in captioning.template {parts.captioning['template']!r} "
                       f"(applied to sidecar and auto captions; reviewed captions are used verbatim)")


def _literal(text: str) -> str:
    """Text as a literal part of a template (braces doubled), without the separators kohya's prefix carries."""
    return text.strip(" ,").replace("{", "{{").replace("}", "}}")


def _metadata_path(value: str, folder: Path, parts: _Parts) -> None:
    """``metadata_path``: a metadata.csv becomes the subject's captions (checked now if it is there)."""
    if not value.lower().endswith(".csv"):
        parts.unmapped.append(("metadata_path", f"{value}: only a metadata.csv (file_name + text, caption or "
                               f"prompt) is read here; give the captions as one, or as sidecar files"))
        return
    located = _locate(value, folder, "captioning.metadata_csv", parts.notes)
    if Path(located).is_file():
        from lora_pipeline.prep.captions import read_metadata_csv

        count = len(read_metadata_csv(located))
        parts.notes.append(f"captioning.metadata_csv: {count} caption(s) in {located}, ranked like sidecar files "
                           f"(below reviewed captions, above auto captions)")
    parts.captioning["metadata_csv"] = located


def _trigger(parts: _Parts) -> set[str]:
    """The subject's trigger, from the class tokens, or explicitly none (``""``): never the project's global
    trigger, which kohya has no notion of. Returns {"trigger"} when it is only a default (nothing named a class
    token), which a merge into an existing subject leaves alone."""
    entry, notes = parts.entry, parts.notes
    if parts.trigger_from:
        notes.append(f"trigger: {entry['trigger']!r} (from {parts.trigger_from})")
        return set()
    tokens = _class_tokens(entry["images"]) if "images" in entry else {}
    distinct = sorted(set(tokens.values()))
    if len(distinct) == 1:
        entry["trigger"] = distinct[0]
        notes.append(f"trigger: {distinct[0]!r} (the class token of folder(s) {', '.join(tokens)} in "
                     f"{entry['images']})")
        return set()
    entry["trigger"] = ""
    if distinct:
        notes.append(f"trigger: none (\"\"): the folders {', '.join(tokens)} have different class tokens; each image's "
                     f"caption starts with its folder's")
        return set()
    where = f"no N_concept folder in {entry['images']}" if "images" in entry else "no image folder in this config"
    notes.append(f"trigger: none (\"\"): {where} names a class token; set `trigger:` in subjects.yml if the LoRA "
                 f"should answer to a word")
    return {"trigger"}


def _check(name: str, entry: dict[str, Any]) -> None:
    """Every key written must be one this project knows (the same schema the run validates)."""
    from lora_pipeline.core.config import parse_subjects

    parse_subjects({"subjects": {name: entry}})
    for group, schema in (("training", TrainingParams), ("normalization", NormalizationParams),
                          ("captioning", CaptioningParams)):
        unknown = set(entry.get(group, {})) - set(schema.model_fields)
        if unknown:
            raise ConfigError(f"import-kohya produced unknown {group} keys {sorted(unknown)}; please report this.")
    if not set(entry) <= set(SubjectParams.model_fields):
        raise ConfigError(f"import-kohya produced unknown subject keys {sorted(set(entry) - set(SubjectParams.model_fields))}; "
                          f"please report this.")


# ----------------------------------------------------------------------------- subjects.yml

@dataclass
class Merge:
    """``subjects.yml`` with the imported subject added or merged in (not yet written)."""

    path: Path
    document: Any  # the whole file, comments included (ruamel.yaml round trip)
    subject: str
    existed: bool  # the subject was there already: the import was merged into it
    changes: list[str] = field(default_factory=list)  # "training.repeats: 1 -> 10"


def _round_trip():
    from ruamel.yaml import YAML
    from ruamel.yaml.representer import RoundTripRepresenter

    class Representer(RoundTripRepresenter):
        """ruamel's, writing new floats as ``3.0e-05``: YAML 1.1 readers (PyYAML) read ``3e-05`` as a string."""

    Representer.add_representer(float, _represent_float)
    # Round-trip mode keeps the user's comments, key order and quoting in subjects.yml.
    yaml = YAML()
    yaml.Representer = Representer
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a long value
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def _represent_float(representer: Any, value: float) -> Any:
    text = repr(value).lower()
    if value != value or value in (float("inf"), float("-inf")):
        text = ".nan" if value != value else ("-.inf" if value < 0 else ".inf")
    elif "e" in text and "." not in text:
        text = text.replace("e", ".0e", 1)
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def _dump(document: Any) -> str:
    stream = io.StringIO()
    _round_trip().dump(document, stream)
    return stream.getvalue()


def _plain(value: Any) -> Any:
    """Tuples (e.g. optimizer betas) as lists: YAML and the comparison of a merge see the same values."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _styled(value: Any) -> Any:
    """Plain values for ruamel, short lists of scalars in flow style (``resolution: [768, 512]``)."""
    from ruamel.yaml.comments import CommentedSeq

    if isinstance(value, Mapping):
        return {k: _styled(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if all(not isinstance(v, (Mapping, list, tuple)) for v in value):
            seq = CommentedSeq(value)
            seq.fa.set_flow_style()
            return seq
        return [_styled(v) for v in value]
    return value


def _show(value: Any) -> str:
    return "(unset)" if value is _UNSET else json.dumps(_plain(value), default=str)


_UNSET = object()


def _merge_into(target: MutableMapping, new: Mapping[str, Any], prefix: str, changes: list[str]) -> None:
    for key, value in new.items():
        old = target.get(key, _UNSET)
        if isinstance(value, Mapping) and isinstance(old, MutableMapping) and key not in WHOLE_VALUES:
            _merge_into(old, value, f"{prefix}{key}.", changes)
        elif old is _UNSET or _plain(old) != _plain(value):
            target[key] = value
            changes.append(f"{prefix}{key}: {_show(old)} -> {_show(value)}")
            if old is _UNSET and hasattr(target, "fa"):  # a short `{a: 1}` that grows is easier to read as a block
                target.fa.set_block_style()


def merge_subject(result: KohyaImport, conf_dir: str | Path) -> Merge:
    """``<conf_dir>/subjects.yml`` with the subject added, or merged into its entry there: the import's values win
    key by key, the entry's other keys (and the other subjects, and the comments) stay."""
    from ruamel.yaml import YAMLError
    from ruamel.yaml.comments import CommentedMap

    path = Path(conf_dir) / "subjects.yml"
    try:
        document = _round_trip().load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, YAMLError) as exc:
        raise ConfigError(f"{path}: not readable YAML ({exc}). Fix it, or move it away, and re-run the "
                          f"import.") from None
    document = CommentedMap() if document is None else document
    if not isinstance(document, MutableMapping) or not isinstance(document.get("subjects") or {}, MutableMapping):
        raise ConfigError(f"{path}: expected `subjects:` with one entry per subject; fix the file and re-run.")
    if document.get("subjects") is None:
        document["subjects"] = CommentedMap()
    subjects = document["subjects"]
    new = _styled(result.entry)
    if result.subject not in subjects:
        subjects[result.subject] = new
        return Merge(path, document, result.subject, False)
    current = subjects[result.subject]
    if not isinstance(current, MutableMapping):  # `aki:` with nothing under it
        current = subjects[result.subject] = CommentedMap()
    changes: list[str] = []
    _merge_into(current, {k: v for k, v in new.items() if not (k in result.defaults and k in current)}, "", changes)
    return Merge(path, document, result.subject, True, changes)


def save_subjects(merge: Merge) -> Path:
    from lora_pipeline.core.files import atomic_write_text

    atomic_write_text(merge.path, _dump(merge.document))
    return merge.path


def write_subject(result: KohyaImport, conf_dir: str | Path) -> Path:
    """Add the subject to ``<conf_dir>/subjects.yml``, or merge it into its entry, keeping everything else."""
    return save_subjects(merge_subject(result, conf_dir))


def run_import(config: str | Path, subject: str | None, conf_dir: str | Path, dry_run: bool) -> str:
    """``lora-pipeline import-kohya``: read, translate, merge into subjects.yml (or only show it); the report."""
    result = translate(read_config(config), subject)
    merge = merge_subject(result, conf_dir)
    if dry_run:
        lines = [_dump({"subjects": {result.subject: merge.document["subjects"][result.subject]}}).rstrip()]
    else:
        path = save_subjects(merge)
        lines = [f"Wrote subject {result.subject} to {path}{' (merged into its entry)' if merge.existed else ''}; "
                 f"run it with `kedro run --namespaces {result.subject}`."]
    if result.unmapped:
        lines += ["", f"Not carried over ({len(result.unmapped)}):"]
        lines += [f"  - {key}: {reason}" for key, reason in result.unmapped]
    if result.notes:
        lines += ["", "Decided on import:"] + [f"  - {note}" for note in result.notes]
    if merge.existed:
        verb = "Would change" if dry_run else "Changed"
        lines += ["", f"{verb} in the existing subject {result.subject} of {merge.path}: " +
                  (f"{len(merge.changes)}" if merge.changes else "nothing (it already holds these values)")]
        lines += [f"  - {change}" for change in merge.changes]
    return "\n".join(lines)
