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
