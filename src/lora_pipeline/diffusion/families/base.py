"""The family interface: what the trainer, the exporter, stacking, merge, evaluation and generation ask of a base
model's architecture, and nothing else.

A family is one subclass of :class:`ModelFamily` in one module of this package (``sd1``, ``sdxl``; ``unet`` holds
what the two UNet families share). It answers:

* identity and detection: its ``name``, the diffusers pipeline class it loads with, and whether it recognises a
  pipeline class name (:meth:`~ModelFamily.recognises_pipeline_class`) or a single-file checkpoint's keys
  (:meth:`~ModelFamily.recognises_checkpoint`); :func:`lora_pipeline.diffusion.families.detect_family` asks each;
* its parts: the ``denoiser`` component (``unet``; a transformer for DiT families) and its ``text_encoders``;
* loading: keyword arguments for the pipeline, flags it carries, the noise schedule training uses;
* prompts: :meth:`~ModelFamily.encode_prompt` (what a prompt conditions the denoiser with, a
  :class:`Conditioning`, which is also what the text-embedding cache stores) and the pipeline call's prompt
  arguments;
* latents: :meth:`~ModelFamily.sample_latents` (VAE scale and shift);
* the training objective: :meth:`~ModelFamily.objective` returns an :class:`Objective` (noise, timestep sampling,
  model input, target, loss weight); :meth:`~ModelFamily.micro_conditioning` (SDXL's time ids) and
  :meth:`~ModelFamily.predict` (one denoiser call with every conditioning input);
* LoRA files: default targets, kohya/original module names (:meth:`~ModelFamily.kohya_name`, and back with
  :meth:`~ModelFamily.kohya_index`), trained pairs to kohya modules and back (:meth:`~ModelFamily.to_kohya_modules`,
  :meth:`~ModelFamily.from_kohya_module`: one to one here, fused where an original layout fuses modules), the
  ``ss_*`` / ``modelspec.*`` header keys that name the family, and the single-file layout of its text encoders;
* checks that only apply to it (clip_skip, precision).
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


@dataclass
class Conditioning:
    """What the text encoders give the denoiser: a token sequence (``hidden``) and, for families that have one, a
    pooled embedding and the sequence's attention mask (Chroma's T5). The text-embedding cache stores exactly
    these, one prompt per entry."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def per_prompt(self) -> list[dict[str, torch.Tensor]]:
        """One ``{name: tensor}`` per prompt (fp32, on the CPU): a cache entry each."""
        parts = {name: value for name, value in (("hidden", self.hidden), ("pooled", self.pooled),
                                                 ("mask", self.mask)) if value is not None}
        return [{name: value[index].float().cpu() for name, value in parts.items()}
                for index in range(self.hidden.shape[0])]

    @classmethod
    def stack(cls, items: Sequence[Mapping[str, torch.Tensor]], device: torch.device) -> "Conditioning":
        """The inverse of :meth:`per_prompt`, for a batch of cache entries."""
        return cls(**{name: torch.stack([item[name] for item in items]).to(device) for name in items[0]})


@dataclass
class NoisedBatch:
    """One batch as the objective prepared it: what the denoiser sees, at which timesteps, what it should predict,
    and a per-sample loss weight (min-SNR ...) or None."""

    model_input: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None = None


