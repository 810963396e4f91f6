"""From a LoRA file or an LLM adapter folder back to the MLflow run and the data that made it.

    lora-pipeline lineage data/07_model_output/my_lora.safetensors/<version>/my_lora.safetensors
    lora-pipeline lineage data/07_model_output/llm_lora_adapter/<version>/llm_lora_adapter

A LoRA file is found by ``sshs_model_hash`` (sha256 of its tensors, in its header), an adapter folder by the
sha256 of its ``adapter_model.safetensors``; either way the export run tagged with it is looked up, then
that run's training run, dataset hash, Kedro session and git commit are printed.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from lora_pipeline.core.errors import DataError


def identify(path: str | Path) -> tuple[dict[str, str], str]:
    """What the thing is (name, hash, dataset, training run) and the MLflow filter that finds its export run."""
    path = Path(path)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        from lora_pipeline.core.files import sha256_file

        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            raise DataError(f"{path} has no adapter_model.safetensors: not a complete PEFT adapter folder.")
        digest = sha256_file(weights)
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        info = {"kind": "PEFT adapter", "name": path.name, "hash": digest,
                "base": config.get("base_model_name_or_path", "")}
        return info, f"tags.`llm_adapter.sha256` = '{digest}'"
    from lora_pipeline.diffusion.lora_files import load_lora_file

    if not path.is_file():
        raise DataError(f"{path} not found: give an exported .safetensors file or an adapter folder.")
    _, header = load_lora_file(path)
    digest = header.get("sshs_model_hash")
    if not digest:
        raise DataError(f"{path} has no sshs_model_hash in its header: not exported by lora-pipeline?")
    subject = header.get("ss_output_name", "")
    info = {"kind": "LoRA", "name": subject, "hash": digest, "dataset": header.get("ss_dataset_hash", ""),
            "training_run": header.get("lora_pipeline.training_run_id", ""), "base": header.get("ss_sd_model_name", "")}
    return info, f"tags.`lora.{subject}.sshs_model_hash` = '{digest}'"


def find_runs(path: str | Path, tracking_uri: str) -> tuple[dict[str, str], list]:
    import mlflow

    info, filter_string = identify(path)
    mlflow.set_tracking_uri(tracking_uri)
    return info, mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string=filter_string)


def _when(milliseconds: int) -> str:
    """MLflow's start time (ms since the epoch) as a local time a person reads."""
    return datetime.fromtimestamp(milliseconds / 1000).strftime("%Y-%m-%d %H:%M:%S")


def saved_version(path: str | Path) -> str | None:
    """The Kedro version folder an export sits in (``<name>.safetensors/<version>/<name>.safetensors``), if any."""
    from kedro.io.core import VERSION_FORMAT

    name = Path(path).resolve().parent.name
    try:
        datetime.strptime(name, VERSION_FORMAT)
    except ValueError:
        return None
    return name


def order_runs(runs: list, parents: dict[str, object], version: str | None) -> list[tuple[object, bool]]:
    """``(run, wrote_this_file)``, the run that wrote this version folder first, then the others (same weights
    exported by another run, or a failed run) newest first."""
    def wrote(run) -> bool:
        parent = parents[run.info.run_id]
        return version is not None and parent.data.tags.get("run_id") == version and run.info.status == "FINISHED"

    ordered = sorted(runs, key=lambda run: (not wrote(run), -run.info.start_time))
    return [(run, wrote(run)) for run in ordered]


def print_lineage(path: str | Path, tracking_uri: str) -> int:
    """Print what made ``path``; 1 when no MLflow run in ``tracking_uri`` carries its hash."""
    info, runs = find_runs(path, tracking_uri)
    print(f"{info['kind']} {info['name']}  sha256 {info['hash']}")
    print(f"  base model      {info.get('base')}")
    if not runs:
        print("  no MLflow run carries this hash (another tracking URI? pass --tracking-uri)")
        return 1
    import mlflow

    parents = {run.info.run_id: mlflow.get_run(run.data.tags["mlflow.parentRunId"])
               if "mlflow.parentRunId" in run.data.tags else run for run in runs}
    version = saved_version(path)
    for index, (run, wrote) in enumerate(order_runs(runs, parents, version)):
        tags, parent = run.data.tags, parents[run.info.run_id]
        if wrote:
            print(f"  -- the run that wrote this file (version {version})")
        else:
            print(f"  -- another run with the same weights ({run.info.status}, version "
                  f"{parent.data.tags.get('run_id')}): not the one that wrote this file")
        dataset = info.get("dataset") or tags.get("llm.dataset_hash") or parent.data.tags.get("llm.dataset_hash")
        print(f"  dataset hash    {dataset}")
        print(f"  training run    {info.get('training_run') or run.info.run_id}")
        if tags.get("llm.init_from"):
            print(f"  continued from  {tags['llm.init_from']}")
        print(f"  export run      {run.info.run_id}  ({tags.get('mlflow.runName')}, {run.info.status}, "
              f"started {_when(run.info.start_time)})")
        print(f"  kedro run       {parent.info.run_id}  ({parent.info.run_name})")
        print(f"  git commit      {tags.get('git_commit') or parent.data.tags.get('git_commit')}")
        print(f"  kedro version   {parent.data.tags.get('run_id')}  (every dataset this run saved has this version id)")
    return 0
