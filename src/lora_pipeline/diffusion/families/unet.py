"""What the two UNet families (SD1.x, SDXL) share: a ``unet`` denoiser trained with DDPM (epsilon or v-prediction,
min-SNR weighting, noise offset), CLIP text encoders and their kohya names, and the original (LDM/SGM) UNet layout
that kohya's SDXL names and single-file checkpoints use."""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch

from lora_pipeline.core.config import KOHYA_TE_TARGETS, KOHYA_UNET_TARGETS
from lora_pipeline.diffusion.families.base import Conditioning, ModelFamily, NoisedBatch, Objective


class DDPMObjective(Objective):
    """DDPM training as kohya's and diffusers' SD scripts do it: uniform integer timesteps, noise (plus
    ``noise_offset`` times a per-channel constant), target the noise (``epsilon``) or the velocity
    (``v_prediction``, by the scheduler's ``prediction_type``), optionally min-SNR-gamma weighted."""

    def __init__(self, scheduler: Any, noise_offset: float = 0.0, min_snr_gamma: float | None = None):
        self.scheduler, self.noise_offset, self.min_snr_gamma = scheduler, noise_offset, min_snr_gamma
        self.prediction_type = scheduler.config.prediction_type

    def noise(self, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(shape, generator=generator)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
        return noise

    def timesteps(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (batch_size,), generator=generator)

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> NoisedBatch:
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        epsilon = self.prediction_type == "epsilon"
        target = noise if epsilon else self.scheduler.get_velocity(latents, noise, timesteps)
        weight = None
        if self.min_snr_gamma:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.scheduler, timesteps)
            weight = snr.clamp(max=self.min_snr_gamma) / (snr if epsilon else snr + 1)
        return NoisedBatch(noisy, timesteps, target, weight)


def token_ids(tokenizer, texts: Sequence[str], device: torch.device) -> torch.Tensor:
    tok = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    return tok.input_ids.to(device)


class UNetFamily(ModelFamily):
    """A Stable Diffusion UNet family; subclasses add their prompt encoding, UNet names and header."""

    denoiser = "unet"

    @property
    def default_targets(self) -> dict[str, tuple[str, ...]]:  # type: ignore[override]
        """kohya's: the UNet's attention and feed-forward projections, every CLIP attention and MLP layer."""
        return {self.denoiser: tuple(KOHYA_UNET_TARGETS), **{te: tuple(KOHYA_TE_TARGETS) for te in self.text_encoders}}

    def training_scheduler(self, scheduler: Any) -> Any:
        """A DDPM schedule with the base model's betas, whichever sampler the base ships with."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(scheduler.config)

    def objective(self, scheduler: Any, noise_offset: float = 0.0, min_snr_gamma: float | None = None,
                  **recipe: Any) -> Objective:
        return DDPMObjective(scheduler, noise_offset, min_snr_gamma)  # flow-matching settings do not apply

    def added_conditions(self, cond: Conditioning, micro: torch.Tensor | None, dtype: torch.dtype) -> dict[str, Any]:
        """Keyword arguments of the UNet call besides sample, timestep and token states."""
        return {}

    def predict(self, denoiser: Any, batch: NoisedBatch, cond: Conditioning, micro: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        return denoiser(batch.model_input.to(dtype), batch.timesteps, cond.hidden.to(dtype),
                        **self.added_conditions(cond, micro, dtype)).sample

    def kohya_unet_path(self, module_path: str, unet_config: Any) -> str:
        """A UNet module path as kohya names it (before ``.`` -> ``_``)."""
        return module_path

    def kohya_name(self, component: str, module_path: str, denoiser_config: Any = None) -> str:
        """e.g. SDXL ``unet`` + ``down_blocks.1.attentions.0.proj_in`` -> ``lora_unet_input_blocks_4_1_proj_in``.

        transformers 5's CLIPTextModel has no ``text_model.`` wrapper any more, but WebUI keys still carry it, so
        it is added explicitly for the text encoders."""
        if component == self.denoiser:
            return self.kohya_denoiser_prefix + self.kohya_unet_path(module_path, denoiser_config).replace(".", "_")
        prefix = self.kohya_te_prefixes[self.text_encoders.index(component)]
        return prefix + "text_model_" + module_path.removeprefix("text_model.").replace(".", "_")

    def naming_layout(self, denoiser_config: Any) -> dict[str, Any]:
        return {"layers_per_block": denoiser_config.layers_per_block,
                "up_block_types": list(denoiser_config.up_block_types)}


# ----------------------------------------------------------------------------- original (SGM/LDM) UNet names

_RESNET_RENAMES = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                   ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))


def _resnet(rest: str) -> str:
    for new, old in _RESNET_RENAMES:
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def sgm_unet_path(path: str, layers_per_block: int, up_has_attention: Sequence[bool]) -> str | None:
    """A diffusers UNet path (module or parameter) in the original LDM/SGM layout, or None for the few
    top-level layers (conv_in, time embedding ...) that callers map with diffusers' fixed table.

    ``down_blocks.1.attentions.0.x`` -> ``input_blocks.4.1.x`` when ``layers_per_block`` is 2 (SDXL, SD1.5).
    The same rule serves kohya's SDXL LoRA names and the single-file checkpoint writer.
    """
    per = layers_per_block + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.?(.*)", path):
        return f"input_blocks.{int(m[1]) * per + int(m[2]) + 1}.0.{_resnet(m[3])}".rstrip(".")
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.?(.*)", path):
        return f"input_blocks.{int(m[1]) * per + int(m[2]) + 1}.1.{m[3]}".rstrip(".")
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.?(.*)", path):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}".rstrip(".")
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.?(.*)", path):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}".rstrip(".")
    if m := re.fullmatch(r"mid_block\.attentions\.0\.?(.*)", path):
        return f"middle_block.1.{m[1]}".rstrip(".")
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.?(.*)", path):
        return f"output_blocks.{int(m[1]) * per + int(m[2])}.0.{_resnet(m[3])}".rstrip(".")
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.?(.*)", path):
        return f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}".rstrip(".")
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.?(.*)", path):
        b = int(m[1])
        return f"output_blocks.{b * per + layers_per_block}.{2 if up_has_attention[b] else 1}.conv.{m[2]}".rstrip(".")
    return None


def unet_layout(unet_config: Any) -> tuple[int, list[bool]]:
    """(layers_per_block, has-attention per up block): what :func:`sgm_unet_path` needs from a UNet config."""
    layers = unet_config.layers_per_block
    if not isinstance(layers, int):
        raise ValueError(f"UNet with per-block layers_per_block {layers} has no single SGM layout")
    return layers, ["CrossAttn" in t for t in unet_config.up_block_types]