class Objective(ABC):
    """A training objective: how noise and timesteps are drawn, what the denoiser gets and what it must predict.

    Randomness comes only from the generator passed in (a CPU generator seeded per micro-step), in a fixed order,
    so a resumed run draws exactly what an uninterrupted one would."""

    @abstractmethod
    def noise(self, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        """Noise of the latents' shape (on the CPU)."""

    @abstractmethod
    def timesteps(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """One training timestep per sample (on the CPU)."""

    def draw(self, shape: torch.Size, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise, then timesteps: the order every run draws them in."""
        noise = self.noise(shape, generator)
        return noise, self.timesteps(shape[0], generator)

    @abstractmethod
    def noised(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> NoisedBatch:
        """The denoiser's input, its target and the loss weight for clean ``latents`` at ``timesteps``."""

    @staticmethod
    def per_sample_loss(pred: torch.Tensor, batch: NoisedBatch) -> torch.Tensor:
        """MSE per sample (fp32), times the batch's loss weight where it has one."""
        loss = F.mse_loss(pred.float(), batch.target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
        return loss if batch.weight is None else loss * batch.weight


class ModelFamily(ABC):
    """One model family (see the module docstring); subclasses set the class attributes and the abstract methods."""

    name: ClassVar[str]  # base_model_family, LoraSpec.family
    display_name: ClassVar[str]  # in messages: "Stable Diffusion XL"
    short_name: ClassVar[str]  # in messages: "SDXL"
    pipeline_class_name: ClassVar[str]  # the diffusers pipeline it loads, trains and samples with
    pipeline_class_prefix: ClassVar[str]  # its img2img, inpaint ... variants share it; the longest match wins
    denoiser: ClassVar[str] = "unet"  # the denoiser's component name in the pipeline
    text_encoders: ClassVar[tuple[str, ...]]  # component names, in the pipeline's order
    tokenizers: ClassVar[tuple[str, ...]]  # one per text encoder
    kohya_denoiser_prefix: ClassVar[str] = "lora_unet_"
    kohya_te_prefixes: ClassVar[tuple[str, ...]]  # one per text encoder
    default_targets: ClassVar[Mapping[str, tuple[str, ...]]]  # LoRA target modules per component (kohya's)
    default_resolution: ClassVar[int]  # the bucket side it trains at (normalization's resolution: auto)
    checkpoint_marker: ClassVar[str]  # a key prefix only its single-file checkpoints have
    single_file_text_encoders: ClassVar[tuple[tuple[str, str], ...]]  # (key prefix, layout) per text encoder
    # True: a single-file checkpoint holds the denoiser only (``flux1-dev.safetensors`` in ComfyUI's
    # models/diffusion_models); the other components come from ``single_file_config``. False: the whole pipeline.
    single_file_is_denoiser_only: ClassVar[bool] = False

    # ------------------------------------------------------------------ identity

    @property
    def components(self) -> tuple[str, ...]:
        """Every LoRA-able component: the denoiser, then the text encoders."""
        return (self.denoiser,) + self.text_encoders

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def denoiser_class(self, config_folder: str | Path):
        """The diffusers class of the denoiser, as a diffusers folder's ``model_index.json`` names it."""
        import diffusers

        index = json.loads((Path(config_folder) / "model_index.json").read_text(encoding="utf-8"))
        return getattr(diffusers, index[self.denoiser][1])

    def recognises_pipeline_class(self, class_name: str, variants: bool = False) -> int:
        """How well ``class_name`` names this family's pipeline: 0 not at all; else the length of the match (the
        detector takes the longest). ``variants``: img2img, inpaint ... pipelines count too (a loaded pipeline);
        a ``model_index.json`` to train from must name the family's own pipeline."""
        if class_name == self.pipeline_class_name:
            return len(class_name)
        # a version number right after the prefix names another family (StableDiffusion3Pipeline is not SD1.x)
        if variants and class_name.startswith(self.pipeline_class_prefix) \
                and not class_name[len(self.pipeline_class_prefix):][:1].isdigit():
            return len(self.pipeline_class_prefix)
        return 0

    def recognises_checkpoint(self, keys: Sequence[str]) -> bool:
        """Whether a single-file (original layout) checkpoint with these keys is of this family."""
        return any(key.startswith(self.checkpoint_marker) for key in keys)

    def recognises_kohya_name(self, name: str) -> bool:
        """Whether a kohya module name looks like one of this family's (for the hint when a LoRA does not fit)."""
        return False

    lora_architecture_prefix: ClassVar[str]  # its LoRAs' modelspec.architecture starts with it
    lora_base_versions: ClassVar[tuple[str, ...]] = ()  # the ss_base_model_version values kohya writes for it

    def recognises_lora_header(self, metadata: Mapping[str, str]) -> bool:
        """Whether a LoRA file's header says it was trained on this family (kohya's and our own headers)."""
        architecture = metadata.get("modelspec.architecture", "")
        if architecture:
            return architecture.startswith(self.lora_architecture_prefix)
        return metadata.get("ss_base_model_version", "") in self.lora_base_versions

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    # ------------------------------------------------------------------ loading

    def pipeline_load_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments of ``from_pretrained`` / ``from_single_file``."""
        return {}

    def pipeline_init_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments when a pipeline is built over loaded components."""
        return {}

    def pipeline_flags(self, pipe: Any) -> dict[str, Any]:
        """Configuration values of a loaded pipeline that a rebuilt one must carry too."""
        return {}

    @abstractmethod
    def training_scheduler(self, scheduler: Any) -> Any:
        """The noise schedule training uses, from the base model's own scheduler."""

    # ------------------------------------------------------------------ checks

    def check_clip_skip(self, clip_skip: int) -> None:
        """Refuse a clip_skip the family cannot use (a ConfigError)."""

    def check_precision(self, mixed_precision: str) -> None:
        """Say what a precision means for this family (a warning), or refuse it."""

    # ------------------------------------------------------------------ prompts

    @abstractmethod
    def encode_prompt(self, text_encoders: Sequence[Any], tokenizers: Sequence[Any], texts: Sequence[str],
                      device: torch.device, clip_skip: int = 1) -> Conditioning:
        """Prompts -> the denoiser's text conditioning, the way the family's own pipeline computes it."""

    def prompt_kwargs(self, pipe, prompt: str, negative: str | None, clip_skip: int | None) -> dict[str, Any]:
        """What a pipeline call gets for its prompt."""
        if clip_skip and clip_skip > 1:
            self.check_clip_skip(clip_skip)
        return {"prompt": prompt, "negative_prompt": negative or None}

    def text_cache_settings(self, clip_skip: int) -> dict[str, Any]:
        """Settings besides the text encoders' weights that change a cached prompt embedding."""
        return {"clip_skip": clip_skip} if clip_skip > 1 else {}

    # ------------------------------------------------------------------ latents and the objective

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator,
                       vae: Any) -> torch.Tensor:
        """A latent drawn from the VAE's distribution, shifted and scaled as the denoiser expects
        (``(z - shift) * scale``; no shift where the VAE config has none). ``vae`` is the VAE itself, not only its
        config: Flux.2 normalises by the batch-norm statistics in its weights."""
        latents = mean + std * torch.randn(mean.shape, generator=generator)
        shift = getattr(vae.config, "shift_factor", None)
        if shift:
            latents = latents - shift
        return latents * vae.config.scaling_factor

    @abstractmethod
    def objective(self, scheduler: Any, noise_offset: float = 0.0, min_snr_gamma: float | None = None,
                  **recipe: Any) -> Objective:
        """The training objective over ``scheduler`` (see :class:`Objective`); ``recipe`` holds the settings of
        objectives other than DDPM (flow matching: ``timestep_sampling``, ``discrete_flow_shift``, ...)."""

    def recipe(self, params: Any, denoiser_config: Any) -> dict[str, str]:
        """Header keys (``ss_*``) that record this run's objective settings, beyond the common ones."""
        return {}

    def lora_targets(self, denoiser_targets: Sequence[str], text_encoder_targets: Sequence[str] | None
                     ) -> dict[str, Any]:
        """LoRA targets per component from ``training.unet_targets`` and, when the text encoders are trained,
        ``text_encoder_targets`` (every text encoder)."""
        targets: dict[str, Any] = {self.denoiser: list(denoiser_targets)}
        if text_encoder_targets is not None:
            targets.update({name: list(text_encoder_targets) for name in self.text_encoders})
        return targets

    def micro_conditioning(self, examples: Sequence[Any], device: torch.device) -> torch.Tensor | None:
        """Per-image conditioning besides the prompt (SDXL's size and crop), or None."""
        return None

    @abstractmethod
    def predict(self, denoiser: Any, batch: NoisedBatch, cond: Conditioning, micro: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        """One denoiser call in ``dtype``: its prediction for ``batch``, in the target's layout."""

    # ------------------------------------------------------------------ LoRA files

    @abstractmethod
    def kohya_name(self, component: str, module_path: str, denoiser_config: Any = None) -> str:
        """One module's kohya (WebUI/ComfyUI) name."""

    def kohya_index(self, modules: Mapping[str, torch.nn.Module]) -> dict[str, tuple[str, str]]:
        """``{kohya name: (component, module path)}`` for every named module of loaded components.

        kohya names turn ``.`` into ``_``, which is ambiguous, so names are looked up, never parsed."""
        index = {}
        for component, model in modules.items():
            config = getattr(model, "config", None)
            for path, _ in model.named_modules():
                if path:
                    index[self.kohya_name(component, path, config)] = (component, path)
        return index

    def lora_file_index(self, modules: Mapping[str, torch.nn.Module]) -> dict[str, Any]:
        """Every name a downloaded LoRA file may give this family's modules (``{name: index entry}``): kohya's
        here; a family whose files come in more layouts (Flux: BFL, OneTrainer ...) adds theirs."""
        return self.kohya_index(modules)

    lora_file_layouts: ClassVar[tuple[Any, ...]] = ()  # those extra layouts (name, example key, prefixes), for errors

    def to_kohya_modules(self, pairs: Mapping[tuple[str, str], tuple[torch.Tensor, torch.Tensor]], alpha: float,
                         denoiser_config: Any = None) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """Trained LoRA pairs ``{(component, module path): (down, up)}`` as kohya modules ``{name: (down, up,
        alpha)}``. One module each here; a family whose original layout fuses modules (Flux's qkv) overrides this
        to stack them."""
        return {self.kohya_name(component, path, denoiser_config): (down, up, alpha)
                for (component, path), (down, up) in pairs.items()}

    def from_kohya_module(self, name: str, down: torch.Tensor, up: torch.Tensor,
                          index: Mapping[str, tuple[str, str]]) -> list[tuple[str, str, torch.Tensor, torch.Tensor]]:
        """One kohya module of a file as ``(component, module path, down, up)`` of the loaded model (``index`` from
        :meth:`kohya_index`); a family with fused modules splits them here."""
        return [(*index[name], down, up)]

    def naming_layout(self, denoiser_config: Any) -> dict[str, Any]:
        """What :meth:`kohya_name` needs from the denoiser's config, recorded at training so export never loads
        the base."""
        return {}

    @abstractmethod
    def kohya_header(self, summary: Any) -> dict[str, str]:
        """The header keys that name the family and its recipe (``ss_base_model_version``,
        ``modelspec.architecture`` ...), for a run's training summary."""
