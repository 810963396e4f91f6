"""Import a kohya sd-scripts / lora-scripts training TOML as a subject of this project.

Reads the sectioned (``[model_arguments]``, ``[network_arguments]`` ...) or flat training config, and kohya's
dataset config (``[[datasets]]`` / ``[[datasets.subsets]]``), and turns what has an equivalent here into one
``subjects.yml`` entry (its overrides by stage). Every key without an equivalent is reported with the reason;
nothing is dropped silently.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # Python 3.11+; tomli is the same parser for 3.10
    import tomllib
except ImportError:  # pragma: no cover
    import tomli as tomllib

from lora_pipeline.config import SUBJECT_NAME, CaptioningParams, NormalizationParams, SubjectParams, TrainingParams
from lora_pipeline.errors import ConfigError

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
    "set training.data_workers", "persistent_data_loader_workers": "no equivalent needed", "v2": "SD2 is not "
    "supported (families: sd1, sdxl)", "sample_prompts": "set training.sample_prompts in subjects.yml",
    "sample_every_n_steps": "set training.sample_every_steps", "network_module": "",
    "save_state": "checkpoints always hold optimizer/scheduler/RNG state for exact resume",
    "huggingface_repo_id": "uploads are out of scope", "wandb_api_key": "runs are logged to MLflow",
}


@dataclass
class KohyaImport:
    """What an import produced: the subject's entry, and every key that was not carried over, with why."""

    subject: str
    entry: dict[str, Any]
    unmapped: list[tuple[str, str]] = field(default_factory=list)

    def yaml(self) -> str:
        import yaml

        return yaml.safe_dump({"subjects": {self.subject: self.entry}}, sort_keys=False, allow_unicode=True)


def read_toml(path: str | Path) -> dict[str, Any]:
    """A kohya TOML as one flat dict (sections merged); ``datasets`` (the dataset config) kept as it is."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable TOML file ({exc}). Give the kohya / lora-scripts training "
                          f"config (.toml).") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and (key.endswith(("_arguments", "_args")) or key == "general"):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _subject_name(raw: str) -> str:
    name = re.sub(r"\W+", "_", raw.strip()).strip("_") or "imported"
    return name if re.match(SUBJECT_NAME, name) else f"lora_{name}"


def _resolution(value: Any) -> int | list[int]:
    """kohya's ``resolution`` ("512", 512, "768,512"): one side, or [width, height]."""
    parts = [int(p) for p in str(value).replace("x", ",").split(",") if p.strip()]
    return parts[0] if len(parts) == 1 or parts[0] == parts[1] else parts[:2]


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


def translate(config: dict[str, Any], subject: str | None = None) -> KohyaImport:
    """Map a flat kohya config to one subject entry; unknown or unsupported keys end up in ``unmapped``."""
    c = dict(config)
    name = _subject_name(subject or str(c.get("output_name") or "imported"))
    training: dict[str, Any] = {}
    normalization: dict[str, Any] = {}
    captioning: dict[str, Any] = {}
    entry: dict[str, Any] = {}
    unmapped: list[tuple[str, str]] = []

    def take(key: str) -> Any:
        return c.pop(key, None)

    direct = {"seed": "seed", "train_batch_size": "batch_size", "max_train_steps": "max_steps",
              "max_train_epochs": "epochs", "network_dim": "lora_rank", "network_alpha": "alpha",
              "network_dropout": "dropout", "text_encoder_lr": "text_encoder_lr", "lr_warmup_steps": "lr_warmup_steps",
              "min_snr_gamma": "min_snr_gamma", "noise_offset": "noise_offset",
              "gradient_checkpointing": "gradient_checkpointing",
              "gradient_accumulation_steps": "gradient_accumulation_steps", "max_grad_norm": "max_grad_norm",
              "save_every_n_steps": "save_steps", "shuffle_caption": "shuffle_tags", "keep_tokens": "keep_tokens",
              "cache_latents": "cache_latents", "save_every_n_epochs": "save_every_n_epochs",
              "lr_scheduler_num_cycles": "lr_scheduler_num_cycles", "prior_loss_weight": "prior_loss_weight",
              "clip_skip": "clip_skip", "flip_aug": "flip_aug"}
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
    if (value := take("train_data_dir")) is not None:
        entry["images"] = value  # its N_concept folders give repeats and class tokens here too
    if value := take("reg_data_dir"):  # an empty value means none
        entry["reg_images"] = value
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
    # kohya trains the text encoder too unless told not to.
    training["train_text_encoder"] = not bool(take("network_train_unet_only"))
    if take("network_train_text_encoder_only"):
        unmapped.append(("network_train_text_encoder_only", "training the text encoder alone is not supported; "
                         "the UNet is always trained"))
    if (value := take("resolution")) is not None:
        normalization["resolution"] = _resolution(value)
    if (value := take("enable_bucket")) is not None:
        normalization["mode"] = "buckets" if value else "crop"
    for key, target in (("min_bucket_reso", "bucket_min"), ("max_bucket_reso", "bucket_max"),
                        ("bucket_reso_steps", "bucket_step")):
        if (value := take(key)) is not None:
            normalization[target] = value
    if (value := take("caption_extension")) is not None:
        captioning["caption_extension"] = value if str(value).startswith(".") else f".{value}"
    if (value := take("network_module")) is not None and value != "networks.lora":
        unmapped.append(("network_module", f"{value}: only plain LoRA (networks.lora) is trained here"))
    take("output_name")
    if training.get("clip_skip", 1) > 2:
        unmapped.append(("clip_skip", f"clip_skip {training.pop('clip_skip')}: 1 or 2 here (WebUI's range for "
                         "SD1.x); the last layer is used"))
    if "datasets" in c:
        _dataset_config(c.pop("datasets"), entry, training, normalization, unmapped)
    for key in sorted(c):
        unmapped.append((key, NO_EFFECT.get(key) or "not a known sd-scripts training key"))
        c.pop(key)
    captioning.update(entry.pop("captioning", {}))
    entry.update({k: v for k, v in (("training", training), ("normalization", normalization),
                                    ("captioning", captioning)) if v})
    _check(name, entry)
    return KohyaImport(name, entry, [u for u in unmapped if u[1]])


