"""Where models come from and where they run: :func:`resolve_model` (a local folder or file, or a hub id when
downloads are allowed), :func:`load_pretrained` (``from_pretrained`` with downloads only when allowed: the loader
of every transformers model and processor; diffusion bases load in :mod:`lora_pipeline.diffusion.loading`
through :func:`resolve_model`), :func:`pick_device` (the device a setting asks for) and :data:`DTYPES` (the
torch dtype of a precision setting). The loaders choose no device: callers (the trainers, the stages) move
what they load."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from lora_pipeline.core.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# The torch dtype of every precision setting: mixed_precision (no/fp16/bf16) and export/merge precision
# (fp16/fp32/bf16).
DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(preference: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit choice that is unavailable is an error."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if preference == "auto":
        return torch.device(next(name for name in ("cuda", "mps", "cpu") if available[name]))
    if not available.get(preference, False):
        raise ModelNotFoundError(f"device '{preference}' is not available here; use device: auto or cpu.")
    return torch.device(preference)


def resolve_model(name_or_path: str, allow_download: bool = False) -> str:
    """Return what ``from_pretrained`` should get, or fail early with the next step to take.

    A path that exists locally is used as is. Anything else is treated as a Hugging Face hub id, which is
    only fetched when the user opted in with ``allow_download: true``.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path)
    if allow_download and _HUB_ID.match(name_or_path):
        return name_or_path
    hint = (
        "it looks like a Hugging Face hub id, which needs the network: set allow_download: true to fetch it "
        "once, or give a local folder"
        if _HUB_ID.match(name_or_path)
        else "check the path (relative paths start at the project root)"
    )
    raise ModelNotFoundError(
        f"Model '{name_or_path}' not found: no such local folder or file. Either {hint}, or run "
        f"'python -m lora_pipeline.demo' to build the offline tiny models under data/06_models/."
    )


def load_pretrained(cls: Any, name_or_path: str, allow_download: bool = False, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` with downloads only when allowed, for models and processors alike."""
    source = resolve_model(name_or_path, allow_download)
    logger.info("Loading %s from %s", getattr(cls, "__name__", cls), source)
    return cls.from_pretrained(source, local_files_only=not allow_download, **kwargs)
