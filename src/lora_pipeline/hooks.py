"""Project hooks."""

from __future__ import annotations

import logging

from kedro.framework.hooks import hook_impl

from lora_pipeline.config import validate_all

logger = logging.getLogger(__name__)


class ValidateParametersHook:
    """Validate every parameter group before the first node runs, so a typo costs seconds, not a GPU hour."""

    @hook_impl
    def after_context_created(self, context) -> None:
        subjects = context.config_loader.subjects() if hasattr(context.config_loader, "subjects") else {}
        validated = validate_all(context.params, subjects)
        logger.info("Parameters valid: %s", ", ".join(sorted(validated)) or "none to check")


class SubjectFingerprintHook:
    """Remembers what each subject was trained on, so ``lora-pipeline run`` can skip unchanged subjects.

    The fingerprint is taken before the run starts and written only when the run finishes without error and
    trained and exported that subject.
    """

    def __init__(self):
        self._context = None
        self._pending: dict[str, str] = {}

    @hook_impl
    def after_context_created(self, context) -> None:
        self._context = context

    @hook_impl
    def before_pipeline_run(self, run_params, pipeline, catalog) -> None:
        from lora_pipeline.subjects import subject_fingerprint

        loader = self._context.config_loader if self._context else None
        if loader is None or not hasattr(loader, "subjects"):
            return
        names = {node.name for node in pipeline.nodes}
        self._pending = {subject: subject_fingerprint(catalog, self._context.params, subject)
                         for subject in loader.subjects()
                         if {f"{subject}.train_lora", f"{subject}.export_kohya"} <= names}

    @hook_impl
    def after_pipeline_run(self, run_params, pipeline, catalog) -> None:
        from lora_pipeline.subjects import record_fingerprint

        for subject, fingerprint in self._pending.items():
            record_fingerprint(subject, fingerprint)
        self._pending = {}
