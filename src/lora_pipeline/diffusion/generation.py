"""Image generation with stacked LoRAs: prompts files, WebUI PNG metadata, contact sheets, comparison grids."""

from __future__ import annotations

import contextlib
import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import yaml
from PIL import Image, ImageDraw
from pydantic import ValidationError
from tqdm.auto import tqdm

from lora_pipeline.core.config import PromptSpec
from lora_pipeline.core.errors import ConfigError
from lora_pipeline.core.files import read_safetensors_header
from lora_pipeline.diffusion.families import detect_family
from lora_pipeline.diffusion.prompts import LoraRef, export_version, parse_prompt
from lora_pipeline.diffusion.stack import set_weights

logger = logging.getLogger(__name__)


def read_prompts_file(path: str | Path, defaults: PromptSpec) -> list[PromptSpec]:
    """YAML (a list of mappings, or of strings) or CSV with a header; errors name the file and row/line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Prompts file {path} not found. Create it (see README: Generation) or pass one prompt "
                          f"with --params generation.prompt='...'.")
    base = defaults.model_dump()
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            rows = [(number, row) for number, row in enumerate(csv.DictReader(handle), start=2)]
    else:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or []
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc}).") from None
        if not isinstance(loaded, list):
            raise ConfigError(f"{path}: expected a list of prompts (each a string or a mapping with 'prompt').")
        rows = [(number, {"prompt": item} if isinstance(item, str) else item)
                for number, item in enumerate(loaded, start=1)]
    specs = []
    for number, row in rows:
        values = {k: v for k, v in (row or {}).items() if v not in (None, "")}
        try:
            specs.append(PromptSpec.model_validate({**base, **values}))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            where = f"line {number}" if path.suffix.lower() == ".csv" else f"entry {number}"
            raise ConfigError(f"{path}, {where}: {problems}. Allowed keys: {', '.join(PromptSpec.model_fields)}.") \
                from None
    if not specs:
        raise ConfigError(f"{path} holds no prompts.")
    return specs


def webui_parameters(text: str, spec: PromptSpec, seed: int, model: str, loras: Sequence[LoraRef],
                     sources: Mapping[str, "LoraSource"] | None = None) -> str:
    """The PNG ``parameters`` text WebUI writes (and reads back with "PNG Info"), with WebUI's ``Lora hashes``
    and the exported version of each LoRA used."""
    tags = " ".join(f"<lora:{r.name}:{r.weight:g}>" for r in loras)
    lines = [f"{text} {tags}".strip()]
    if spec.negative_prompt:
        lines.append(f"Negative prompt: {spec.negative_prompt}")
    settings = (f"Steps: {spec.steps}, CFG scale: {spec.guidance:g}, Seed: {seed}, "
                f"Size: {spec.width}x{spec.height}, Model: {model}")
    used = [(r.name, sources[r.name]) for r in loras if sources and r.name in sources]
    if used:
        settings += ', Lora hashes: "' + ", ".join(f"{n}: {s.short_hash}" for n, s in used) + '"'
        settings += ', Lora versions: "' + ", ".join(f"{n}: {s.version or 'unversioned'}" for n, s in used) + '"'
    if spec.clip_skip and spec.clip_skip > 1:
        settings += f", Clip skip: {spec.clip_skip}"
    lines.append(settings)
    return "\n".join(lines)


@dataclass(frozen=True)
class LoraSource:
    """Where a prompt's LoRA came from: its file, catalog version and WebUI short hash."""

    path: Path
    version: str | None
    short_hash: str
    clip_skip: int | None = None  # ss_clip_skip: the CLIP layer the LoRA was trained on

    @classmethod
    def of(cls, path: Path) -> "LoraSource":
        header = read_safetensors_header(path).metadata
        clip_skip = header.get("ss_clip_skip", "")
        return cls(path, export_version(path), header.get("sshs_model_hash", "")[:12] or "unknown",
                   int(clip_skip) if clip_skip.isdigit() else None)


# ----------------------------------------------------------------------------- precision

