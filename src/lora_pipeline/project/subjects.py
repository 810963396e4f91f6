"""Many subjects in one project: each LoRA runs the image pipelines under its own Kedro namespace.

``conf/<env>/subjects.yml`` lists the subjects. The shared parameter groups (``parameters_training.yml``
...) are the defaults; :class:`SubjectsConfigLoader` gives each subject its own copy under its namespace
(``params:aki.training``), with the subject's trigger, base model and overrides merged in. The catalog's
dataset factories (``"{subject}.captions"``) give every subject its own files, so adding a subject is one
YAML entry and a folder of images.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Mapping

from kedro.config import OmegaConfigLoader

from lora_pipeline.core.config import SUBJECT_GROUPS, SubjectParams, parse_subjects

SUBJECT_PATTERNS = ["subjects*", "subjects*/**", "**/subjects*"]


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, Mapping) and isinstance(override, Mapping):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _merge(base.get(key), value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(override)


def _fill(value: Any, name: str, trigger: str) -> Any:
    if isinstance(value, str):
        return value.replace("{subject}", name).replace("{trigger}", trigger)
    if isinstance(value, Mapping):
        return {k: _fill(v, name, trigger) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, name, trigger) for v in value]
    return value


def subject_parameters(parameters: Mapping[str, Any], name: str, subject: SubjectParams,
                       position: int = 0) -> dict[str, Any]:
    """One subject's parameter groups: the shared group, then what the subject implies, then its overrides.

    ``position`` (the subject's place in subjects.yml) becomes ``training.gpu``: with several GPUs and
    ParallelRunner, subject k trains on GPU k modulo the GPU count.
    """
    trigger = subject.trigger if subject.trigger is not None else str(
        parameters.get("captioning", {}).get("trigger", ""))
    implied: dict[str, dict[str, Any]] = {"training": {"output_name": name, "gpu": position},
                                          "normalization": {"subject": name}}
    if subject.trigger is not None:
        implied["captioning"] = {"trigger": subject.trigger}
        implied["normalization"]["prompt"] = {"trigger": subject.trigger}
    for group in ("training", "normalization"):
        if subject.base_model:
            implied.setdefault(group, {})["base_model"] = subject.base_model
        if subject.base_model_family:
            implied.setdefault(group, {})["base_model_family"] = subject.base_model_family
    groups = {}
    for group in SUBJECT_GROUPS:
        merged = _merge(parameters.get(group, {}), implied.get(group, {}))
        groups[group] = _fill(_merge(merged, getattr(subject, group)), name, trigger)
    return groups


def subject_catalog(name: str, subject: SubjectParams) -> dict[str, Any]:
    """Explicit raw-data entries for a subject whose images live elsewhere (they win over the factories)."""
    entries = {}
    if subject.images:
        entries[f"{name}.raw_images"] = {"type": "lora_pipeline.datasets.ImageFolderDataset", "path": subject.images,
                                         "metadata": {"kedro-viz": {"layer": "raw"}}}
    if subject.reg_images:
        entries[f"{name}.reg_images"] = {"type": "lora_pipeline.datasets.ImageFolderDataset", "path": subject.reg_images,
                                         "required": False, "metadata": {"kedro-viz": {"layer": "raw"}}}
    if subject.reviewed_captions:
        entries[f"{name}.reviewed_captions"] = {"type": "lora_pipeline.datasets.ReviewedCaptionsDataset",
                                                "filepath": subject.reviewed_captions,
                                                "metadata": {"kedro-viz": {"layer": "raw"}}}
    return entries


# The environment of the newest KedroSession's config loader. Kedro builds a session's config loader before the
# session first reads its pipelines, but hands the registry no environment: this is how the registry learns it.
_session_env: str | None = None


class SubjectsConfigLoader(OmegaConfigLoader):
    """Kedro's OmegaConfigLoader, plus per-subject parameters and raw-data catalog entries from subjects.yml."""

    def __init__(self, *args: Any, **kwargs: Any):
        global _session_env
        super().__init__(*args, **kwargs)
        self.config_patterns.setdefault("subjects", SUBJECT_PATTERNS)
        _session_env = self.env or self.default_run_env

    def subjects(self) -> dict[str, SubjectParams]:
        return parse_subjects(super().__getitem__("subjects"))

    def __getitem__(self, key: str) -> dict[str, Any]:
        value = super().__getitem__(key)
        if key == "parameters":
            value = dict(value)
            for position, (name, subject) in enumerate(self.subjects().items()):
                value[name] = _merge(subject_parameters(value, name, subject, position), value.get(name, {}))
        elif key == "catalog":
            value = dict(value)
            for name, subject in self.subjects().items():
                value.update(subject_catalog(name, subject))
        return value


def run_env() -> str:
    """The environment of the current session (``kedro run --env``), else ``KEDRO_ENV``, else local."""
    return _session_env or os.environ.get("KEDRO_ENV", "local")


def project_subjects(conf_source: str | Path = "conf", env: str | None = None) -> dict[str, SubjectParams]:
    """The subjects of the project in the working folder, for the pipeline registry."""
    loader = SubjectsConfigLoader(conf_source=str(conf_source), env=env or run_env(), base_env="base",
                                  default_run_env="local")
    return loader.subjects()


# ----------------------------------------------------------------------------- which subjects changed

def _raw_paths(catalog, name: str) -> list[Path]:
    """The files a subject's run reads from raw data: its image folder (sidecars included) and reviewed captions."""
    paths = []
    for dataset in (f"{name}.raw_images", f"{name}.reg_images", f"{name}.reviewed_captions"):
        config = catalog.config_resolver.resolve_pattern(dataset)  # explicit entry or factory, as Kedro resolves it
        where = config.get("path") or config.get("filepath")
        if not where:
            continue  # not a file dataset (no entry at all): it reads nothing from disk
        location = Path(str(where))
        if location.is_dir():
            paths += sorted(p for p in location.rglob("*") if p.is_file())
        elif location.is_file():
            paths.append(location)
    return paths


def subject_fingerprint(catalog, parameters: Mapping[str, Any], name: str) -> str:
    """What a subject's training depends on: its raw files (name, size, mtime) and its parameters."""
    from lora_pipeline.core.files import canonical_json, sha256_hex

    def lines():
        yield canonical_json(parameters.get(name, {}))
        for path in _raw_paths(catalog, name):
            stat = path.stat()
            yield f"{path.as_posix()}|{stat.st_size}|{stat.st_mtime_ns}\n"

    return sha256_hex(lines())


def inputs_dataset(name: str) -> str:
    """The catalog entry that remembers what subject ``name`` was last trained on (``{subject}.subject_inputs``)."""
    return f"{name}.subject_inputs"


def recorded_fingerprint(catalog, name: str):
    """The :class:`~lora_pipeline.core.spec.SubjectInputs` recorded after the subject's last full run, or None
    (never trained here, or a file this version cannot read: the subject counts as changed)."""
    from kedro.io import DatasetError

    from lora_pipeline.core.errors import DataError

    try:
        return catalog.load(inputs_dataset(name)) if catalog.exists(inputs_dataset(name)) else None
    except (DatasetError, DataError):
        return None


def record_fingerprint(catalog, name: str, fingerprint: str) -> None:
    from datetime import datetime, timezone

    from lora_pipeline.core.spec import SubjectInputs

    catalog.save(inputs_dataset(name), SubjectInputs(
        fingerprint=fingerprint, trained_at=datetime.now(timezone.utc).isoformat(timespec="seconds")))
