"""Diffusion bases (any family: SD1.x, SDXL) as one bundle of components, :class:`DiffusionComponents`, for every stage
(training, generation, evaluation, merge).

Who does what: :func:`lora_pipeline.core.models.resolve_model` finds the folder, file or hub id (downloads only
when allowed), the rule every transformers model loads by too (:func:`~lora_pipeline.core.models.load_pretrained`);
:func:`lora_pipeline.diffusion.families.resolve_family` says which family it is; this module calls diffusers'
``from_pretrained`` or ``from_single_file`` and takes the pipeline apart."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_pipeline.core.files import sha256_hex
from lora_pipeline.core.models import resolve_model
from lora_pipeline.diffusion.families import Conditioning, ModelFamily, resolve_family

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass
class DiffusionComponents:
    """A base model's parts. ``denoiser`` is the family's ``family.denoiser`` component (the UNet of SD1.x and
    SDXL); ``text_encoders``/``tokenizers`` follow ``family.text_encoders`` in order."""

    family: ModelFamily
    denoiser: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    scheduler: Any  # the noise schedule training uses (DDPM for the UNet families)
    source: str
    inference_scheduler: Any = None  # the base model's own sampler, for images
    extra: dict[str, Any] = field(default_factory=dict)  # pipeline flags such as force_zeros_for_empty_prompt
    clip_skip: int = 1  # kohya/WebUI count: 2 conditions on the penultimate CLIP layer

    @property
    def unet(self) -> Any:
        """The denoiser of a UNet family (there is no UNet in a transformer family: use ``denoiser``)."""
        if self.family.denoiser != "unet":
            raise AttributeError(f"a {self.family.display_name} base has no unet; its denoiser is "
                                 f"{self.family.denoiser}")
        return self.denoiser

    @property
    def text_encoder(self) -> Any:
        return self.text_encoders[0]

    @property
    def tokenizer(self) -> Any:
        return self.tokenizers[0]

    def component(self, name: str) -> Any:
        """The denoiser (``unet``), ``text_encoder`` or ``text_encoder_2`` by name."""
        if name == self.family.denoiser:
            return self.denoiser
        return self.text_encoders[self.family.text_encoders.index(name)]

    def modules(self) -> dict[str, Any]:
        """Every LoRA-able component by name, in the family's order."""
        return {name: self.component(name) for name in self.family.components}

    def encode_prompt(self, texts, device: torch.device, text_encoders: list[Any] | None = None) -> Conditioning:
        return self.family.encode_prompt(text_encoders or self.text_encoders, self.tokenizers, texts, device,
                                         self.clip_skip)

    def pipeline(self, **overrides: Any):
        """The family's diffusers pipeline over these very modules (LoRA layers included), for images."""
        parts: dict[str, Any] = {self.family.denoiser: self.denoiser, "vae": self.vae,
                                 "scheduler": self.inference_scheduler or self.scheduler}
        for index, name in enumerate(self.family.text_encoders):
            parts[name] = self.text_encoders[index]
            parts[self.family.tokenizers[index]] = self.tokenizers[index]
        parts.update(self.family.pipeline_init_kwargs())  # SD1.x: no safety checker
        parts.update(self.extra)
        parts.update(overrides)
        return self.family.pipeline_class()(**parts)


def load_diffusion_model(base_model: str, family: str = "auto", allow_download: bool = False,
                         single_file_config: str | None = None) -> DiffusionComponents:
    """Load a base through ``from_pretrained`` (folder, hub id) or ``from_single_file`` (one checkpoint).

    A single file (``v1-5-pruned.safetensors``, ``sd_xl_base_1.0.safetensors`` from WebUI) needs a local
    ``single_file_config`` folder (a diffusers folder of the same family holding model_index.json, the
    component configs and tokenizers), so nothing is fetched.
    """
    source = resolve_model(base_model, allow_download)
    chosen = resolve_family(family, source, allow_download)
    pipeline_class = chosen.pipeline_class()
    extra = chosen.pipeline_load_kwargs()
    if source.endswith(SINGLE_FILE_SUFFIXES) and Path(source).is_file():
        if single_file_config is None:
            raise ValueError(
                f"'{source}' is a single-file {chosen.display_name} checkpoint; set single_file_config to a local "
                f"diffusers {chosen.name} folder (configs and tokenizers are enough) so nothing has to be downloaded.")
        config = resolve_model(single_file_config, allow_download=False)
        pipe = pipeline_class.from_single_file(source, config=config, local_files_only=True, **extra)
    else:
        pipe = pipeline_class.from_pretrained(source, local_files_only=not allow_download, **extra)
    scheduler = chosen.training_scheduler(pipe.scheduler)  # UNet families: DDPM with the base model's betas
    text_encoders = [getattr(pipe, name) for name in chosen.text_encoders]
    tokenizers = [getattr(pipe, name) for name in chosen.tokenizers]
    logger.info("Loaded %s base from %s", chosen.display_name, source)
    return DiffusionComponents(chosen, getattr(pipe, chosen.denoiser), pipe.vae, text_encoders, tokenizers, scheduler,
                               source, pipe.scheduler, chosen.pipeline_flags(pipe))


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's config and weights: the identity a cache key needs (same weights = same key)."""
    def chunks():
        yield repr(getattr(module, "config", ""))
        for name, tensor in sorted(module.state_dict().items()):
            yield name
            # The numpy view is hashed in place (no copy): a UNet is 3.4 GB in fp32.
            yield tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()

    return sha256_hex(chunks(), 24)
