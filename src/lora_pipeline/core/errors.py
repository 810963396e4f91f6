"""User-facing errors. Every message says what is wrong, where, and what to do next.

They are plain exceptions: the library knows nothing of the command line. ``lora_pipeline.cli`` turns them into
click errors at the edge (``kedro run``, ``lora-pipeline``), so a person sees ``Error: <message>`` instead of a
long traceback before the one line that matters.
"""


class LoraPipelineError(Exception):
    """An error caused by input or configuration that the user can fix."""

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(LoraPipelineError):
    """A parameter is unknown, missing or out of range."""


class DataError(LoraPipelineError):
    """Input data is missing, empty or unusable."""


class ModelNotFoundError(LoraPipelineError):
    """A model path or hub id cannot be resolved without a download."""
