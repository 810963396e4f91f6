"""The LoRA library as the generation stage sees it: every name a prompt can use, its versions and header, and
the images generation wrote, with their WebUI PNG info. No Kedro here: folders come from the caller."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lora_pipeline.core.files import read_safetensors_header, versions
from lora_pipeline.diffusion.prompts import export_version, lora_index


@dataclass(frozen=True)
class LibraryLora:
    name: str  # what <lora:NAME:w> resolves
    path: Path  # the file a prompt uses now (the newest export)
    versions: list[str]  # every exported version, oldest first (<lora:NAME@VERSION:w> pins one)
    header: dict[str, str]  # the ss_* / modelspec.* / sshs_* metadata strings


def library_loras(folders: Sequence[Path]) -> list[LibraryLora]:
    loras = []
    for name, path in sorted(lora_index(folders).items()):
        found = [p.parent.name for p in versions(path.parent.parent)] if export_version(path) else []
        try:
            header = read_safetensors_header(path).metadata
        except Exception as exc:  # safetensors' SafetensorError: a broken file is listed with the reason
            header = {"error": str(exc)}
        loras.append(LibraryLora(name, path, found, dict(sorted(header.items()))))
    return loras


@dataclass(frozen=True)
class GeneratedImage:
    path: Path
    parameters: str  # the PNG "parameters" text WebUI's PNG Info reads


def generated_images(folder: Path) -> list[GeneratedImage]:
    """The PNGs of one generation version folder with their PNG info."""
    from PIL import Image

    images = []
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as image:
            images.append(GeneratedImage(path, str(image.info.get("parameters", ""))))
    return images
