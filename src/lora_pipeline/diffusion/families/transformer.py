"""What the diffusion-transformer families (Flux.1, SD3.5, Chroma ...) share: flow matching, and LoRA files whose
names are the original checkpoint's module paths (:mod:`lora_pipeline.diffusion.original_layout`).

A subclass sets ``layout`` (its :class:`~lora_pipeline.diffusion.original_layout.OriginalLayout`) and writes
its prompt encoding, its denoiser call and its header values; kohya names (``lora_unet_`` + the original path
with ``.`` -> ``_``), ComfyUI's ``diffusion_model.<original path>`` names, fusing and splitting come from here.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Mapping, Sequence

import torch

from lora_pipeline.core.config import KOHYA_TE_TARGETS, KOHYA_UNET_TARGETS
from lora_pipeline.core.errors import ConfigError
from lora_pipeline.diffusion.families.base import ModelFamily, NoisedBatch, Objective
from lora_pipeline.diffusion.flow_matching import noisy_and_target, sample_sigmas
from lora_pipeline.diffusion.original_layout import Fused, OriginalLayout, fuse, linear_layers, split

logger = logging.getLogger(__name__)

ORIGINAL_PREFIX = "diffusion_model."  # ComfyUI / the original trainers: the original module path, unflattened
ONETRAINER_PREFIX = "lora_transformer_"  # OneTrainer (legacy): the diffusers path with . -> _
LYCORIS_PREFIX = "lycoris_"  # SimpleTuner's LyCORIS files: the diffusers path with . -> _


class FlowMatchObjective(Objective):
    """Rectified flow: a sigma per image by ``timestep_sampling``, input ``(1 - sigma) x + sigma noise``, target the
    velocity ``noise - x``. ``loss_weight_power`` 2 weights each image's loss by sigma squared, which is the same
    loss as predicting the clean latent ``x_t - sigma v`` against ``x`` (kohya's SD3 preconditioning)."""

    def __init__(self, sampling: str = "shift", discrete_flow_shift: float = 3.1582, sigmoid_scale: float = 1.0,
                 loss_weight_power: int = 0):
        self.sampling, self.shift, self.sigmoid_scale = sampling, discrete_flow_shift, sigmoid_scale
        self.loss_weight_power = loss_weight_power

    def noise(self, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    def timesteps(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return sample_sigmas(self.sampling, batch_size, generator, sigmoid_scale=self.sigmoid_scale,  # type: ignore[arg-type]
                             discrete_flow_shift=self.shift)

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> NoisedBatch:
        if timesteps.is_floating_point() is False:  # evaluation's fixed integer timesteps (of 1000)
            timesteps = timesteps.float() / 1000
        noisy, target = noisy_and_target(latents, noise, timesteps)
        weight = timesteps.float() ** self.loss_weight_power if self.loss_weight_power else None
        return NoisedBatch(noisy, timesteps, target, weight)


class TransformerFamily(ModelFamily):
    """A diffusion transformer trained with flow matching, its LoRA files named in its original layout."""

    denoiser = "transformer"
    layout: ClassVar[OriginalLayout]
    clip_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)  # the text encoders that are CLIP models
    loss_weight_power: ClassVar[int] = 0  # see FlowMatchObjective

    block_linears: ClassVar[str]  # the default LoRA targets in the denoiser, as a PEFT regex (the trainers' default)
    # the text encoders ``train_text_encoder: true`` trains (the trainers' default; T5 and the LLM encoders: none)
    trained_text_encoders: ClassVar[tuple[str, ...]] = ()

    @property
    def default_targets(self) -> dict[str, Any]:  # type: ignore[override]
        return {self.denoiser: self.block_linears, **{name: tuple(KOHYA_TE_TARGETS) for name in self.trained_text_encoders}}

    def lora_targets(self, denoiser_targets: Sequence[str], text_encoder_targets: Sequence[str] | None
                     ) -> dict[str, Any]:
        """``training.unet_targets`` left at its (SD) default means the family's ``block_linears``; the trained text
        encoders are ``trained_text_encoders`` (a family without any ignores ``train_text_encoder``)."""
        targets: dict[str, Any] = {self.denoiser: self.block_linears if list(denoiser_targets) == list(KOHYA_UNET_TARGETS)
                                   else list(denoiser_targets)}
        if text_encoder_targets is not None:
            targets.update({name: list(text_encoder_targets) for name in self.trained_text_encoders})
        return targets

    # why ``clip_skip`` > 1 means nothing for this family: (article + short name, reason), for its error
    no_clip_skip_because: ClassVar[tuple[str, str]]

    def check_clip_skip(self, clip_skip: int) -> None:
        if clip_skip > 1:
            article, reason = self.no_clip_skip_because
            raise ConfigError(f"clip_skip {clip_skip} with {article} base: {reason}. Set clip_skip: 1.")

    def training_scheduler(self, scheduler: Any) -> Any:
        return scheduler  # flow matching draws its own sigmas; the scheduler only samples

    def objective(self, scheduler: Any, noise_offset: float = 0.0, min_snr_gamma: float | None = None,
                  **recipe: Any) -> Objective:
        if noise_offset or min_snr_gamma:
            raise ConfigError(f"noise_offset and min_snr_gamma are DDPM settings; a {self.display_name} run uses "
                              f"timestep_sampling and discrete_flow_shift instead. Remove them for this subject.")
        return FlowMatchObjective(recipe.get("timestep_sampling", "shift"), recipe.get("discrete_flow_shift", 3.1582),
                                  recipe.get("sigmoid_scale", 1.0), self.loss_weight_power)

    def flow_recipe(self, params: Any) -> dict[str, str]:
        """The objective's header keys, as kohya's flow-matching trainers write them."""
        return {"ss_timestep_sampling": params.timestep_sampling,
                "ss_discrete_flow_shift": str(params.discrete_flow_shift), "ss_sigmoid_scale": str(params.sigmoid_scale),
                "ss_model_prediction_type": "raw"}

    # ------------------------------------------------------------------ LoRA files

    def text_encoder_kohya_path(self, component: str, module_path: str) -> str:
        """A text-encoder module's path in its kohya name (CLIP keeps transformers 4's ``text_model.`` wrapper, as
        WebUI's keys do; T5 and the LLM encoders their own paths)."""
        if component in self.clip_encoders:
            module_path = "text_model." + module_path.removeprefix("text_model.")
        return module_path.replace(".", "_")

    def kohya_name(self, component: str, module_path: str, denoiser_config: Any = None) -> str:
        if component == self.denoiser:
            found = self.layout.original_name(module_path)
            return self.kohya_denoiser_prefix + (found[0] if found else module_path).replace(".", "_")
        return self.kohya_te_prefixes[self.text_encoders.index(component)] + self.text_encoder_kohya_path(
            component, module_path)

    def kohya_index(self, modules: Mapping[str, torch.nn.Module]) -> dict[str, Any]:
        """As the base, but a fused name (``..._attn_qkv``) lists all its parts and their widths."""
        index: dict[str, Any] = super().kohya_index(modules)
        denoiser = modules.get(self.denoiser)
        if denoiser is not None:
            linears = linear_layers(denoiser)  # (PEFT-wrapped when another file's adapter is loaded)
            for original, group in self.layout.fused_modules(list(linears)).items():
                if len(group.parts) > 1:
                    index[self.kohya_denoiser_prefix + original.replace(".", "_")] = Fused(
                        self.denoiser, group.parts, tuple(linears[p].out_features for p in group.parts))
        return index

    def lora_file_index(self, modules: Mapping[str, torch.nn.Module]) -> dict[str, Any]:
        """:meth:`kohya_index` plus ComfyUI's ``diffusion_model.<original module>`` names (fused entries as kohya's)
        and OneTrainer's / SimpleTuner's flattened diffusers paths. (diffusers' own ``transformer.<path>`` names are
        every family's: see lora_files.)"""
        index: dict[str, Any] = self.kohya_index(modules)
        denoiser = modules.get(self.denoiser)
        if denoiser is not None:
            for original, group in self.layout.fused_modules(list(linear_layers(denoiser))).items():
                index[ORIGINAL_PREFIX + original] = index[self.kohya_denoiser_prefix + original.replace(".", "_")]
            for path, _ in denoiser.named_modules():
                if path:
                    flat = path.replace(".", "_")
                    index.setdefault(ONETRAINER_PREFIX + flat, (self.denoiser, path))
                    index.setdefault(LYCORIS_PREFIX + flat, (self.denoiser, path))
        return index

    def from_kohya_module(self, name: str, down: torch.Tensor, up: torch.Tensor,
                          index: Mapping[str, Any]) -> list[tuple[str, str, torch.Tensor, torch.Tensor]]:
        entry = index[name]
        if isinstance(entry, Fused):
            return [(entry.component, path, part_down, part_up)
                    for path, (part_down, part_up) in zip(entry.parts, split(down, up, list(entry.sizes)))]
        return [(*entry, down, up)]

    def to_kohya_modules(self, pairs: Mapping[tuple[str, str], tuple[torch.Tensor, torch.Tensor]], alpha: float,
                         denoiser_config: Any = None) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """Text-encoder and one-to-one transformer modules as they are; the parts of a fused module fused."""
        modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        denoiser = {path: pair for (component, path), pair in pairs.items() if component == self.denoiser}
        for (component, path), (down, up) in pairs.items():
            if component != self.denoiser:
                modules[self.kohya_name(component, path)] = (down, up, alpha)
        unmapped = [path for path in denoiser if self.layout.original_name(path) is None]
        if unmapped:  # outside the blocks (custom unet_targets): written, but under names only this project reads
            logger.warning("%d trained %s modules are outside its blocks (%s ...) and have no original-layout name: "
                           "the kohya file keeps their diffusers paths, which WebUI and ComfyUI do not map (the "
                           "diffusers folder has them).", len(unmapped), self.display_name, unmapped[0])
        for path in unmapped:
            modules[self.kohya_name(self.denoiser, path)] = (*denoiser[path], alpha)
        for original, group in self.layout.fused_modules(list(denoiser)).items():
            if len(group.parts) == 1 and self.layout.part_count(original) == 1:
                modules[self.kohya_name(self.denoiser, group.parts[0])] = (*denoiser[group.parts[0]], alpha)
                continue
            expected = self.layout.part_count(original)
            if len(group.parts) != expected:
                raise ConfigError(f"{original} is one module in kohya's {self.short_name} layout, but only "
                                  f"{len(group.parts)} of its {expected} parts were trained ({', '.join(group.parts)}):"
                                  f" train all of them (the default unet_targets) so the file loads in WebUI and "
                                  f"ComfyUI.")
            modules[self.kohya_denoiser_prefix + original.replace(".", "_")] = fuse(
                [denoiser[p][0] for p in group.parts], [denoiser[p][1] for p in group.parts], alpha)
        return modules

