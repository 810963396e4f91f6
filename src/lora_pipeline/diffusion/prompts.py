"""WebUI prompt syntax: ``<lora:NAME:WEIGHT>`` tags, and resolving NAME in LoRA library folders."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lora_pipeline.core.errors import ConfigError
from lora_pipeline.core.files import newest_version, versions

_TAG = re.compile(r"<lora:([^:<>]*)(?::([^:<>]*))?>", re.IGNORECASE)
_OPENING = re.compile(r"<\s*lora\s*:", re.IGNORECASE)


@dataclass(frozen=True)
class LoraRef:
    name: str
    weight: float


def parse_prompt(prompt: str) -> tuple[str, list[LoraRef]]:
    """Split a prompt into its text (tags removed) and its LoRA references, in order.

    ``<lora:name>`` means weight 1.0; weights may be negative; a name may contain spaces and dots.
    Malformed tags and a name given twice are errors that quote the offending part.
    """
    refs: list[LoraRef] = []
    spans = []
    for match in _TAG.finditer(prompt):
        name, raw_weight = match.group(1).strip(), match.group(2)
        if not name:
            raise ConfigError(f"Empty LoRA name in {match.group(0)!r}: write <lora:NAME:WEIGHT>, e.g. <lora:hero:0.7>.")
        if raw_weight is None or not raw_weight.strip():
            weight = 1.0
        else:
            try:
                weight = float(raw_weight)
            except ValueError:
                raise ConfigError(f"LoRA weight {raw_weight!r} in {match.group(0)!r} is not a number; "
                                  f"write e.g. <lora:{name}:0.8>.") from None
        if any(ref.name == name for ref in refs):
            raise ConfigError(f"LoRA {name!r} appears twice in the prompt {prompt!r}; keep one tag per LoRA.")
        refs.append(LoraRef(name, weight))
        spans.append(match.span())
    covered = {i for start, end in spans for i in range(start, end)}
    for opening in _OPENING.finditer(prompt):
        if opening.start() not in covered:
            fragment = prompt[opening.start():opening.start() + 40]
            raise ConfigError(f"Malformed LoRA tag near {fragment!r}: write <lora:NAME:WEIGHT> with a closing '>'.")
    text = _TAG.sub("", prompt)
    text = re.sub(r"\s*,(\s*,)+", ",", text)
    text = re.sub(r"\s{2,}", " ", text).strip().strip(",").strip()
    return text, refs


def lora_index(folders: Sequence[str | Path]) -> dict[str, Path]:
    """``{name: file}`` for every LoRA in ``folders``; earlier folders win on a name clash.

    Understands the project's versioned exports (``name.safetensors/<version>/name.safetensors``: the newest
    version is used) and plain WebUI ``models/Lora`` folders (``name.safetensors``, sub-folders allowed).
    """
    index: dict[str, Path] = {}
    for folder in folders:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*.safetensors")):
            if path.is_file() and not _in_versioned_folder(path):
                index.setdefault(path.stem, newest_version(path.parent.parent) if export_version(path) else path)
    return index


def _in_versioned_folder(path: Path) -> bool:
    """A file inside a versioned export folder (``name_diffusers/<version>/name_diffusers/...``: the diffusers copy
    of a LoRA whose WebUI file is indexed already), not a LoRA of its own."""
    return len(path.parents) > 3 and path.parents[2].name == path.parent.name


def export_version(path: Path) -> str | None:
    """The catalog version of a versioned export (``name.safetensors/<version>/name.safetensors``), else None."""
    return path.parent.name if path.parent.parent.name == path.name else None


def _pinned(name: str, folders: Sequence[str | Path]) -> Path:
    """``NAME@VERSION``: that exported version of NAME, or an error listing the versions there are."""
    base, version = name.rsplit("@", 1)
    saved: list[str] = []
    for folder in folders:
        versioned = Path(folder).expanduser() / f"{base}.safetensors"
        candidate = versioned / version / f"{base}.safetensors"
        if candidate.is_file():
            return candidate
        saved += [path.parent.name for path in versions(versioned)]
    raise ConfigError(f"LoRA {base!r} has no exported version {version!r}. Versions: "
                      f"{', '.join(saved) or 'none'}. Write <lora:{base}:w> for the newest.")


def resolve_loras(refs: Sequence[LoraRef], folders: Sequence[str | Path]) -> dict[str, Path]:
    """Files for every referenced name (``NAME`` = newest export, ``NAME@VERSION`` = that one), or one error
    listing close matches and the folders searched."""
    index = lora_index(folders)
    found = {}
    for ref in refs:
        if "@" in ref.name:
            found[ref.name] = _pinned(ref.name, folders)
            continue
        if ref.name in index:
            found[ref.name] = index[ref.name]
            continue
        close = difflib.get_close_matches(ref.name, list(index), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        searched = ", ".join(str(f) for f in folders) or "(no folders configured)"
        raise ConfigError(f"Unknown LoRA {ref.name!r}.{hint} Searched: {searched}. "
                          f"Copy the .safetensors file into one of them or fix the name in the prompt.")
    return found
