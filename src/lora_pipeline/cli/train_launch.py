"""Launch the training stage under ``accelerate`` (1 CPU, 1 GPU or N GPUs) from the project's configuration.

    accelerate launch -m lora_pipeline.cli train-launch --env local --subject aki
    lora-pipeline train-launch --env demo --subject demo_lora     # same thing, one process

It reads the same catalog entries and ``params:<subject>.training`` as ``kedro run --pipelines training
--namespaces <subject>`` and calls the same node; only the main process writes the LoRA weights and the
summary through the catalog. ``--subject`` may be left out when the project has one subject.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lora_pipeline.core.errors import ConfigError


def launch(env: str | None, project: Path, subject: str | None) -> Path:
    """Train ``subject`` of the project at ``project`` in this process (one of ``accelerate launch``'s)."""
    from accelerate import PartialState
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from lora_pipeline.pipelines.training.nodes import train_lora

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    root = Path(project).resolve()
    bootstrap_project(root)
    with KedroSession.create(project_path=root, env=env) as session:
        context = session.load_context()
        subjects = list(context.config_loader.subjects())
        subject = subject or (subjects[0] if len(subjects) == 1 else None)
        if subject not in subjects:
            raise ConfigError(f"--subject must name one of the subjects in subjects.yml: {', '.join(subjects)}")
        catalog = context.catalog
        inputs = [catalog.load(f"{subject}.{name}") for name in
                  ("normalized_images", "train_metadata", "dataset_info")]
        weights, summary = train_lora(*inputs, catalog.load("latent_cache"), catalog.load(f"params:{subject}.training"))
        if PartialState().is_main_process:
            catalog.save(f"{subject}.lora_weights", weights)
            catalog.save(f"{subject}.training_summary", summary)
            logging.getLogger(__name__).info("Saved %s.lora_weights and .training_summary; now run "
                                             "`kedro run --pipelines export --namespaces %s`.", subject, subject)
    return root
