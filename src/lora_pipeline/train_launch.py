"""Launch the training stage under ``accelerate`` (1 CPU, 1 GPU or N GPUs) from the project's configuration.

    accelerate launch -m lora_pipeline.train_launch --env local --subject aki
    python -m lora_pipeline.train_launch --env demo --subject demo_lora     # same thing, one process

It reads the same catalog entries and ``params:<subject>.training`` as ``kedro run --pipelines training
--namespaces <subject>`` and calls the same node; only the main process writes the LoRA weights and the
summary through the catalog. ``--subject`` may be left out when the project has one subject.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def main(argv: list[str] | None = None) -> Path | None:
    from accelerate import PartialState
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from lora_pipeline.pipelines.training.nodes import train_lora

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default=None, help="Kedro configuration environment (default: local)")
    parser.add_argument("--project", default=".", help="project root")
    parser.add_argument("--subject", default=None, help="the subject (subjects.yml) to train")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    root = Path(args.project).resolve()
    bootstrap_project(root)
    with KedroSession.create(project_path=root, env=args.env) as session:
        context = session.load_context()
        subjects = list(context.config_loader.subjects())
        subject = args.subject or (subjects[0] if len(subjects) == 1 else None)
        if subject not in subjects:
            raise SystemExit(f"--subject must name one of the subjects in subjects.yml: {', '.join(subjects)}")
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


if __name__ == "__main__":
    main()
