"""User-facing errors. Every message says what is wrong, where, and what to do next."""


class LoraPipelineError(Exception):
    """An error caused by input or configuration that the user can fix."""


class ConfigError(LoraPipelineError):
    """A parameter is unknown, missing or out of range."""


class DataError(LoraPipelineError):
    """Input data is missing, empty or unusable."""


class ModelNotFoundError(LoraPipelineError):
    """A model path or hub id cannot be resolved without a download."""
