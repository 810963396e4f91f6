"""Checks of the files and folders a run's parameters name (base models, LoRAs to start from, LoRA folders),
and of what a training.base_quantization needs (a CUDA GPU, bitsandbytes or torchao, bf16), made before the
first node runs: a wrong path should cost seconds, not the captioning and normalization that would run before
the node that reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

from pydantic import BaseModel

from lora_pipeline.core.config import (
    CaptioningParams,
    ExportParams,
    GenerationParams,
    LLMTrainingParams,
    TrainingParams,
)
from lora_pipeline.core.errors import ConfigError
from lora_pipeline.core.models import resolve_model

PROJECT_EXPORTS = Path("data/07_model_output")  # created by the first export; may not exist yet


def check_inputs(groups: Mapping[str, BaseModel],
                 images_needing_a_captioner: Callable[[str], list[str]] = lambda subject: []) -> None:
    """Raise for the first named input that cannot be used. ``groups`` maps a parameter group
    (``aki.training``, ``generation``) to its validated parameters; ``images_needing_a_captioner(subject)`` lists
    the subject's images that no person captioned (only those need ``captioning.model``)."""
    for group, p in groups.items():
        family = getattr(p, "base_model_family", None)
        if family not in (None, "auto"):
            from lora_pipeline.diffusion.families import get_family

            try:
                get_family(family)
            except ConfigError as exc:
                raise ConfigError(f"{group}.base_model_family: {exc}") from None
        if isinstance(p, CaptioningParams) and p.backend != "sidecar":
            _check_captioner(group, p, images_needing_a_captioner)
        if isinstance(p, (TrainingParams, GenerationParams, LLMTrainingParams)):
            try:
                resolve_model(p.base_model, p.allow_download)
            except Exception as exc:
                raise ConfigError(f"{group}.base_model: {exc}") from None
        if isinstance(p, TrainingParams) and p.base_quantization != "none":
            # no CUDA, no bitsandbytes/torchao, or not bf16: stop now, not after loading 12B parameters
            from lora_pipeline.diffusion.loading import check_base_quantization

            check_base_quantization(p.base_quantization, p.device, p.mixed_precision, f"{group}.base_quantization")
        if isinstance(p, TrainingParams) and p.init_lora and p.init_lora != "latest":
            _check_lora_file(Path(p.init_lora), f"{group}.init_lora")
        if isinstance(p, LLMTrainingParams) and p.init_adapter and p.init_adapter != "latest":
            if not (Path(p.init_adapter) / "adapter_config.json").is_file():
                raise ConfigError(f"{group}.init_adapter: {p.init_adapter} is not a PEFT adapter folder (no "
                                  f"adapter_config.json). Give an exported adapter folder, 'latest', or null.")
        if isinstance(p, GenerationParams):
            for folder in p.lora_dirs:
                if not Path(folder).is_dir() and Path(folder) != PROJECT_EXPORTS:
                    raise ConfigError(f"{group}.lora_dirs: folder {folder} does not exist. Fix the path (e.g. your "
                                      f"WebUI models/Lora folder) or remove it from the list.")
        if isinstance(p, ExportParams) and p.webui_lora_dir and not Path(p.webui_lora_dir).is_dir():
            raise ConfigError(f"{group}.webui_lora_dir: folder {p.webui_lora_dir} does not exist. Give your WebUI's "
                              f"models/Lora folder, or null.")


def _check_captioner(group: str, p: CaptioningParams, images_needing_a_captioner: Callable[[str], list[str]]) -> None:
    try:
        resolve_model(p.model, p.allow_download)
    except Exception as exc:
        subject = group.rpartition(".")[0]
        uncaptioned = images_needing_a_captioner(subject) if subject else [None]
        if not uncaptioned:
            return  # every image has a reviewed caption, a sidecar or a metadata.csv row: no model is loaded
        example = f" (e.g. {uncaptioned[0]})" if uncaptioned[0] else ""
        raise ConfigError(f"{group}.model: {exc}\n{len(uncaptioned)} image(s) have no caption file{example}, so "
                          f"the '{p.backend}' captioner must run. Give a local model folder (or allow_download: "
                          f"true), or add .txt captions beside those images and set backend: sidecar.") from None


def _check_lora_file(path: Path, key: str) -> None:
    from lora_pipeline.core.errors import DataError
    from lora_pipeline.diffusion.lora_files import DIFFUSERS_WEIGHT_NAME, check_is_lora

    file = path / DIFFUSERS_WEIGHT_NAME if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{key}: {path} not found. Give a LoRA .safetensors file (or an exported diffusers "
                          f"folder), 'latest', or null.")
    if file.suffix.lower() != ".safetensors":
        raise ConfigError(f"{key}: {file} is a {file.suffix} file; LoRAs are read from .safetensors only.")
    from safetensors import SafetensorError

    from lora_pipeline.core.files import read_safetensors_header

    try:
        keys = read_safetensors_header(file).keys
    except SafetensorError as exc:
        raise ConfigError(f"{key}: {file} is not a readable .safetensors file ({exc}).") from None
    try:
        check_is_lora(dict.fromkeys(keys), str(file))
    except DataError as exc:
        raise ConfigError(f"{key}: {exc}") from None
