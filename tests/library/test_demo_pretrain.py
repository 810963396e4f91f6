"""`python -m lora_pipeline.demo` pre-trains the tiny SD1.x and Flux.1 bases side by side (one spawned process and one
CPU thread each) into the machine's cache, and copies them into the project. Tiny configs here (a few steps on a few
64 px pictures): what is checked is the plumbing, not what the bases learn (tests/library/test_demo_effect*.py)."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from lora_pipeline.demo.assets import pretrain_bases
from lora_pipeline.demo.pretrain import CACHE_ENV, KEY_FILE, PretrainConfig, ensure_pretrained_sd
from lora_pipeline.diffusion.loading import load_diffusion_model

pytestmark = pytest.mark.slow  # two spawned processes, each importing torch and diffusers
SD = PretrainConfig(resolution=64, images=8, vae_steps=2, vae_batch=2, vae_crop=32, unet_steps=2, unet_batch=2)


def _flux_config():
    from lora_pipeline.demo.pretrain_flux import PretrainFluxConfig

    return PretrainFluxConfig(resolution=64, images=8, vae_steps=2, vae_batch=2, vae_crop=32, transformer_steps=2,
                              transformer_batch=2)


def test_both_bases_are_pretrained_side_by_side_cached_and_loadable(tmp_path):
    models, cache, flux = tmp_path / "models", tmp_path / "cache", _flux_config()
    pretrain_bases(models, SD, flux, cache)
    assert (models / "tiny-sd" / KEY_FILE).read_text().strip() == SD.key()
    assert (models / "tiny-flux" / KEY_FILE).read_text().strip() == flux.key()
    assert sorted(p.name for p in cache.iterdir()) == sorted([f"tiny-flux-{flux.key()}", f"tiny-sd-{SD.key()}"])
    sd = load_diffusion_model(str(models / "tiny-sd"))
    assert sd.scheduler.config.prediction_type == "v_prediction"
    assert load_diffusion_model(str(models / "tiny-flux")).family.name == "flux"

    # The same config built again in this process (one thread, as in the spawned one) gives the same bytes: the
    # cache key names one result.
    again = ensure_pretrained_sd(tmp_path / "again", SD, cache=tmp_path / "cache-2")
    unet = "unet/diffusion_pytorch_model.safetensors"
    spawned, local = load_file(models / "tiny-sd" / unet), load_file(again / unet)
    assert all((spawned[name] == local[name]).all() for name in spawned)

    # A second run finds both in place and builds nothing (the cache would get a second folder if it did).
    stamp = (models / "tiny-sd" / KEY_FILE).stat().st_mtime_ns
    pretrain_bases(models, SD, flux, cache)
    assert (models / "tiny-sd" / KEY_FILE).stat().st_mtime_ns == stamp
    assert len(list(cache.iterdir())) == 2


def test_an_unusable_cache_folder_stops_before_training_and_names_the_setting(tmp_path):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file, not a folder")
    with pytest.raises(OSError, match=CACHE_ENV) as raised:
        ensure_pretrained_sd(tmp_path / "tiny-sd", SD, cache=not_a_folder)
    assert str(not_a_folder) in str(raised.value)
    assert not (tmp_path / "tiny-sd").exists()
