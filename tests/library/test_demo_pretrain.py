"""`python -m lora_pipeline.demo` pre-trains the tiny SD1.x and Flux.1 bases (each on one CPU thread) into the machine's
cache, and copies them into the project; `make demo` runs `--only tiny-sd` and `--only tiny-flux` side by side. Tiny
configs here (a few steps on a few 64 px pictures): what is checked is the plumbing, not what the bases learn
(tests/library/test_demo_effect*.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict

import pytest
from safetensors.torch import load_file

from lora_pipeline.demo.assets import pretrain_bases
from lora_pipeline.demo.pretrain import CACHE_ENV, KEY_FILE, PretrainConfig, ensure_pretrained_sd
from lora_pipeline.diffusion.loading import load_diffusion_model

pytestmark = pytest.mark.slow  # a subprocess importing torch and diffusers
SD = PretrainConfig(resolution=64, images=8, vae_steps=2, vae_batch=2, vae_crop=32, unet_steps=2, unet_batch=2)


def _flux_config():
    from lora_pipeline.demo.pretrain_flux import PretrainFluxConfig

    return PretrainFluxConfig(resolution=64, images=8, vae_steps=2, vae_batch=2, vae_crop=32, transformer_steps=2,
                              transformer_batch=2)


def test_both_bases_are_pretrained_cached_loadable_and_the_same_bytes_in_another_process(tmp_path):
    models, cache, flux = tmp_path / "models", tmp_path / "cache", _flux_config()
    configs = {"tiny-sd": SD, "tiny-flux": flux}
    pretrain_bases(models, configs=configs, cache=cache)
    assert (models / "tiny-sd" / KEY_FILE).read_text().strip() == SD.key()
    assert (models / "tiny-flux" / KEY_FILE).read_text().strip() == flux.key()
    assert sorted(p.name for p in cache.iterdir()) == sorted([f"tiny-flux-{flux.key()}", f"tiny-sd-{SD.key()}"])
    sd = load_diffusion_model(str(models / "tiny-sd"))
    assert sd.scheduler.config.prediction_type == "v_prediction"
    assert sd.unet.config.attention_head_dim == SD.unet_attention_heads == 2
    assert load_diffusion_model(str(models / "tiny-flux")).family.name == "flux"

    # The same config built in a fresh process, as `make demo` builds it (torch at its default thread count there,
    # which ensure_pretrained sets to one while it trains), gives the same bytes: the cache key names one result.
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    build = ("import sys; from lora_pipeline.demo.pretrain import PretrainConfig, ensure_pretrained_sd; "
             f"ensure_pretrained_sd(sys.argv[1], PretrainConfig(**{asdict(SD)!r}), cache=sys.argv[2])")
    subprocess.run([sys.executable, "-c", build, str(tmp_path / "again"), str(tmp_path / "cache-2")], env=env,
                   check=True, capture_output=True)
    unet = "unet/diffusion_pytorch_model.safetensors"
    here, there = load_file(models / "tiny-sd" / unet), load_file(tmp_path / "again" / unet)
    assert all((here[name] == there[name]).all() for name in here)

    # A second run finds both in place and builds nothing (the cache would get a second folder if it did).
    stamp = (models / "tiny-sd" / KEY_FILE).stat().st_mtime_ns
    pretrain_bases(models, configs=configs, cache=cache)
    assert (models / "tiny-sd" / KEY_FILE).stat().st_mtime_ns == stamp
    assert len(list(cache.iterdir())) == 2


def test_an_unusable_cache_folder_stops_before_training_and_names_the_setting(tmp_path):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file, not a folder")
    with pytest.raises(OSError, match=CACHE_ENV) as raised:
        ensure_pretrained_sd(tmp_path / "tiny-sd", SD, cache=not_a_folder)
    assert str(not_a_folder) in str(raised.value)
    assert not (tmp_path / "tiny-sd").exists()
