"""kohya's folder conventions: ``train/10_sks woman/`` trains its images 10 times per epoch with the class token
``sks woman``; ``reg/1_woman/`` holds regularization (class) images for prior preservation."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class Concept:
    """The folder an image came from, read as kohya reads it."""

    folder: str  # the first folder below the image root; "" for images directly in it
    repeats: int = 1
    class_tokens: str = ""

    @property
    def is_kohya(self) -> bool:
        return bool(self.class_tokens)


def concept_of(file_name: str, kohya_folders: bool = True) -> Concept:
    """``10_aki/x.png`` -> Concept("10_aki", 10, "aki"). With ``kohya_folders: false`` (a folder such as
    ``2_cats`` that is meant literally), or for a folder without the ``N_`` prefix: repeats 1, no class token."""
    parts = PurePosixPath(file_name).parts
    folder = parts[0] if len(parts) > 1 else ""
    match = KOHYA_FOLDER.match(folder) if kohya_folders else None
    if not match:
        return Concept(folder)
    return Concept(folder, int(match.group(1)), " ".join(match.group(2).split()))


def regularization_prompt(sidecar: str | None, concept: Concept) -> str:
    """A class image's prompt, as kohya builds it: its caption file if there is one, else the class token."""
    return (sidecar or "").strip() or concept.class_tokens


def epoch_items(instance: list[tuple[int, int]], regularization: list[tuple[int, int]]) -> list[int]:
    """One epoch's examples by index, kohya's way: each instance example ``repeats`` times, then the
    regularization examples (with their repeats) cycled or cut to as many items as the instance side has.

    ``instance`` and ``regularization`` are ``(index, repeats)`` pairs in a fixed order, so the selection of
    class images, and with it the number of steps per epoch, is the same every epoch.
    """
    items = [index for index, repeats in instance for _ in range(repeats)]
    pool = [index for index, repeats in regularization for _ in range(repeats)]
    if pool:
        items += [pool[k % len(pool)] for k in range(len(items))]
    return items
