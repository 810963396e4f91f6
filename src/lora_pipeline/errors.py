"""User-facing errors. Every message says what is wrong, where, and what to do next.

They are also ``click.ClickException``\\ s: on the command line (``kedro run``, ``lora-pipeline``) click prints
``Error: <message>`` and exits with 1, instead of a long traceback before the one line that matters. In
Python they are ordinary exceptions.
"""

import click


class LoraPipelineError(click.ClickException):
    """An error caused by input or configuration that the user can fix."""

    def __init__(self, message: str = ""):
        super().__init__(str(message))

    def __reduce__(self):  # picklable across ParallelRunner's processes
        return (type(self), (self.message,))


class ConfigError(LoraPipelineError):
    """A parameter is unknown, missing or out of range."""


class DataError(LoraPipelineError):
    """Input data is missing, empty or unusable."""


class ModelNotFoundError(LoraPipelineError):
    """A model path or hub id cannot be resolved without a download."""
