"""The flow-matching objective agrees with the sampler diffusers' FluxPipeline uses."""

from __future__ import annotations

import pytest
import torch

from lora_pipeline.diffusion.flow_matching import noisy_and_target, sample_sigmas, shift_sigmas


def test_the_target_is_the_velocity_flux_samplers_integrate():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from lora_pipeline.demo.tiny_models import FLUX1_SCHEDULER_CONFIG

    scheduler = FlowMatchEulerDiscreteScheduler(**{**FLUX1_SCHEDULER_CONFIG, "use_dynamic_shifting": False})
    scheduler.set_timesteps(6)
    generator = torch.Generator().manual_seed(0)
    x, noise = torch.randn(2, 16, 8, 8, generator=generator), torch.randn(2, 16, 8, 8, generator=generator)
    for i, t in enumerate(scheduler.timesteps):
        sigma, following = scheduler.sigmas[i], scheduler.sigmas[i + 1]
        current, target = noisy_and_target(x, noise, sigma.repeat(2))
        stepped = scheduler.step(target, t, current).prev_sample  # a model that predicts our target exactly
        assert torch.allclose(stepped, noisy_and_target(x, noise, following.repeat(2))[0], atol=1e-5)
    assert torch.allclose(stepped, x, atol=1e-5)  # ... lands on the training latents at sigma 0


def test_timestep_sampling_draws_reproducible_sigmas_in_range():
    for method in ("sigmoid", "shift", "logit_normal", "uniform"):
        a = sample_sigmas(method, 512, torch.Generator().manual_seed(1), discrete_flow_shift=3.1582)
        b = sample_sigmas(method, 512, torch.Generator().manual_seed(1), discrete_flow_shift=3.1582)
        assert torch.equal(a, b) and 0 <= a.min() and a.max() <= 1, method
    plain = sample_sigmas("sigmoid", 4096, torch.Generator().manual_seed(2))
    shifted = sample_sigmas("shift", 4096, torch.Generator().manual_seed(2), discrete_flow_shift=3.0)
    assert torch.allclose(shifted, shift_sigmas(plain, 3.0)) and shifted.mean() > plain.mean() + 0.1  # more noise
    with pytest.raises(ValueError, match="sigmoid, shift, logit_normal, uniform"):
        sample_sigmas("sigma", 1, torch.Generator())
