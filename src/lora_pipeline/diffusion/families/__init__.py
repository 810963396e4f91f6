"""Model families: everything that differs between base-model architectures lives behind :class:`ModelFamily`
(see :mod:`.base` for the interface). One module per family (:mod:`.sd1`, :mod:`.sdxl`; :mod:`.unet` holds what
the UNet families share); this module is the registry and the one detector.

Adding a family (Flux, SD3) is one module with a :class:`ModelFamily` subclass, and its instance in
:data:`FAMILIES`; the trainer, the exporter, stacking, merge, evaluation and generation only talk to the interface.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import torch

from lora_pipeline.core.errors import ConfigError
from lora_pipeline.core.files import read_safetensors_header
from lora_pipeline.diffusion.families.base import Conditioning, ModelFamily, NoisedBatch, Objective
from lora_pipeline.diffusion.families.chroma import CHROMA, ChromaFamily
from lora_pipeline.diffusion.families.flux import FLUX, FluxFamily
from lora_pipeline.diffusion.families.flux2 import FLUX2, Flux2Family
from lora_pipeline.diffusion.families.qwen_image import QWEN_IMAGE, QwenImageFamily
from lora_pipeline.diffusion.families.sd1 import SD1, SD1Family
from lora_pipeline.diffusion.families.sd3 import SD3, SD3Family
from lora_pipeline.diffusion.families.sdxl import SDXL, SDXLFamily
from lora_pipeline.diffusion.families.transformer import FlowMatchObjective, TransformerFamily
from lora_pipeline.diffusion.families.unet import DDPMObjective, UNetFamily, sgm_unet_path, unet_layout
from lora_pipeline.diffusion.families.z_image import Z_IMAGE, ZImageFamily

__all__ = ["CHROMA", "FAMILIES", "FLUX", "FLUX2", "Flux2Family", "ChromaFamily", "PLANNED", "SD1", "SD3", "SDXL", "Conditioning", "DDPMObjective", "FlowMatchObjective",
           "FluxFamily", "ModelFamily", "NoisedBatch",
           "Objective", "QWEN_IMAGE", "QwenImageFamily", "SD1Family", "SD3Family", "SDXLFamily", "TransformerFamily", "UNetFamily", "Z_IMAGE", "ZImageFamily", "detect_family", "get_family", "kohya_family_hint", "lora_header_family",
           "native_resolution", "resolve_family", "sgm_unet_path", "unet_layout"]

logger = logging.getLogger(__name__)

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (SD1, SDXL, FLUX, SD3, CHROMA, Z_IMAGE, FLUX2,
                                                                         QWEN_IMAGE)}
# Where the next families plug in (kept here so the error below can name them).
PLANNED = {"wan": "Wan 2.x video (frame datasets, a 3D VAE)",
           "hunyuan_video": "HunyuanVideo (frame datasets, a 3D VAE)"}
FALLBACK = SD1  # a hub id whose model_index.json is not at hand


def get_family(name: str) -> ModelFamily:
    if name in FAMILIES:
        return FAMILIES[name]
    planned = f" ({PLANNED[name]} is planned, not supported yet)" if name in PLANNED else ""
    raise ConfigError(f"base_model_family '{name}' is not supported{planned}; use auto, "
                      f"{', '.join(FAMILIES)}.")


def _by_pipeline_class(class_name: str, variants: bool) -> ModelFamily | None:
    """The family whose pipeline class matches ``class_name`` best (the longest match), or None."""
    score, family = max(((f.recognises_pipeline_class(class_name, variants), f) for f in FAMILIES.values()),
                        key=lambda pair: pair[0])
    return family if score else None


def detect_family(source: Any, allow_download: bool = False) -> ModelFamily:
    """The family of a loaded diffusers pipeline (by its class, img2img and inpaint variants included), a diffusers
    folder (``model_index.json``), a single-file checkpoint (its keys), or a hub id (its ``model_index.json``, from
    the local hub cache, or fetched when downloads are allowed). Each family says what it recognises."""
    if not isinstance(source, (str, Path)):
        name = type(source).__name__
        family = _by_pipeline_class(name, variants=True)
        if family is None:
            raise ConfigError(f"{name} is not the pipeline of a supported family "
                              f"({', '.join(f.pipeline_class_name for f in FAMILIES.values())}).")
        return family
    path = Path(source)
    index = path / "model_index.json"
    if not path.exists():
        index = _hub_model_index(str(source), allow_download) or index
    if index.is_file():
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
        family = _by_pipeline_class(class_name, variants=False)
        if family is None:
            raise ConfigError(f"{index}: pipeline class '{class_name}' is not a supported family "
                              f"({', '.join(f.pipeline_class_name for f in FAMILIES.values())}). "
                              f"Set base_model_family explicitly if it is one of them.")
        return family
    if path.is_file():
        keys = _checkpoint_keys(path)
        for family in FAMILIES.values():
            if family.recognises_checkpoint(keys):
                return family
        names = " nor ".join(f.short_name for f in FAMILIES.values())
        raise ConfigError(f"{path}: cannot tell the model family from its keys (neither {names} layout); "
                          f"set base_model_family: {' or '.join(FAMILIES)}.")
    logger.warning("Cannot tell the family of %s without its model_index.json; assuming %s. Set "
                   "base_model_family: sdxl for an SDXL base (or allow_download: true).", source,
                   FALLBACK.display_name)
    return FALLBACK


def lora_header_family(metadata: dict[str, str]) -> ModelFamily | None:
    """The family a LoRA file's header names (``modelspec.architecture`` or kohya's ``ss_base_model_version``),
    or None when it names none (many downloaded files carry no header)."""
    return next((family for family in FAMILIES.values() if family.recognises_lora_header(metadata)), None)


def kohya_family_hint(name: str, family: ModelFamily) -> str:
    """For a kohya module name that ``family`` has no layer for: which other family's name it looks like."""
    other = next((f for f in FAMILIES.values() if f is not family and f.recognises_kohya_name(name)), None)
    return f"is it an {other.short_name} LoRA, or were other targets trained?" if other else \
        "were other targets trained, or is it a LoRA of another base model?"


def _hub_model_index(repo_id: str, allow_download: bool) -> Path | None:
    """A hub repository's ``model_index.json`` (a few hundred bytes), or None when it cannot be had."""
    if repo_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, "model_index.json", local_files_only=not allow_download))
    except Exception:  # not cached, offline, no such repo: the caller falls back and says so
        return None


def _checkpoint_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        return read_safetensors_header(path).keys
    state = torch.load(path, map_location="meta", weights_only=True)
    return list(state.get("state_dict", state))


def resolve_family(requested: str, source: str | Path, allow_download: bool = False) -> ModelFamily:
    """``auto`` detects; an explicit family must agree with what local model files say."""
    if requested != "auto" and not Path(source).exists():
        return get_family(requested)
    detected = detect_family(source, allow_download)
    if requested == "auto":
        return detected
    family = get_family(requested)
    if family is not detected:
        raise ConfigError(f"base_model_family is '{requested}', but {source} is a {detected.display_name} model; "
                          f"set base_model_family: auto (or {detected.name}).")
    return family


@functools.lru_cache(maxsize=32)  # three nodes ask per run; say a fallback warning once
def native_resolution(base_model: str | None, requested: str = "auto") -> int:
    """The bucket side a family trains at (SD1.x 512, SDXL 1024), for ``normalization.resolution: auto``."""
    if requested != "auto":
        return get_family(requested).default_resolution
    if not base_model:
        return FALLBACK.default_resolution
    return detect_family(base_model).default_resolution
