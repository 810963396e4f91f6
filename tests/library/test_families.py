"""The model-family seam: the family objects give what the SD1.x/SDXL code computed inline before, checked
against references written here from the textbook formulas (diffusers' DDPM scheduler, kohya's min-SNR rule,
SDXL's time ids), and one detector answers for pipelines, folders and single files alike.

Nothing here pins a hash: the byte-identity of exports across the refactor was checked once by hand, and the
bitwise resume / reproducibility tests (test_training, test_faults, test_hardening) keep guarding it."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from train_helpers import make_params

from lora_pipeline.core.cache import DiskCache
from lora_pipeline.core.errors import ConfigError
from lora_pipeline.diffusion.caches import TextEncoderCache
from lora_pipeline.diffusion.dataset import Example
from lora_pipeline.diffusion.families import (
    FAMILIES,
    SD1,
    SDXL,
    Conditioning,
    ModelFamily,
    detect_family,
    get_family,
)
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.single_file import write_ldm_checkpoint
from lora_pipeline.diffusion.training import StepInputs, loss_step, set_up


def _textbook_loss(components, examples, stats, indices, seed, params, prediction_type):
    """One micro-batch's loss the way the loop wrote it inline before families had objectives (kohya's and
    diffusers' SD recipe): latent = (mean + std * eps) * scale, noise (+ offset), uniform timesteps, epsilon or
    velocity target, min-SNR-gamma weight, the UNet called with SDXL's pooled embedding and time ids."""
    from diffusers.training_utils import compute_snr

    generator = torch.Generator().manual_seed(seed)
    scheduler = components.scheduler
    mean, std = stats["mean"], stats["std"]
    latents = (mean + std * torch.randn(mean.shape, generator=generator)) * components.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator)
    if params.noise_offset:
        noise = noise + params.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1),
                                                          generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    chosen = [examples[i % len(examples)] for i in indices]
    noisy = scheduler.add_noise(latents, noise, timesteps)
    with torch.no_grad():  # one prompt at a time, as the text cache does
        each = [components.family.encode_prompt(components.text_encoders, components.tokenizers, [ex.text],
                                                torch.device("cpu")) for ex in chosen]
    cond = Conditioning(torch.cat([c.hidden for c in each]),
                        None if each[0].pooled is None else torch.cat([c.pooled for c in each]))
    kwargs = {}
    if cond.pooled is not None:
        time_ids = torch.tensor([[ex.original_size[1] if ex.original_size else ex.height,
                                  ex.original_size[0] if ex.original_size else ex.width,
                                  *ex.crop_top_left, ex.height, ex.width] for ex in chosen], dtype=torch.float32)
        kwargs = {"added_cond_kwargs": {"text_embeds": cond.pooled, "time_ids": time_ids}}
    pred = components.unet(noisy, timesteps, cond.hidden, **kwargs).sample
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if params.min_snr_gamma:
        snr = compute_snr(scheduler, timesteps)
        loss = loss * snr.clamp(max=params.min_snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    return loss.mean()


@pytest.mark.parametrize("model, prediction_type", [("tiny-sd", "epsilon"), ("tiny-sd", "v_prediction"),
                                                    ("tiny-sdxl", "epsilon")])
def test_loss_step_is_the_textbook_ddpm_loss(tiny_models, tiny_examples, tmp_path, model, prediction_type):
    examples = [Example(e.path, e.text, e.width, e.height, e.sha256, original_size=(e.width + 40, e.height + 20),
                        crop_top_left=(10, 20)) for e in tiny_examples]
    params = make_params(tiny_models, tmp_path, base_model=str(tiny_models[model]), noise_offset=0.1,
                         min_snr_gamma=5.0, max_steps=1)
    components = load_diffusion_model(params.base_model)
    components.scheduler = DDPMScheduler.from_config(components.scheduler.config, prediction_type=prediction_type)
    run = set_up(components, examples, params, DiskCache(tmp_path / "cache"), "d")
    indices = [0, 1]
    inputs = StepInputs(examples, run.cache, run.latent_keys)
    batch = {k: torch.stack([inputs[i][k] for i in indices]) for k in ("mean", "std")}
    ours = loss_step(run, batch, indices, torch.Generator().manual_seed(7), random.Random(0))
    assert torch.equal(ours, _textbook_loss(components, examples, batch, indices, 7, params, prediction_type))


def test_the_text_cache_holds_what_the_family_encodes(tiny_models, tmp_path):
    texts = ["sks, red circle", "a photo", "sks, red circle"]
    for name in ("tiny-sd", "tiny-sdxl"):
        components = load_diffusion_model(str(tiny_models[name]))
        with torch.no_grad():  # one prompt at a time, as the cache encodes them (a batch rounds differently)
            each = [components.encode_prompt([text], torch.device("cpu")) for text in texts]
        direct = Conditioning(torch.cat([c.hidden for c in each]),
                              None if each[0].pooled is None else torch.cat([c.pooled for c in each]))
        cache = DiskCache(tmp_path / name)
        for _ in range(2):  # computed, then read back from disk
            cached = TextEncoderCache(components, cache, torch.device("cpu"))(texts)
            assert torch.equal(cached.hidden, direct.hidden)
            assert (cached.pooled is None) == (direct.pooled is None) == (components.family is SD1)
            if direct.pooled is not None:
                assert torch.equal(cached.pooled, direct.pooled)


def test_one_detector_for_pipelines_folders_and_single_files(tiny_models, tmp_path):
    for name, family in (("tiny-sd", SD1), ("tiny-sdxl", SDXL)):
        components = load_diffusion_model(str(tiny_models[name]))
        assert detect_family(tiny_models[name]) is family is components.family
        pipe = components.pipeline()
        assert detect_family(pipe) is family
        checkpoint = write_ldm_checkpoint(pipe, tmp_path / f"{name}.safetensors", family)
        assert detect_family(checkpoint) is family
    # img2img / inpaint pipelines belong to their family (the longest class-name match wins) ...
    best = {cls: max(FAMILIES.values(), key=lambda f: f.recognises_pipeline_class(cls, variants=True))
            for cls in ("StableDiffusionImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")}
    assert best == {"StableDiffusionImg2ImgPipeline": SD1, "StableDiffusionXLInpaintPipeline": SDXL}
    # ... but a folder to train from must name the family's own pipeline, and an unknown pipeline is refused
    assert not SD1.recognises_pipeline_class("StableDiffusionInpaintPipeline")

    class StableDiffusion3Pipeline:
        pass

    class WanPipeline:
        pass

    assert detect_family(StableDiffusion3Pipeline()) is get_family("sd3")  # not SD1.x: a version follows the prefix
    with pytest.raises(ConfigError, match="not the pipeline of a supported family"):
        detect_family(WanPipeline())
    with pytest.raises(ConfigError, match="planned"):
        get_family("wan")


def test_kohya_names_go_both_ways(tiny_models):
    for name in ("tiny-sd", "tiny-sdxl"):
        components = load_diffusion_model(str(tiny_models[name]))
        family: ModelFamily = components.family
        modules = components.modules()
        index = family.kohya_index(modules)
        assert len(index) == sum(len([p for p, _ in m.named_modules() if p]) for m in modules.values())
        for kohya, (component, path) in index.items():
            assert family.kohya_name(component, path, modules[component].config) == kohya
            assert kohya.startswith((family.kohya_denoiser_prefix, *family.kohya_te_prefixes))
        others = [f for f in FAMILIES.values() if f is not family]
        sample = next(k for k, (c, _) in index.items() if c == family.denoiser and k.endswith("attn1_to_q"))
        assert family.recognises_kohya_name(sample) and not any(f.recognises_kohya_name(sample) for f in others)