def _to_own_dtype(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    dtype = next(module.parameters()).dtype
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


@contextlib.contextmanager
def vae_decodes_in_own_dtype(vae) -> Iterator[None]:
    """While inside, the VAE decodes latents of any dtype in its own one.

    Pipelines hand the VAE latents in the UNet's dtype; after fp16/bf16 training (or with an fp16 VAE under an
    fp32 UNet) that is not the VAE's, and its first convolution raises "Input type (c10::Half) and bias type
    (float) should be the same". Casting at the decoder's entry keeps the VAE in the precision it was given
    (fp32 for SDXL's VAE, which overflows in fp16), and works for every family's pipeline and tiled decoding.
    """
    entries = [m for m in (getattr(vae, "post_quant_conv", None), getattr(vae, "decoder", None)) if m is not None]
    hooks = [m.register_forward_pre_hook(_to_own_dtype) for m in entries]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def match_text_encoders_to_unet(pipe) -> None:
    """Put the text encoders in the denoiser's (UNet's) dtype (the VAE keeps its own, see :func:`vae_decodes_in_own_dtype`).

    A diffusers folder saved in fp16 or bf16 (the merge stage's default output, fp16 folders from the hub) loads
    with diffusers' UNet in fp32 but transformers 5's text encoder in the saved dtype; the UNet then refuses the
    prompt states ("mat1 and mat2 must have the same dtype"). (Single-file checkpoints load in fp32 throughout.)"""
    family = detect_family(pipe)
    dtype = getattr(pipe, family.denoiser).dtype
    for name in family.text_encoders:
        getattr(pipe, name).to(dtype=dtype)


def inference_pipeline(pipe, device: torch.device | str):
    """A pipeline ready for :func:`render`: on ``device``, one compute dtype, no per-step progress bar."""
    match_text_encoders_to_unet(pipe)  # first: diffusers warns when a pipeline with fp16 parts moves to a CPU
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def render(pipe, text: str, spec: PromptSpec, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    prompt = detect_family(pipe).prompt_kwargs(pipe, text, spec.negative_prompt, spec.clip_skip)
    with vae_decodes_in_own_dtype(pipe.vae):
        return pipe(**prompt, num_inference_steps=spec.steps, guidance_scale=spec.guidance, width=spec.width,
                    height=spec.height, generator=generator).images[0]


def generate(pipe, specs: Sequence[PromptSpec], model_name: str,
             sources: Mapping[str, LoraSource] | None = None) -> list[tuple[str, Image.Image]]:
    """Render every prompt ``count`` times (seed, seed+1, ...) with its own LoRA weights."""
    out = []
    total = sum(spec.count for spec in specs)
    with tqdm(total=total, desc="generating", unit="img") as bar:
        for index, spec in enumerate(specs):
            text, refs = parse_prompt(spec.prompt)
            set_weights(pipe, {r.name: r.weight for r in refs})
            spec = with_lora_clip_skip(spec, refs, sources)
            for k in range(spec.count):
                seed = spec.seed + k
                image = render(pipe, text, spec, seed)
                image.info["parameters"] = webui_parameters(text, spec, seed, model_name, refs, sources)
                out.append((f"{index:03d}_{k:02d}_seed{seed}.png", image))
                bar.update(1)
    return out


def with_lora_clip_skip(spec: PromptSpec, refs: Sequence[LoraRef],
                        sources: Mapping[str, LoraSource] | None) -> PromptSpec:
    """A prompt without its own clip_skip uses the one its first LoRA was trained with (ss_clip_skip), as a
    WebUI user would set "Clip skip" for that LoRA."""
    if spec.clip_skip is not None or not sources:
        return spec
    trained = next((sources[r.name].clip_skip for r in refs if r.name in sources and sources[r.name].clip_skip), None)
    return spec.model_copy(update={"clip_skip": trained}) if trained else spec


def contact_sheet(images: Sequence[Image.Image], thumbnail: int, columns: int | None = None) -> Image.Image:
    columns = columns or max(1, math.ceil(math.sqrt(len(images))))
    rows = max(1, math.ceil(len(images) / columns))
    sheet = Image.new("RGB", (columns * thumbnail, rows * thumbnail), "white")
    for index, image in enumerate(images):
        thumb = image.copy()
        thumb.thumbnail((thumbnail, thumbnail))
        sheet.paste(thumb, ((index % columns) * thumbnail, (index // columns) * thumbnail))
    return sheet


@dataclass(frozen=True)
class GridCell:
    """One image of the comparison grid: its label and the weight of every LoRA active in it."""

    label: str
    weights: dict[str, float]
    image: Image.Image


def comparison_cells(pipe, spec: PromptSpec, refs: Sequence[LoraRef],
                     weights: Sequence[float]) -> list[list[GridCell]]:
    """The comparison grid's images, all at the prompt's seed. Rows: each LoRA alone at each weight; with three or
    more LoRAs, a row of every pair at their prompt weights; last row: all LoRAs together."""
    from itertools import combinations

    text, _ = parse_prompt(spec.prompt)

    def cell(label: str, active: dict[str, float]) -> GridCell:
        set_weights(pipe, active)
        return GridCell(label, active, render(pipe, text, spec, spec.seed))

    cells = [[cell(f"{ref.name} {weight:g}", {ref.name: weight}) for weight in weights] for ref in refs]
    if len(refs) > 2:
        cells.append([cell(f"{a.name} {a.weight:g} + {b.name} {b.weight:g}", {a.name: a.weight, b.name: b.weight})
                      for a, b in combinations(refs, 2)])
    cells.append([cell("all: " + ", ".join(f"{r.name} {r.weight:g}" for r in refs), {r.name: r.weight for r in refs})])
    return cells


def grid_image(cells: Sequence[Sequence[GridCell]], thumbnail: int) -> Image.Image:
    """The cells as one labelled image, a row of the grid per row of cells."""
    label_h = 18
    columns = max(len(row) for row in cells)
    grid = Image.new("RGB", (columns * thumbnail, len(cells) * (thumbnail + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            thumb = cell.image.copy()
            thumb.thumbnail((thumbnail, thumbnail))
            x, y = c * thumbnail, r * (thumbnail + label_h)
            draw.text((x + 2, y + 2), cell.label, fill="black")
            grid.paste(thumb, (x, y + label_h))
    return grid


def comparison_grid(pipe, spec: PromptSpec, refs: Sequence[LoraRef], weights: Sequence[float],
                    thumbnail: int) -> Image.Image:
    """:func:`comparison_cells` as one labelled image (:func:`grid_image`)."""
    return grid_image(comparison_cells(pipe, spec, refs, weights), thumbnail)
