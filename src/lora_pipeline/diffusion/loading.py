"""Diffusion bases (any family: SD1.x, SDXL) as one bundle of components, :class:`DiffusionComponents`, for every stage
(training, generation, evaluation, merge).

Who does what: :func:`lora_pipeline.core.models.resolve_model` finds the folder, file or hub id (downloads only
when allowed), the rule every transformers model loads by too (:func:`~lora_pipeline.core.models.load_pretrained`);
:func:`lora_pipeline.diffusion.families.resolve_family` says which family it is; this module calls diffusers'
``from_pretrained`` or ``from_single_file`` and takes the pipeline apart, and quantizes the frozen denoiser when
asked (``training.base_quantization``: :func:`check_base_quantization` before anything loads,
:func:`quantize_denoiser` after)."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_pipeline.core.errors import ConfigError
from lora_pipeline.core.files import sha256_hex
from lora_pipeline.core.models import resolve_model
from lora_pipeline.diffusion.families import Conditioning, ModelFamily, resolve_family

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")

# training.base_quantization -> the package that stores the frozen weights (import name = pip name)
QUANTIZATION_PACKAGES = {"nf4": "bitsandbytes", "float8": "torchao"}
QUANTIZED_DTYPE = torch.bfloat16  # what a quantized base computes in, and what its unquantized parameters keep
NF4_BLOCKSIZE = 64  # bitsandbytes' 4-bit block: one absmax per 64 weights
QUANTIZATION_MARK = "lora_pipeline_quantization"  # attribute on a quantized denoiser: which method made it


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
                         single_file_config: str | None = None, base_quantization: str = "none",
                         device: str = "auto") -> DiffusionComponents:
    """Load a base through ``from_pretrained`` (folder, hub id) or ``from_single_file`` (one checkpoint).

    A single file (``v1-5-pruned.safetensors``, ``sd_xl_base_1.0.safetensors`` from WebUI) needs a local
    ``single_file_config`` folder (a diffusers folder of the same family holding model_index.json, the
    component configs and tokenizers), so nothing is fetched.

    ``base_quantization`` (nf4, float8) loads the denoiser in bf16 and quantizes its Linear weights onto the CUDA
    GPU, layer by layer (:func:`quantize_denoiser`); without CUDA or the package it stops before anything loads.
    ``device`` is the training device setting the quantized weights are for.
    """
    check_base_quantization(base_quantization, device)
    source = resolve_model(base_model, allow_download)
    chosen = resolve_family(family, source, allow_download)
    pipeline_class = chosen.pipeline_class()
    extra = chosen.pipeline_load_kwargs()
    if base_quantization != "none" and not source.endswith(SINGLE_FILE_SUFFIXES):
        # the denoiser straight in bf16 (no fp32 copy of 12B parameters in RAM); the rest as before
        extra = {**extra, "dtype": {chosen.denoiser: QUANTIZED_DTYPE, "default": torch.float32}}
    if source.endswith(SINGLE_FILE_SUFFIXES) and Path(source).is_file():
        if single_file_config is None:
            raise ValueError(
                f"'{source}' is a single-file {chosen.display_name} checkpoint; set single_file_config to a local "
                f"diffusers {chosen.name} folder (configs and tokenizers are enough) so nothing has to be downloaded.")
        config = resolve_model(single_file_config, allow_download=False)
        if chosen.single_file_is_denoiser_only:
            pipe = _pipeline_around_denoiser_file(chosen, source, config, extra)
        else:
            pipe = pipeline_class.from_single_file(source, config=config, local_files_only=True, **extra)
    else:
        pipe = pipeline_class.from_pretrained(source, local_files_only=not allow_download, **extra)
    scheduler = chosen.training_scheduler(pipe.scheduler)  # UNet families: DDPM with the base model's betas
    if base_quantization != "none":
        quantize_denoiser(getattr(pipe, chosen.denoiser), base_quantization, torch.device("cuda"))
    text_encoders = [getattr(pipe, name) for name in chosen.text_encoders]
    tokenizers = [getattr(pipe, name) for name in chosen.tokenizers]
    logger.info("Loaded %s base from %s", chosen.display_name, source)
    return DiffusionComponents(chosen, getattr(pipe, chosen.denoiser), pipe.vae, text_encoders, tokenizers, scheduler,
                               source, pipe.scheduler, chosen.pipeline_flags(pipe))


def _pipeline_around_denoiser_file(family: ModelFamily, source: str, config: str, extra: dict[str, Any]) -> Any:
    """A denoiser-only checkpoint (Flux's ``flux1-dev.safetensors``): diffusers converts the denoiser from its
    original layout (``from_single_file`` with the config folder's ``<denoiser>/config.json``); the VAE, text
    encoders and scheduler load from ``single_file_config``, which must then hold their weights too."""
    dtype = extra.get("dtype", {}).get(family.denoiser) if isinstance(extra.get("dtype"), dict) else None
    try:
        denoiser = family.denoiser_class(config).from_single_file(
            source, config=config, subfolder=family.denoiser, local_files_only=True,
            **({"torch_dtype": dtype} if dtype else {}))
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{source}: not a {family.display_name} {family.denoiser} checkpoint that diffusers can "
                          f"convert ({type(exc).__name__}: {exc}). Use the original file (BFL layout) or a diffusers "
                          f"folder as base_model.") from None
    try:
        return family.pipeline_class().from_pretrained(config, local_files_only=True,
                                                       **{family.denoiser: denoiser}, **extra)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{source} holds only the {family.denoiser}; single_file_config {config} must hold the "
                          f"other components' weights too (vae, text encoders) -- {type(exc).__name__}: {exc}"
                          ) from None


# ----------------------------------------------------------------------------- training.base_quantization

def quantization_problems(method: str, device: str = "auto", mixed_precision: str | None = None) -> list[str]:
    """Why ``method`` cannot quantize this run's base (empty: it can). ``device`` is the training device setting;
    ``mixed_precision``, when given, must be bf16 (what the quantized weights compute in)."""
    if method == "none":
        return []
    problems = []
    package = QUANTIZATION_PACKAGES[method]
    try:
        importlib.import_module(package)
    except ImportError as exc:  # not installed, or installed without its compiled parts
        problems.append(f"{method} needs the {package} package ({exc})")
    if device in ("cpu", "mps"):
        problems.append(f"{method} quantization runs on CUDA GPUs only, and training.device is {device}")
    elif not torch.cuda.is_available():
        problems.append(f"{method} quantization runs on CUDA GPUs only, and this machine has no CUDA device "
                        f"(torch {torch.__version__})")
    if mixed_precision is not None and mixed_precision != "bf16":
        problems.append(f"a quantized base computes in bf16, and training.mixed_precision is {mixed_precision}")
    return problems


def check_base_quantization(method: str, device: str = "auto", mixed_precision: str | None = None,
                            key: str = "training.base_quantization") -> None:
    """Raise a :class:`ConfigError` naming ``key``, every reason and the fix, before any model loads."""
    problems = quantization_problems(method, device, mixed_precision)
    if problems:
        raise ConfigError(
            f"{key}: {method} cannot be used here: " + "; ".join(problems) + ". Fix: train on a machine with a "
            "CUDA GPU (device: auto or cuda) with `pip install 'lora_pipeline[quantization]'` (bitsandbytes for "
            "nf4, torchao for float8) and mixed_precision: bf16, or set base_quantization: none.")


def quantized_with(module: torch.nn.Module) -> str:
    """The ``base_quantization`` that :func:`quantize_denoiser` applied to ``module`` ("none" if none)."""
    return getattr(getattr(module, "module", module), QUANTIZATION_MARK, "none")


def quantize_denoiser(model: torch.nn.Module, method: str, device: torch.device | str) -> torch.nn.Module:
    """Quantize every ``nn.Linear`` weight of a frozen denoiser in place and move it to ``device``, one layer at a
    time (a layer is quantized as it arrives there, so the GPU never holds the bf16 model); the other parameters
    (biases, norms, convolutions) stay in bf16.

    - ``nf4``: bitsandbytes ``Linear4bit`` (NF4, blocks of 64, absmax double-quantized as QLoRA does: the
      layout of ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
      bnb_4bit_compute_dtype=bfloat16)``); ``is_loaded_in_4bit`` is set, which is what PEFT reads to wrap
      these layers with its 4-bit LoRA layer.
    - ``float8``: torchao ``Float8WeightOnlyConfig`` (e4m3 weights, one fp32 scale per output row, matmuls in
      bf16); PEFT wraps these with its torchao LoRA layer.

    Called by the loader (``base_quantization``) and by ``set_up`` for a base loaded without it. Checks nothing
    about the device: :func:`check_base_quantization` does, before loading."""
    if method not in QUANTIZATION_PACKAGES:
        raise ConfigError(f"training.base_quantization: unknown method {method!r}; use none, nf4 or float8.")
    if quantized_with(model) == method:
        return model
    if quantized_with(model) != "none":
        raise ConfigError(f"training.base_quantization: the base is quantized with {quantized_with(model)} already; "
                          f"load it again to use {method}.")
    device = torch.device(device)
    model.requires_grad_(False)
    if any(p.is_floating_point() and p.dtype != QUANTIZED_DTYPE for p in model.parameters()):
        # (a base loaded without base_quantization, in fp32) torch's own .to: diffusers' warns of fp32 modules
        # on every dtype cast, for models that have none
        torch.nn.Module.to(model, dtype=QUANTIZED_DTYPE)
    linears = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is torch.nn.Linear]  # exactly Linear: not a PEFT or an already quantized layer
    if method == "nf4":
        import bitsandbytes as bnb

        for parent, name, linear in linears:
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=QUANTIZED_DTYPE, compress_statistics=True, quant_type="nf4",
                                      device="meta")
            layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, blocksize=NF4_BLOCKSIZE,
                                             compress_statistics=True, quant_type="nf4")
            if linear.bias is not None:
                layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
            if device.type == "cpu":  # (tests only: training refuses CPU) bitsandbytes 0.50 repacks the weights for
                # its AVX512-bf16 kernel at the first eval forward, rewriting the quant state, and fails on layers
                # narrower than a 64-block; the plain CPU path computes the same product
                layer.support_avx512bf16_for_cpu = False
            setattr(parent, name, layer.to(device))  # Params4bit quantizes as it moves
        model.is_loaded_in_4bit = True
    else:
        from torchao.quantization import Float8WeightOnlyConfig, quantize_

        quantize_(model, Float8WeightOnlyConfig(set_inductor_config=False),
                  filter_fn=lambda module, _name: type(module) is torch.nn.Linear, device=device)
    model.to(device)
    setattr(model, QUANTIZATION_MARK, method)
    logger.info("Quantized %d Linear layers of the %s to %s on %s", len(linears), type(model).__name__, method,
                device)
    return model


def _plain_tensors(tensor: torch.Tensor):
    """A tensor, or the plain tensors a quantized tensor subclass (torchao's) is made of."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is None:
        yield tensor
        return
    for inner in flatten(tensor)[0]:
        yield from _plain_tensors(getattr(tensor, inner))


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's config and weights: the identity a cache key needs (same weights = same key).
    A quantized module is hashed as stored (its quantized bytes and scales): another key than unquantized."""
    def chunks():
        yield repr(getattr(module, "config", ""))
        for name, tensor in sorted(module.state_dict().items()):
            yield name
            for plain in _plain_tensors(tensor.detach()):
                # The numpy view is hashed in place (no copy): a UNet is 3.4 GB in fp32.
                yield plain.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()

    return sha256_hex(chunks(), 24)
