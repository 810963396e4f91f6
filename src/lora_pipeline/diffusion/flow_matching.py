"""The rectified-flow (flow matching) objective of the diffusion transformers (Flux.1, SD3, ...), as kohya's
``flux_train_utils`` and diffusers' Flux training examples define it.

A noise level sigma in [0, 1] is drawn per image; the model sees ``(1 - sigma) * x + sigma * noise`` and predicts
the velocity ``noise - x`` (kohya's ``model_prediction_type: raw``). ``FluxPipeline`` samples by integrating that
velocity from sigma 1 to 0, so this target and sign are what make samples move toward the training images.
"""

from __future__ import annotations

from typing import Literal

import torch

TimestepSampling = Literal["sigmoid", "shift", "logit_normal", "uniform"]
# kohya's documented recommendation for Flux.1 LoRAs (docs/flux_train_network.md): shift sampling at this shift.
KOHYA_RECOMMENDED_SHIFT = 3.1582


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The scheduler's static shift: more weight on high noise for shift > 1 (``shift*s / (1 + (shift-1)*s)``)."""
    return sigmas * shift / (1 + (shift - 1) * sigmas)


def sample_sigmas(method: TimestepSampling, batch: int, generator: torch.Generator, *, sigmoid_scale: float = 1.0,
                  discrete_flow_shift: float = 1.0, logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """One sigma per image, drawn on the CPU from ``generator`` (so a seeded run draws the same ones on any device).

    ``uniform``: U(0, 1). ``sigmoid``: sigmoid(sigmoid_scale * N(0, 1)). ``shift``: the sigmoid draw, then shifted by
    ``discrete_flow_shift``. ``logit_normal``: sigmoid(N(logit_mean, logit_std)) (SD3's weighting).
    """
    if method == "uniform":
        return torch.rand(batch, generator=generator)
    if method in ("sigmoid", "shift"):
        sigmas = torch.sigmoid(sigmoid_scale * torch.randn(batch, generator=generator))
        return shift_sigmas(sigmas, discrete_flow_shift) if method == "shift" else sigmas
    if method == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * torch.randn(batch, generator=generator))
    raise ValueError(f"timestep_sampling '{method}': use one of sigmoid, shift, logit_normal, uniform")


def noisy_and_target(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The model input at noise level ``sigmas`` (one per image) and the velocity it must predict."""
    s = sigmas.to(latents.dtype).view(-1, *([1] * (latents.dim() - 1)))
    return (1 - s) * latents + s * noise, noise - latents
