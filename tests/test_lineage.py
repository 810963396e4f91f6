"""`lora-pipeline lineage FILE` names the run that wrote this version folder first, and marks the others."""

from __future__ import annotations

import mlflow
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from lora_pipeline.cli import lineage

V_OLD, V_THIS, V_FAILED = "2026-11-01T10.00.00.000Z", "2026-11-02T10.00.00.000Z", "2026-11-03T10.00.00.000Z"


def _export_run(client: MlflowClient, experiment: str, version: str, digest: str, status: str) -> str:
    parent = client.create_run(experiment, tags={"run_id": version}, run_name=f"kedro {version}")
    child = client.create_run(experiment, tags={"mlflow.parentRunId": parent.info.run_id, "subject": "aki",
                                                "stage": "export", "lora.aki.sshs_model_hash": digest})
    for run in (child, parent):
        client.set_terminated(run.info.run_id, status)
    return child.info.run_id


def test_lineage_puts_the_run_that_wrote_this_version_first(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    experiment = client.create_experiment("lora_pipeline")
    digest = "ab" * 32
    older = _export_run(client, experiment, V_OLD, digest, "FINISHED")  # same weights, another version
    this = _export_run(client, experiment, V_THIS, digest, "FINISHED")
    failed = _export_run(client, experiment, V_FAILED, digest, "FAILED")  # newest, but it failed
    folder = tmp_path / "aki.safetensors" / V_THIS
    folder.mkdir(parents=True)
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, folder / "aki.safetensors",
              metadata={"sshs_model_hash": digest, "ss_output_name": "aki"})

    assert lineage.print_lineage(folder / "aki.safetensors", uri) == 0
    printed = capsys.readouterr().out
    assert printed.index(this) < printed.index(failed) and printed.index(this) < printed.index(older)
    blocks = printed.split("  -- ")[1:]
    assert blocks[0].startswith(f"the run that wrote this file (version {V_THIS})") and this in blocks[0]
    assert all(block.startswith("another run with the same weights") for block in blocks[1:])
    assert "FAILED" in next(block for block in blocks if failed in block)
    assert lineage.saved_version(tmp_path / "elsewhere.safetensors") is None  # a copy outside the catalog
