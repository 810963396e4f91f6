"""A diffusion transformer's original module layout against diffusers' one, for LoRA names.

kohya's trainers, ComfyUI and most downloaded LoRAs of the transformer families name modules as the model's
original checkpoint does (BFL's Flux, Stability's MMDiT ...), where attention's q/k/v are often one ``qkv`` Linear
(and Flux's single block fuses q/k/v with its MLP input in one ``linear1``); diffusers splits them. A family
describes its layout as :class:`BlockMap` rows; :class:`OriginalLayout` answers, for any diffusers module, which
original module it is (or which row-part of one).

A LoRA trained on the split modules is written fused, the way kohya writes one (:func:`fuse`): the parts' downs
stacked (``n*r x in``), their ups block-diagonal (``sum(out) x n*r``) and alpha multiplied by ``n``, so that
``alpha / rank`` -- the strength every reader applies -- stays the parts' ``alpha / r``. Reading goes the other
way (:func:`split`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, NamedTuple

import torch


@dataclass(frozen=True)
class FusedModule:
    """One original-layout module and the diffusers modules whose outputs it stacks, in row order."""

    original: str  # e.g. double_blocks.0.img_attn.qkv
    parts: tuple[str, ...]  # e.g. transformer_blocks.0.attn.to_q, ...to_k, ...to_v


class Fused(NamedTuple):
    """A LoRA-name index entry of a fused module: its component, its parts' paths and their output widths."""

    component: str
    parts: tuple[str, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class BlockMap:
    """The modules of one kind of block: diffusers' ``<diffusers>.<i>.<module>`` is the original
    ``<original>.<i>.<module there>`` (``plain``), or one row-part of a fused original module (``fused``)."""

    diffusers: str  # transformer_blocks
    original: str  # double_blocks
    plain: Mapping[str, str]  # {"attn.to_out.0": "img_attn.proj"}
    fused: Mapping[str, tuple[str, ...]] = ()  # {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v")}


class OriginalLayout:
    """A transformer's blocks in the original layout (only block modules: embedders and final layers, which the
    trainers' default targets leave out, have no entry and keep their diffusers names)."""

    def __init__(self, *blocks: BlockMap):
        self.blocks = {block.diffusers: block for block in blocks}
        kinds = "|".join(re.escape(name) for name in self.blocks)
        self._pattern = re.compile(rf"^({kinds})\.(\d+)\.(.+)$")

    def original_name(self, module: str) -> tuple[str, int] | None:
        """``(original module, row-part index)`` for a diffusers module (index -1 when not fused), or None."""
        match = self._pattern.match(module)
        if not match:
            return None
        kind, index, rest = match.groups()
        block = self.blocks[kind]
        prefix = f"{block.original}.{index}"
        if rest in block.plain:
            return f"{prefix}.{block.plain[rest]}", -1
        for name, parts in dict(block.fused).items():
            if rest in parts:
                return f"{prefix}.{name}", parts.index(rest)
        return None

    def fused_modules(self, modules: list[str]) -> dict[str, FusedModule]:
        """Group diffusers modules by the original module each one is (part of)."""
        groups: dict[str, dict[int, str]] = {}
        for module in modules:
            found = self.original_name(module)
            if found is not None:
                groups.setdefault(found[0], {})[found[1]] = module
        return {original: FusedModule(original, tuple(parts[i] for i in sorted(parts)))
                for original, parts in groups.items()}

    def part_count(self, original: str) -> int:
        """How many diffusers modules the original module ``original`` stacks (1 when it is not fused)."""
        for block in self.blocks.values():
            for name, parts in dict(block.fused).items():
                if re.fullmatch(rf"{re.escape(block.original)}\.\d+\.{re.escape(name)}", original):
                    return len(parts)
        return 1


def linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``{path: layer}`` of a model's Linear layers, a PEFT-wrapped one (a LoRA adapter already loaded) under its own
    path and never its insides (``.base_layer``, ``.lora_A.default`` ...)."""
    wrapped = tuple(path + "." for path, m in model.named_modules() if path and hasattr(m, "base_layer"))
    return {path: m for path, m in model.named_modules()
            if isinstance(getattr(m, "base_layer", m), torch.nn.Linear) and not path.startswith(wrapped)}


def fuse(downs: list[torch.Tensor], ups: list[torch.Tensor], alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One LoRA over the stacked outputs of ``len(downs)`` LoRAs of rank r on the same input: downs stacked, ups
    block-diagonal, alpha times the part count (the fused rank), so the strength is unchanged."""
    return torch.cat(downs, dim=0), torch.block_diag(*ups), alpha * len(downs)


def split(down: torch.Tensor, up: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fused module's LoRA as one ``(down, up)`` per part, each part scaled as the fused module is (its alpha over
    the fused rank). ``sizes`` are the parts' output widths, in row order.

    Parts trained apart and saved fused (:func:`fuse`, kohya's own split-qkv files) have a block-diagonal up: each
    part gets back its own rank-r pair, so a retrain from the file (``init_lora``) has the rank it trained at.
    A qkv trained as one module (a dense up) gives each part the whole down and its rows of the up."""
    if sum(sizes) != up.shape[0]:
        raise ValueError(f"the fused module has {up.shape[0]} output rows, its parts {sizes} (sum {sum(sizes)})")
    rows = torch.split(up, sizes, dim=0)
    count, rank = len(sizes), down.shape[0]
    if rank % count == 0 and count > 1:
        part_rank = rank // count
        own = [block[:, j * part_rank:(j + 1) * part_rank] for j, block in enumerate(rows)]
        if torch.equal(torch.block_diag(*own), up):
            return [(down[j * part_rank:(j + 1) * part_rank], block) for j, block in enumerate(own)]
    return [(down, block) for block in rows]
