"""Checkpoints shared by the image and the LLM trainers: atomic folders with checksums, and resume rules.

A checkpoint is ``checkpoint-<step>/`` holding ``lora.safetensors`` (the trainable weights), ``state.pt``
(optimizer, scheduler, torch RNG, step) and ``meta.json`` (step, run signature, sha256 of both files).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from lora_pipeline.core.errors import LoraPipelineError
from lora_pipeline.core.files import atomic_folder, json_sha256, sha256_file

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class ResumeError(LoraPipelineError):
    """A requested resume cannot continue the same run."""


def run_signature(base_model: str, dataset: str, spec: Any, settings: Mapping[str, Any],
                  added_later: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The one rule for what must match for a checkpoint to continue *this* run rather than silently start
    another, for the image and the LLM trainers alike: the base model, the dataset hash, the LoRA spec, and
    ``settings`` (those that change the training trajectory; never max_steps/epochs, so raising them goes on).

    ``added_later`` maps settings introduced after runs were already on disk to their defaults: such a setting
    is part of the signature only when it differs from that default, so the signature (and the run folder) of
    an earlier run stays what it was and its checkpoints still resume."""
    later = added_later or {}
    return {"base_model": base_model, "dataset": dataset, "spec": spec.model_dump(mode="json"),
            **{key: value for key, value in settings.items() if key not in later or value != later[key]}}


def run_folder(subject_folder: Path, signature: dict) -> Path:
    """Where one run's checkpoints live: ``<subject>/run-<hash of its signature>``.

    A retrain (new images, other settings) gets its own folder, so it never resumes from, confuses or prunes
    another run's checkpoints; raising max_steps keeps the signature, so the same run goes on.
    """
    return subject_folder / f"run-{json_sha256(signature, 12)}"


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def save_checkpoint(folder: Path, step: int, lora_state: dict[str, torch.Tensor], optimizer, scheduler,
                    signature: dict, keep: int) -> Path:
    """Write ``checkpoint-<step>`` atomically (temp folder + rename), with sha256 of each file."""
    from safetensors.torch import save_file

    target = folder / f"checkpoint-{step:07d}"
    with atomic_folder(target) as tmp:
        save_file(lora_state, str(tmp / "lora.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                    "torch_rng": torch.get_rng_state(), **_device_rng()}, tmp / "state.pt")
        meta = {"step": step, "signature": signature,
                "sha256": {name: sha256_file(tmp / name) for name in ("lora.safetensors", "state.pt")}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("Saved checkpoint %s", target)
    return target


def checkpoint_is_intact(path: Path) -> bool:
    try:
        meta = json.loads((path / "meta.json").read_text())
        return all(sha256_file(path / name) == digest for name, digest in meta["sha256"].items())
    except (OSError, ValueError, KeyError):
        return False


def find_resume_checkpoint(resume: str, folder: Path) -> Path | None:
    """Resolve ``resume``: none | auto / latest (this run's newest, if any) | a checkpoint folder.

    Corrupt or truncated checkpoints are skipped (with a warning) in favour of the previous intact one.
    """
    if resume == "none":
        return None
    if resume in ("auto", "latest"):
        candidates = list_checkpoints(folder)
        for path in reversed(candidates):
            if checkpoint_is_intact(path):
                return path
            logger.warning("Checkpoint %s is corrupt or incomplete (checksum mismatch); trying the previous one",
                           path)
        return None
    path = Path(resume)
    if not checkpoint_is_intact(path):
        raise ResumeError(f"resume: {path} is not an intact checkpoint folder (missing files or checksum "
                          f"mismatch). Pick another folder from {folder}.")
    return path


def resume_problem(checkpoint: Path, signature: dict, total_steps: int) -> str | None:
    """Why ``checkpoint`` cannot continue this run (other settings/data, or already finished), or None."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    saved = meta["signature"]
    now = json.loads(json.dumps(signature, default=str))
    differences = [f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}" for k, v in now.items() if saved.get(k) != v]
    if differences:
        return "it belongs to a different run (" + "; ".join(differences) + ")"
    if int(meta["step"]) >= total_steps:
        return f"that run already finished (step {meta['step']} of {total_steps}); raise max_steps/epochs to go on"
    return None


def choose_resume(resume: str, folder: Path, signature: dict, total_steps: int) -> Path | None:
    """The checkpoint this run continues from, or None to start at step 0.

    ``auto`` continues an unfinished run of the same settings and data and otherwise starts a new one (saying
    so); ``latest`` and an explicit folder must continue, or fail with the reason.
    """
    checkpoint = find_resume_checkpoint(resume, folder)
    if checkpoint is None and resume == "latest":
        others = [c for run in folder.parent.glob("run-*") if run != folder for c in list_checkpoints(run)]
        newest = max(others, key=lambda c: c.stat().st_mtime, default=None)
        why = (f" The subject's newest checkpoint, {newest}, cannot continue it: "
               f"{resume_problem(newest, signature, total_steps) or 'it is another run'}." if newest else "")
        raise ResumeError(f"resume: latest, but this run has no intact checkpoint in {folder}.{why} Restore those "
                          f"settings, use resume: auto to start this run, or resume: <checkpoint folder> to "
                          f"continue another run on purpose.")
    if checkpoint is None:
        if resume != "none":
            logger.info("No checkpoint to resume in %s: starting at step 0", folder)
        return None
    problem = resume_problem(checkpoint, signature, total_steps)
    if problem and resume == "auto":
        logger.warning("Not resuming from %s: %s. Starting a new run (resume: auto).", checkpoint, problem)
        return None
    if problem:
        raise ResumeError(f"Cannot resume from {checkpoint}: {problem}. Restore those settings, or set "
                          f"resume: none (or another output_name) to start a new run on purpose.")
    logger.info("Resuming from %s", checkpoint)
    return checkpoint


def load_checkpoint(checkpoint: Path, optimizer, scheduler) -> tuple[dict[str, torch.Tensor], int]:
    """Restore optimizer, scheduler and RNG in place; return the LoRA weights and the step."""
    from safetensors.torch import load_file

    state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available() and len(state["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return load_file(str(checkpoint / "lora.safetensors")), int(state["step"])


def _device_rng() -> dict[str, Any]:
    """The CUDA generators' states (LoRA dropout draws from them on a GPU), which accelerate's save_state would
    also keep. accelerate's save_state itself is not used: it writes every prepared model's full weights (the whole
    UNet or transformer, GBs per checkpoint) unless hooks strip them, and it has no checksums or run signature."""
    return {"cuda_rng": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}
