"""The one module of the workbench that reads Kedro: the project's subjects, catalog entries and parameters.

Everything is read as ``kedro run`` would read it (the same config loader, dataset factories and validated
parameter models); versioned datasets are loaded through a fresh dataset object each time, so a version that a
run wrote a second ago is the one shown (a catalog's dataset remembers the newest version it saw).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_pipeline.core.errors import LoraPipelineError
from lora_pipeline.ui.captions import merged_reviews, write_reviewed_captions


@dataclass(frozen=True)
class CaptionRow:
    """One raw image as the captions page shows it."""

    file_name: str
    text: str
    source: str  # reviewed / sidecar / auto / none, as the captioning stage picks it; "new": not captioned yet
    status: str  # kept / rejected / unchecked (no quality report row yet)
    reason: str = ""


@dataclass(frozen=True)
class SubjectCaptions:
    subject: str
    trigger: str
    rows: list[CaptionRow]
    reviewed_path: Path
    captioned_version: str | None  # the captions table version shown, None before the first captioning run
    reviewed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SubjectRow:
    """A line of the subjects table."""

    name: str
    family: str
    base_model: str
    images: int
    trained_at: str | None  # when the fingerprint was last recorded (a full run that trained and exported it)
    dataset_hash: str
    changed: bool  # the fingerprint `lora-pipeline run` compares differs (or it was never trained)
    mlflow_run_id: str
    error: str = ""  # why the row could not be read (a bad reviewed_captions.csv ...)


class ProjectView:
    """The project at ``root`` in Kedro environment ``env``; the Kedro context is rebuilt when conf/ changes."""

    def __init__(self, root: Path, env: str | None):
        self.root = Path(root).resolve()
        self.env = env
        self._lock = threading.Lock()
        self._loaded: tuple[float, Any, dict[str, Any], dict[str, Any]] | None = None

    # ------------------------------------------------------------------ the Kedro context

    def _conf_stamp(self) -> float:
        files = [p for p in (self.root / "conf").rglob("*") if p.is_file()]
        return max((p.stat().st_mtime for p in files), default=0.0) + len(files)

    def _state(self) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """``(context, parameters as written, validated parameter models)``."""
        from kedro.framework.session import KedroSession
        from kedro.framework.startup import bootstrap_project

        from lora_pipeline.core.config import validate_all

        with self._lock:
            stamp = self._conf_stamp()
            if self._loaded is None or self._loaded[0] != stamp:
                bootstrap_project(self.root)
                with KedroSession.create(project_path=self.root, env=self.env) as session:
                    context = session.load_context()
                parameters = context.config_loader["parameters"]
                validated = validate_all(parameters, context.config_loader.subjects())
                self._loaded = (stamp, context, parameters, validated)
            return self._loaded[1:]

    @property
    def catalog(self):
        return self._state()[0].catalog

    def subjects(self) -> list[str]:
        return list(self._state()[0].config_loader.subjects())

    def params(self, group: str):
        """A validated parameter model: ``demo_lora.captioning``, ``generation`` ..."""
        return self._state()[2][group]

    def _config(self, dataset: str) -> dict[str, Any]:
        return self.catalog.config_resolver.resolve_pattern(dataset)

    def dataset_path(self, dataset: str) -> Path:
        """Where a catalog entry lives on disk (its ``filepath`` or ``path``), absolute."""
        config = self._config(dataset)
        where = config.get("filepath") or config.get("path")
        if not where:
            raise LoraPipelineError(f"catalog entry {dataset} has no file")
        path = Path(str(where))
        return path if path.is_absolute() else self.root / path

    def load(self, dataset: str, default: Any = None) -> Any:
        """The dataset's newest data through a fresh dataset object, or ``default`` when nothing is saved yet."""
        from kedro.io import AbstractDataset

        instance = AbstractDataset.from_config(dataset, self._config(dataset))
        return instance.load() if instance.exists() else default

    def require_subject(self, subject: str) -> str:
        if subject not in self.subjects():
            raise KeyError(subject)
        return subject

    # ------------------------------------------------------------------ captions

    def image_folder(self, subject: str):
        return self.load(f"{subject}.raw_images")

    def reviewed(self, subject: str) -> dict[str, str]:
        table = self.load(f"{subject}.reviewed_captions")
        return dict(zip(table.file_name, table.text)) if table is not None else {}

    def captions(self, subject: str) -> SubjectCaptions:
        """Every raw image with the caption the captioning stage gives it now (``pick_caption`` over the current
        reviewed file, the scanned sidecar and the cached auto caption) and its quality-report status."""
        from lora_pipeline.core.files import newest_version
        from lora_pipeline.prep.captions import pick_caption

        self.require_subject(subject)
        p = self.params(f"{subject}.captioning")
        images = self.image_folder(subject)
        reviewed = self.reviewed(subject)
        table = self.load(f"{subject}.captions")
        manifest = self.load(f"{subject}.image_manifest")
        report = self.load(f"{subject}.quality_report")
        auto = {} if table is None else {n: a for n, a in zip(table.file_name, table.auto_caption) if a}
        captioned = set() if table is None else set(table.file_name)
        scanned = set() if manifest is None else set(manifest.file_name)
        sidecars = {} if manifest is None else {
            n: s for n, s, has in zip(manifest.file_name, manifest.sidecar, manifest.has_sidecar)
            if str(has).lower() == "true"}
        checks = {} if report is None else {n: (s, r) for n, s, r in zip(report.file_name, report.status,
                                                                           report.reason)}
        rows = []
        for name in images.names if images is not None else []:
            if name not in scanned:
                sidecars.update(_unscanned_sidecar(images.path(name), name, p.caption_extension))
            text, source = pick_caption(reviewed.get(name), sidecars.get(name), auto.get(name), p)
            if source == "none" and name not in captioned:
                source = "new"
            status, reason = checks.get(name, ("unchecked", ""))
            rows.append(CaptionRow(name, text, source, status, reason))
        version = newest_version(self.dataset_path(f"{subject}.captions"))
        return SubjectCaptions(subject, p.trigger, rows, self.dataset_path(f"{subject}.reviewed_captions"),
                               version.parent.name if version else None, reviewed)

    def save_reviews(self, subject: str, edited: dict[str, str]) -> Path:
        """Write the edited captions into the subject's reviewed_captions.csv (the rows already there stay)."""
        self.require_subject(subject)
        names = set(self.image_folder(subject).names)
        unknown = sorted(set(edited) - names)
        if unknown:
            raise LoraPipelineError(f"{unknown[0]!r} is not an image of subject {subject}")
        path = self.dataset_path(f"{subject}.reviewed_captions")
        write_reviewed_captions(path, merged_reviews(self.reviewed(subject), edited))
        return path

    # ------------------------------------------------------------------ subjects

    def subject_row(self, name: str) -> SubjectRow:
        from lora_pipeline.project.subjects import recorded_fingerprint, subject_fingerprint

        state = self._state()
        training = self.params(f"{name}.training")
        summary = self.load(f"{name}.training_summary")
        try:
            images = self.image_folder(name)
            previous = recorded_fingerprint(state[0].catalog, name)
            changed = previous is None or previous.fingerprint != subject_fingerprint(state[0].catalog, state[1],
                                                                                       name)
            error = ""
        except LoraPipelineError as exc:
            images, previous, changed, error = None, None, True, str(exc)
        return SubjectRow(
            name=name, family=summary.family if summary is not None else _family_of(training),
            base_model=str(training.base_model), images=len(images.names) if images is not None else 0,
            trained_at=previous.trained_at if previous else None,
            dataset_hash=(summary.dataset_hash[:12] if summary is not None else ""), changed=changed,
            mlflow_run_id=(summary.mlflow_run_id or "") if summary is not None else "", error=error)

    def subject_rows(self) -> list[SubjectRow]:
        return [self.subject_row(name) for name in self.subjects()]

    # ------------------------------------------------------------------ files the browser may read

    def allowed_roots(self) -> list[Path]:
        """The project folder, then each subject's configured folders (which may live outside it)."""
        roots = [self.root]
        for name in self.subjects():
            for dataset in (f"{name}.raw_images", f"{name}.reg_images"):
                roots.append(self.dataset_path(dataset))
        return roots

    def lora_dirs(self) -> list[Path]:
        return [p if p.is_absolute() else self.root / p for p in map(Path, self.params("generation").lora_dirs)]

    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"


def _family_of(training) -> str:
    """The family training would use (``base_model_family``, or read from the base model as training reads it)."""
    from lora_pipeline.diffusion.families import detect_family

    if training.base_model_family != "auto":
        return training.base_model_family
    try:
        return detect_family(training.base_model).name
    except LoraPipelineError as exc:
        return f"unknown ({exc})"


def _unscanned_sidecar(image: Path, name: str, extension: str) -> dict[str, str]:
    """The kohya caption file of an image the captioning stage has not scanned yet, read as that stage reads it."""
    from lora_pipeline.prep.images import read_sidecar_detected

    try:
        found = read_sidecar_detected(image, extension)
    except ValueError:  # unreadable: the stage would give it an auto caption
        return {}
    return {name: found[0]} if found else {}
