"""Launch the training stage under ``accelerate`` (1 CPU, 1 GPU or N GPUs) from the project's configuration.

    accelerate launch -m lora_pipeline.train_launch --env local
    python -m lora_pipeline.train_launch --env demo          # same thing, one process

It reads the same catalog entries and ``params:training`` as ``kedro run --pipelines training`` and calls the
same node; only the main process writes the LoRA weights and the summary through the catalog.
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    root = Path(args.project).resolve()
    bootstrap_project(root)
    with KedroSession.create(project_path=root, env=args.env) as session:
        catalog = session.load_context().catalog
        inputs = [catalog.load(name) for name in
                  ("normalized_images", "train_metadata", "dataset_info", "latent_cache", "params:training")]
        weights, summary = train_lora(*inputs)
        if PartialState().is_main_process:
            catalog.save("lora_weights", weights)
            catalog.save("training_summary", summary)
            logging.getLogger(__name__).info("Saved lora_weights and training_summary; now run "
                                             "`kedro run --pipelines export`.")
    return root


if __name__ == "__main__":
    main()
