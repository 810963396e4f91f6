"""The command line: ``lora-pipeline`` (:data:`main`, one click group), and Kedro's ``run`` with this project's
errors shown as one message.

Kedro reads a project's commands from ``<package>.cli``: its ``cli`` group joins ``kedro``'s commands and its
``run`` is what ``kedro run`` executes (see :mod:`lora_pipeline.cli.kedro_run`). They are loaded on first use, so
``lora-pipeline`` does not import Kedro's CLI.
"""

from lora_pipeline.cli.commands import main


def __getattr__(name: str):
    if name in ("cli", "run"):
        from lora_pipeline.cli import kedro_run

        return getattr(kedro_run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["cli", "main", "run"]
