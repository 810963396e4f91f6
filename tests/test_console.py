"""The console a user sees: our messages, without known third-party noise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
NOISE = ("Add type hints to the `predict` method", "register_new_resolver() is deprecated",
         "dataset names contain '.'", "is_gradient_checkpointing", "Loading data from",
         "Already found a `peft_config`", "No LoRA keys associated to")


@pytest.mark.slow
def test_a_kedro_command_prints_no_known_third_party_warning():
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "KEDRO_ENV": "demo", "COLUMNS": "200"}
    result = subprocess.run([str(Path(sys.executable).parent / "kedro"), "registry", "list"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "demo_lora.training" in output or "__default__" in output
    assert not [noise for noise in NOISE if noise in output], output[-3000:]


def test_a_new_warning_of_our_own_still_shows():
    import logging
    import warnings

    from lora_pipeline.project.quiet import install

    install()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        warnings.warn("lora-pipeline: something the user must see")
    assert caught
    record = logging.LogRecord("py.warnings", logging.WARNING, "x", 1, "UserWarning: lora-pipeline: see this", (), None)
    assert all(f.filter(record) for f in logging.getLogger("py.warnings").filters)


@pytest.mark.slow
def test_a_config_error_is_one_message_that_names_its_source():
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "KEDRO_ENV": "demo", "COLUMNS": "200"}
    result = subprocess.run([str(Path(sys.executable).parent / "kedro"), "run", "--env", "demo", "--pipelines",
                             "normalization", "--params", "normalization.min_sise=3"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "Error: Invalid parameters" in output and "did you mean 'min_size'" in output
    assert "--params on the command line set normalization.min_sise=3" in output
    assert "Traceback" not in output and "raise ConfigError" not in output


def test_log_lines_clear_and_redraw_an_active_progress_bar(monkeypatch):
    import io

    from tqdm.auto import tqdm

    from lora_pipeline.project.quiet import BarSafeStream

    cleared = []
    real = tqdm.external_write_mode.__func__

    def recording(cls, file=None, nolock=False):
        cleared.append(True)
        return real(cls, file=file, nolock=nolock)

    monkeypatch.setattr(tqdm, "external_write_mode", classmethod(recording))
    out = io.StringIO()
    stream = BarSafeStream(out)
    stream.write("no bar: written as is\n")
    assert cleared == []
    with tqdm(total=3, file=io.StringIO()) as bar:
        stream.write("a log line during training\n")
        bar.update(1)
    assert cleared == [True] and out.getvalue().endswith("a log line during training\n")
    assert stream.isatty() is False  # everything else is the real stream's


def test_catalog_lines_come_back_with_lora_pipeline_verbose(monkeypatch):
    import logging

    from lora_pipeline.project.quiet import install

    catalog = logging.getLogger("kedro.io.data_catalog")
    before = catalog.level
    try:
        catalog.setLevel(logging.INFO)
        monkeypatch.setenv("LORA_PIPELINE_VERBOSE", "1")
        install()
        assert catalog.isEnabledFor(logging.INFO)  # "Loading data from ..." shows
        monkeypatch.delenv("LORA_PIPELINE_VERBOSE")
        install()
        assert not catalog.isEnabledFor(logging.INFO)
    finally:
        catalog.setLevel(before)
