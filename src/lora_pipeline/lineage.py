"""From a LoRA file back to the MLflow run and the data that made it.

    python -m lora_pipeline.lineage data/07_model_output/my_lora.safetensors/<version>/my_lora.safetensors

Reads ``sshs_model_hash`` (sha256 of the tensors) from the file's header and finds the export run tagged with
it, then prints that run's training run, dataset hash, Kedro session and git commit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def find_runs(lora_file: str | Path, tracking_uri: str) -> tuple[dict[str, str], list]:
    import mlflow

    from lora_pipeline.diffusion.lora_files import load_lora_file

    _, header = load_lora_file(lora_file)
    digest = header.get("sshs_model_hash")
    if not digest:
        raise SystemExit(f"{lora_file} has no sshs_model_hash in its header: not exported by lora-pipeline?")
    mlflow.set_tracking_uri(tracking_uri)
    subject = header.get("ss_output_name", "")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`lora.{subject}.sshs_model_hash` = '{digest}'")
    return header, runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lora_file")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    args = parser.parse_args(argv)
    header, runs = find_runs(args.lora_file, args.tracking_uri)
    print(f"LoRA {header.get('ss_output_name')}  sshs_model_hash {header['sshs_model_hash']}")
    print(f"  dataset hash    {header.get('ss_dataset_hash')}")
    print(f"  training run    {header.get('lora_pipeline.training_run_id')}")
    if not runs:
        print("  no MLflow run carries this hash (another tracking URI? pass --tracking-uri)")
        return 1
    import mlflow

    for run in runs:
        tags = run.data.tags
        parent = mlflow.get_run(tags["mlflow.parentRunId"]) if "mlflow.parentRunId" in tags else run
        print(f"  export run      {run.info.run_id}  ({tags.get('mlflow.runName')}, started {run.info.start_time})")
        print(f"  kedro run       {parent.info.run_id}  ({parent.info.run_name})")
        print(f"  git commit      {tags.get('git_commit') or parent.data.tags.get('git_commit')}")
        print(f"  kedro version   {parent.data.tags.get('run_id')}  (every dataset this run saved has this version id)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
