"""Caption review: batch tag edits over a selection of captions, and saving them as ``reviewed_captions.csv``.

Tags are split and re-ordered by :mod:`lora_pipeline.prep.captions` (the rules the pipeline applies); this
module only decides which captions an edit touches. No Kedro here: the caller hands in plain dicts and paths.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence

from lora_pipeline.core.files import atomic_path
from lora_pipeline.prep.captions import normalize_prompt, split_tags, tag_frequency

EditOp = Literal["set", "add", "remove", "replace", "front", "trigger_first"]


@dataclass(frozen=True)
class CaptionEdit:
    """One edit from the page: ``set`` a caption's text, or a tag edit applied to every selected caption."""

    op: EditOp
    tag: str = ""  # add / remove / replace (the old tag) / front
    replacement: str = ""  # replace: the new tag
    text: str = ""  # set: the whole caption


def _joined(tags: Sequence[str]) -> str:
    return ", ".join(dict.fromkeys(tags))  # a tag once, where it first appears


def edited_caption(caption: str, edit: CaptionEdit, trigger: str) -> str:
    """``caption`` after ``edit``. ``front`` and ``trigger_first`` put the trigger first, then (front) the tag,
    exactly as normalization orders a training prompt's ``front_keywords``; case is kept (the person typed it)."""
    tags = split_tags(caption)
    tag = " ".join(edit.tag.split())
    if edit.op == "set":
        return edit.text.strip()
    if edit.op == "add":
        return _joined(tags + split_tags(tag))
    if edit.op == "remove":
        return _joined([t for t in tags if t != tag])
    if edit.op == "replace":
        new = split_tags(edit.replacement)
        return _joined([part for t in tags for part in (new if t == tag else [t])])
    if edit.op == "front":
        return normalize_prompt(caption, trigger, lowercase=False, front_keywords=[tag]) if tag in tags else caption
    if edit.op == "trigger_first":
        return normalize_prompt(caption, trigger, lowercase=False)
    raise ValueError(f"unknown caption edit {edit.op!r}")


def apply_edit(captions: Mapping[str, str], names: Sequence[str], edit: CaptionEdit, trigger: str) -> dict[str, str]:
    """The new text of every caption among ``names`` that ``edit`` changes (the others are left out)."""
    changed = {}
    for name in names:
        if name in captions:
            new = edited_caption(captions[name], edit, trigger)
            if new != captions[name]:
                changed[name] = new
    return changed


def tag_counts(captions: Mapping[str, str]) -> dict[str, int]:
    """Tag -> number of captions that hold it, most frequent first (the pipeline's ``tag_frequency``)."""
    return tag_frequency(captions.values())


def merged_reviews(existing: Mapping[str, str], edited: Mapping[str, str]) -> dict[str, str]:
    """The reviewed rows after a save: every row already there (other images' included: several subjects may share
    one file), with the edited captions replacing or joining them."""
    return {**existing, **{name: text.strip() for name, text in edited.items()}}


def write_reviewed_captions(path: Path, rows: Mapping[str, str]) -> None:
    """``file_name,text`` rows (text quoted where it has commas), written atomically: a reader, or a pipeline run
    starting meanwhile, sees the old file or the new one, never half of it."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["file_name", "text"])
            writer.writerows(rows.items())
