"""What Kedro reads from ``<package>.cli``: ``cli``, a group of project commands for ``kedro`` (only ``run``), and
``run``, the command ``kedro run`` and ``python -m lora_pipeline`` execute: Kedro's own, every option unchanged,
printing a :class:`~lora_pipeline.core.errors.LoraPipelineError` (even one Kedro wrapped) as ``Error: <message>``."""

from __future__ import annotations

import copy

import click

from lora_pipeline.cli.commands import as_click_errors


def _kedro_run() -> click.Command:
    """Kedro's own ``run`` command (every option unchanged), printing our errors as one message."""
    from kedro.framework.cli.project import run as kedro_run

    command = copy.copy(kedro_run)
    command.callback = as_click_errors(kedro_run.callback)
    return command


run = _kedro_run()


@click.group(name="lora_pipeline")
def cli() -> None:
    """Project commands Kedro adds to ``kedro``: only ``run`` (Kedro's, with one-message errors)."""


cli.add_command(run)