def _dataset_config(datasets: list[dict[str, Any]], entry: dict[str, Any], training: dict[str, Any],
                    normalization: dict[str, Any], unmapped: list[tuple[str, str]]) -> None:
    """kohya's dataset config: one instance subset maps (image_dir, num_repeats, class_tokens, keep_tokens), and
    one regularization subset (``is_reg``) becomes the reg image folder; more subsets are reported."""
    subsets = [dict(s, **{k: v for k, v in d.items() if k != "subsets" and k not in s})
               for d in datasets for s in d.get("subsets", [])]
    instance = [s for s in subsets if not s.get("is_reg")]
    regularization = [s for s in subsets if s.get("is_reg")]
    if regularization:
        entry["reg_images"] = regularization[0].get("image_dir")
        if len(regularization) > 1:
            unmapped.append(("datasets.subsets.is_reg", f"{len(regularization)} regularization subsets: only the "
                             f"first was imported; put them side by side in one reg folder as N_class folders"))
        if regularization[0].get("class_tokens") or regularization[0].get("num_repeats", 1) != 1:
            unmapped.append(("datasets.subsets.is_reg.class_tokens", "a reg folder's class token and repeats come "
                             "from its N_class sub-folders here (e.g. reg/1_woman/): move the class images into one"))
    if len(instance) > 1:
        unmapped.append(("datasets.subsets", f"{len(instance)} instance subsets: only the first was imported; "
                         "make one subject per subset, or merge the folders"))
    if not instance:
        return
    first = instance[0]
    if "image_dir" in first:
        entry["images"] = first["image_dir"]
    if "batch_size" in first:
        training["batch_size"] = first["batch_size"]
    if "num_repeats" in first:
        training["repeats"] = first["num_repeats"]
    if "class_tokens" in first:
        entry["trigger"] = first["class_tokens"]
    if "keep_tokens" in first:
        training["keep_tokens"] = first["keep_tokens"]
    if "resolution" in first and "resolution" not in normalization:
        normalization["resolution"] = _resolution(first["resolution"])
    if "caption_extension" in first:
        entry.setdefault("captioning", {})["caption_extension"] = first["caption_extension"]


def _check(name: str, entry: dict[str, Any]) -> None:
    """Every key written must be one this project knows (the same schema the run validates)."""
    from lora_pipeline.config import parse_subjects

    parse_subjects({"subjects": {name: entry}})
    for group, schema in (("training", TrainingParams), ("normalization", NormalizationParams),
                          ("captioning", CaptioningParams)):
        unknown = set(entry.get(group, {})) - set(schema.model_fields)
        if unknown:
            raise ConfigError(f"import-kohya produced unknown {group} keys {sorted(unknown)}; please report this.")
    if not set(entry) <= set(SubjectParams.model_fields):
        raise ConfigError(f"import-kohya produced unknown subject keys {sorted(set(entry) - set(SubjectParams.model_fields))}; "
                          f"please report this.")


def write_subject(result: KohyaImport, conf_dir: str | Path) -> Path:
    """Add (or replace) the subject in ``<conf_dir>/subjects.yml``, keeping the other subjects there."""
    import yaml

    from lora_pipeline.core.files import atomic_write_text

    path = Path(conf_dir) / "subjects.yml"
    current = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    current = current or {}
    subjects = dict(current.get("subjects") or {})
    subjects[result.subject] = result.entry
    atomic_write_text(path, yaml.safe_dump({**current, "subjects": subjects}, sort_keys=False, allow_unicode=True))
    return path
