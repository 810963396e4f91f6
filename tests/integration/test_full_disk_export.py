"""`kedro run --pipelines export` onto a real full disk (a 4 KiB tmpfs as data/07_model_output): what the user
sees is one message that says what, where and what to do, and the disk holds no empty version folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from disk_helpers import everything_under, mount_small_disk, unmount
from kedro.io import Version

from lora_pipeline.core.spec import LoraFile
from lora_pipeline.datasets import LoraWeightsDataset, TrainingSummaryDataset

pytestmark = pytest.mark.slow  # a whole pipeline through Kedro (see make test-fast)


class NotOneMessage(AssertionError):
    """The console showed more than the one `Error: ...` line (a traceback)."""


# Kedro 1.7's catalog re-wraps every error of a dataset's save in a new DatasetError: `kedro run` (lora_pipeline.cli)
# finds our DiskFullError in the cause chain and prints its message alone.
def test_kedro_run_export_on_a_full_disk_prints_one_message(project, trained):
    models = project / "data" / "06_models"
    LoraWeightsDataset(str(models / "demo_lora_training.safetensors"), version=Version(None, None)).save(
        LoraFile(trained["result"].lora_state))
    TrainingSummaryDataset(str(models / "demo_lora_summary.json"), version=Version(None, None)).save(
        trained["summary"])
    disk = mount_small_disk(project / "data" / "07_model_output")
    try:
        env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "KEDRO_ENV": "demo",
               "COLUMNS": "200"}
        result = subprocess.run([str(Path(sys.executable).parent / "kedro"), "run", "--env", "demo", "--pipelines",
                                 "export", "--namespaces", "demo_lora"], cwd=project, env=env, capture_output=True,
                                text=True, timeout=600)
        output = result.stdout + result.stderr
        left = everything_under(disk)
    finally:
        unmount(disk)
    assert result.returncode == 1, output[-3000:]
    # the model card (2 KB) may have fit; the LoRA outputs left neither a temp file nor an empty version folder
    assert not [p for p in left if Path(p).name.startswith(".") or p.endswith(".tmp")], left
    assert all(any((disk / p).iterdir()) for p in left if (disk / p).is_dir()), left
    assert not [p for p in left if p.startswith(("demo_lora.safetensors", "demo_lora_diffusers"))], left
    flat = " ".join(output.split())  # rich wraps long lines
    assert f"no space left on {disk}/demo_lora" in flat and "free some space" in flat and "re-run" in flat
    assert "SafetensorError" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("Error: no space left on ")]
    if len(errors) != 1 or "Traceback" in output:
        raise NotOneMessage(output[-3000:])
