"""The diffusion LoRA training loop, for every family: PEFT injection, cached latents and text embeddings, aspect
buckets, checkpoints, exact resume.

Plain Python (no Kedro): call :func:`train` from a notebook, a Kedro node, or under ``accelerate launch``.
:func:`train` runs four named steps: :func:`set_up` (accelerator, LoRA, caches, optimizer, schedule),
:func:`step_data` (this run's batches and their loader), :func:`loss_step` (one micro-batch's loss) and the loop
itself. The bookkeeping shared with the LLM loop (accelerate, seeds, resume, loss read-back, checkpoints) lives in
:mod:`lora_pipeline.core.trainer`; the caches in :mod:`caches`; what differs between families (prompt encoding,
latents, the objective, the denoiser call, names) behind :class:`~lora_pipeline.diffusion.families.ModelFamily`.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lora_pipeline.core.cache import DiskCache
from lora_pipeline.core.checkpoints import run_signature
from lora_pipeline.core.config import TrainingParams
from lora_pipeline.core.errors import ConfigError, LoraPipelineError
from lora_pipeline.core.models import DTYPES
from lora_pipeline.core.spec import LoraSpec
from lora_pipeline.core.trainer import (
    TrainerCore,
    derive_seed,
    enable_activation_checkpointing,
    make_accelerator,
    make_optimizer,
    optimizer_step,
    peak_memory_mb,
)
from lora_pipeline.diffusion.caches import FLIPPED, TextEncoderCache, encode_latents, latent_stats, pixels
from lora_pipeline.diffusion.dataset import Example
from lora_pipeline.diffusion.families import Conditioning, ModelFamily, Objective
from lora_pipeline.diffusion.generation import vae_decodes_in_own_dtype
from lora_pipeline.diffusion.loading import (
    DiffusionComponents,
    check_base_quantization,
    module_fingerprint,
    quantize_denoiser,
    quantized_with,
)
from lora_pipeline.prep.concepts import epoch_items
from lora_pipeline.prep.images import load_rgb

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    lora_state: dict[str, torch.Tensor]
    spec: LoraSpec
    losses: list[float]
    steps: int
    epochs_done: float
    images_per_second: float
    peak_memory_mb: float
    samples: list[Any] = field(default_factory=list)
    resumed_from: str | None = None
    latents_encoded: int = 0
    optimizer: str = "AdamW"  # the optimizer class that ran
    sample_error: str | None = None  # why sample images failed (the LoRA is complete regardless)


# ----------------------------------------------------------------------------- LoRA injection

def lora_spec(params: TrainingParams, family: ModelFamily) -> LoraSpec:
    """The LoRA this run trains: the denoiser (``unet_targets``), plus every text encoder of the family when asked."""
    targets = family.lora_targets(params.unet_targets,
                                  params.text_encoder_targets if params.train_text_encoder else None)
    return LoraSpec(family=family.name, rank=params.lora_rank, alpha=params.alpha, dropout=params.dropout,
                    targets=targets)


def inject_lora(components: DiffusionComponents, spec: LoraSpec) -> None:
    """Add LoRA adapters (PEFT) to each component the spec names; freeze everything else."""
    for module in [components.denoiser, components.vae, *components.text_encoders]:
        module.requires_grad_(False)
    for component in spec.components:
        try:
            components.component(component).add_adapter(spec.peft_config(component))
        except ValueError as exc:
            defaults = components.family.default_targets
            denoiser = components.family.denoiser
            encoders = components.family.text_encoders
            raise LoraPipelineError(
                f"LoRA targets matched no layer of the {component} ({exc}). Check training.unet_targets / "
                f"text_encoder_targets; the kohya defaults are {', '.join(defaults[denoiser])} ({denoiser})"
                + (f" and {', '.join(defaults[encoders[0]])} (text encoders)" if encoders else "") + ".") from None


def lora_state_dict(components: DiffusionComponents) -> dict[str, torch.Tensor]:
    """The trainable LoRA weights with ``<component>.`` prefixes (diffusers' layout)."""
    from peft.utils import get_peft_model_state_dict

    state = {}
    for name, module in components.modules().items():
        if getattr(_unwrap(module), "peft_config", None):
            state.update({f"{name}.{k}": v for k, v in get_peft_model_state_dict(_unwrap(module)).items()})
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}


def load_lora_state(components: DiffusionComponents, state: dict[str, torch.Tensor], what: str) -> None:
    """Put LoRA weights (training layout) into the injected adapters; every weight must find its layer."""
    from peft.utils import set_peft_model_state_dict

    for name, module in components.modules().items():
        prefix = name + "."
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not part:
            continue
        if not getattr(_unwrap(module), "peft_config", None):
            raise LoraPipelineError(f"{what} has {name} weights; set training.train_text_encoder: true.")
        own = get_shapes(module)
        for key, tensor in part.items():
            peft_key = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
                ".lora_B.weight", ".lora_B.default.weight")
            if peft_key not in own:
                raise LoraPipelineError(f"{what}: weight {prefix}{key} has no matching LoRA layer; "
                                        f"check training.unet_targets / text_encoder_targets.")
            if tuple(own[peft_key]) != tuple(tensor.shape):
                rank_axis = 0 if ".lora_A." in peft_key else 1
                if tensor.shape[rank_axis] != own[peft_key][rank_axis]:
                    advice = f"set training.lora_rank: {tensor.shape[rank_axis]} (the file's rank)"
                else:  # same rank, other layer sizes
                    advice = "it was trained on another base model; use a LoRA of this base, or init_lora: null"
                raise LoraPipelineError(f"{what}: {prefix}{key} has shape {tuple(tensor.shape)}, the adapter "
                                        f"{tuple(own[peft_key])}: {advice}.")
        result = set_peft_model_state_dict(_unwrap(module), part)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise LoraPipelineError(f"{what}: unexpected keys {unexpected[:3]}")


def get_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in _unwrap(module).named_parameters() if "lora_" in name}


def _unwrap(module: Any) -> Any:
    return getattr(module, "module", module)


# ----------------------------------------------------------------------------- batches and captions

class StepInputs(torch.utils.data.Dataset):
    """One example's input to a training step: its cached latent statistics, or its pixels when latents are
    not cached (the textbook path: VAE-encode every step). Served by torch's DataLoader, so ``data_workers``
    processes read and decode the next batches while the current step computes. Index ``n + i`` is example
    ``i`` mirrored (flip_aug)."""

    def __init__(self, examples: Sequence[Example], cache: DiskCache, latent_keys: dict[str, str]):
        self.examples, self.cache, self.latent_keys = examples, cache, latent_keys

    def __len__(self) -> int:
        return 2 * len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        flipped, position = divmod(index, len(self.examples))
        example = self.examples[position]
        if not self.latent_keys:
            return {"pixels": pixels(load_rgb(example.path), bool(flipped))}
        stats = self.cache.get_tensors(self.latent_keys[example.sha256 + (FLIPPED if flipped else "")])
        if stats is None:
            raise LoraPipelineError(f"The cached latents of {example.path} disappeared during training "
                                    f"(cache folder {self.cache.root}); run the training pipeline again.")
        return stats


def data_workers(requested: int | None, device: torch.device) -> int:
    """``None`` means: none on CPU (torch already uses every core for the step), up to 4 beside a GPU."""
    if requested is not None:
        return requested
    return 0 if device.type == "cpu" else min(4, max(1, (os.cpu_count() or 2) - 1))


def bucket_batches(examples: Sequence[Example], batch_size: int, repeats: int, seed: int, epoch: int,
                   flip: bool = False) -> list[list[int]]:
    """This epoch's batches: each holds one bucket's images only; order depends on (seed, epoch) alone.

    Each image counts ``repeats`` x its folder's repeats; regularization images fill as many places as the
    instance images take (kohya's DreamBooth mixing). With ``flip``, each place is mirrored with
    probability 1/2 (index ``len(examples) + i``)."""
    rng = random.Random(derive_seed(seed, epoch, stream="order"))
    instance = [(i, ex.repeats * repeats) for i, ex in enumerate(examples) if not ex.is_reg]
    regularization = [(i, ex.repeats * repeats) for i, ex in enumerate(examples) if ex.is_reg]
    groups: dict[tuple[int, int], list[int]] = {}
    for index in epoch_items(instance, regularization):
        ex = examples[index]
        groups.setdefault((ex.width, ex.height), []).append(index)
    batches = []
    for key in sorted(groups):
        members = groups[key][:]
        rng.shuffle(members)
        if flip:
            members = [m + len(examples) if rng.random() < 0.5 else m for m in members]
        batches.extend(members[i:i + batch_size] for i in range(0, len(members), batch_size))
    rng.shuffle(batches)
    return batches


def prepare_caption(text: str, rng: random.Random, dropout: float, shuffle: bool, keep_tokens: int) -> str:
    """kohya-style caption augmentation: drop the whole caption, or shuffle tags after ``keep_tokens``."""
    if dropout and rng.random() < dropout:
        return ""
    if not shuffle:
        return text
    tags = [t.strip() for t in text.split(",") if t.strip()]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


# ----------------------------------------------------------------------------- the loop

# What must match for a checkpoint to continue a run (the rule: core.checkpoints.run_signature). The second group
# came later: each is part of the signature only when it differs from its default, so earlier runs still resume.
SIGNATURE_SETTINGS = ("batch_size", "gradient_accumulation_steps", "seed", "repeats", "learning_rate",
                      "text_encoder_lr", "lr_scheduler", "lr_warmup_steps", "caption_dropout", "shuffle_tags",
                      "noise_offset", "min_snr_gamma", "init_lora")
SIGNATURE_ADDED_LATER = {"prior_loss_weight": 1.0, "clip_skip": 1, "flip_aug": False, "optimizer": "adamw",
                         "optimizer_args": {}, "lr_scheduler_num_cycles": 1, "timestep_sampling": "shift",
                         "discrete_flow_shift": 3.1582, "sigmoid_scale": 1.0, "base_quantization": "none"}


StepCallback = Callable[[int, DiffusionComponents], None]


def check_training_set(examples: Sequence[Example], params: TrainingParams) -> None:
    """Refuse a training set that cannot train: empty, class images only, fewer places than one batch."""
    if not examples:
        raise LoraPipelineError("No training images. Run the normalization pipeline first.")
    if not any(not ex.is_reg for ex in examples):
        raise LoraPipelineError("Only regularization images and no training images. Put your subject's images in "
                                "the subject's images folder (kohya: train_data_dir), the class images in reg/.")
    places = sum(ex.repeats for ex in examples if not ex.is_reg) * params.repeats
    if params.batch_size > places:
        raise ConfigError(f"training.batch_size ({params.batch_size}) is larger than the training set "
                          f"({places} images x repeats); lower batch_size or raise repeats.")


@dataclass
class TrainingRun:
    """Everything :func:`set_up` prepared for one run; the loop's steps read it.

    ``models`` are the trained modules (the denoiser, then each trained text encoder) and ``optimizer`` /
    ``scheduler`` their optimizer and learning-rate schedule, until :meth:`prepare` wraps them for accelerate."""

    components: DiffusionComponents
    examples: Sequence[Example]
    params: TrainingParams
    cache: DiskCache
    keep_tokens: int
    accelerator: Any
    dtype: torch.dtype
    spec: LoraSpec
    trained_te: list[str]
    signature: dict[str, Any]
    latent_keys: dict[str, str]
    latents_encoded: int
    text_cache: TextEncoderCache | None
    objective: Objective
    models: list[Any]
    optimizer: Any
    scheduler: Any
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    encoders: list[Any] = field(default_factory=list)  # every text encoder, trained ones as accelerate wraps them

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def family(self) -> ModelFamily:
        return self.components.family

    @property
    def denoiser(self) -> Any:
        """The denoiser as the loop calls it (accelerate's wrapper once prepared)."""
        return self.models[0]

    def prepare(self) -> None:
        """Hand the trained modules, optimizer and schedule to accelerate (after a resume restored them)."""
        prepared = self.accelerator.prepare(*self.models, self.optimizer, self.scheduler)
        self.models, (self.optimizer, self.scheduler) = list(prepared[:-2]), prepared[-2:]
        self.encoders = list(self.components.text_encoders)
        for name, wrapped in zip(self.trained_te, self.models[1:]):
            self.encoders[self.family.text_encoders.index(name)] = wrapped

    def batch(self, micro: int, epoch_cache: dict[int, list[list[int]]]) -> list[int]:
        """The example indices of micro-batch ``micro`` on this process."""
        global_index = micro * self.accelerator.num_processes + self.accelerator.process_index
        epoch, index = divmod(global_index, self.batches_per_epoch)
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = bucket_batches(self.examples, self.params.batch_size, self.params.repeats,
                                                self.params.seed, epoch, self.params.flip_aug)
        return epoch_cache[epoch][index]


def set_up(components: DiffusionComponents, examples: Sequence[Example], params: TrainingParams, cache: DiskCache,
           dataset_hash: str, keep_tokens: int = 0, init_state: dict[str, torch.Tensor] | None = None) -> TrainingRun:
    """The run before its first step: accelerator, LoRA injection (from ``init_state`` when given), the run's
    signature, cached latents and text embeddings, modules on the device in their dtype, optimizer, schedule."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params

    family = components.family
    check_training_set(examples, params)
    family.check_clip_skip(params.clip_skip)
    components.clip_skip = params.clip_skip
    accelerator = make_accelerator(params.device, params.mixed_precision, params.gradient_accumulation_steps,
                                   params.allow_tf32, params.gpu, setting="training.mixed_precision")
    device = accelerator.device
    dtype = DTYPES[params.mixed_precision]
    spec = lora_spec(params, family)
    trained_te = [name for name in family.text_encoders if spec.trains(name)]

    quantization = quantize_base(components, params, device)
    base_id = module_fingerprint(components.denoiser)[:16]  # before injection: the base weights alone
    torch.manual_seed(params.seed)  # PEFT draws lora_A's initial values from the global RNG
    inject_lora(components, spec)
    if init_state is not None:
        load_lora_state(components, init_state, f"init_lora {params.init_lora}")
    signature = run_signature(base_id, dataset_hash, spec,
                              {k: getattr(params, k) for k in (*SIGNATURE_SETTINGS, *SIGNATURE_ADDED_LATER)},
                              SIGNATURE_ADDED_LATER)

    family.check_precision(params.mixed_precision)  # the VAE keeps its own dtype in any case
    if params.cache_latents:
        latent_keys, latents_encoded = encode_latents(components, examples, cache, device, flip=params.flip_aug)
        components.vae.to("cpu")
    else:
        latent_keys, latents_encoded = {}, 0
        components.vae.to(device)
    text_cache = TextEncoderCache(components, cache, device) if params.cache_latents and not trained_te else None
    for encoder in components.text_encoders:
        encoder.to(device, dtype=dtype)
    if text_cache is not None and not params.shuffle_tags:
        # Every text a step can ask for is known now (each caption whole, or "" when dropped): encode them all and
        # keep the frozen encoders off the device during the loop (Flux's T5-XXL alone is 9.5 GB), as kohya's
        # cache_text_encoder_outputs does. With shuffle_tags the texts are new every epoch: they stay.
        text_cache.fill([ex.text for ex in examples] + ([""] if params.caption_dropout else []))
        for encoder in components.text_encoders:
            encoder.to("cpu")

    if quantization == "none":
        components.denoiser.to(device, dtype=dtype)
    else:  # quantized weights keep their storage; the rest is in bf16 already (= the mixed-precision dtype)
        components.denoiser.to(device)
    models = [components.denoiser] + [components.component(name) for name in trained_te]
    cast_training_params(models, dtype=torch.float32)  # LoRA weights train in fp32 under mixed precision
    # with a quantized base, on unless the run says gradient_checkpointing: false
    if params.gradient_checkpointing or (quantization != "none" and "gradient_checkpointing" not in
                                         params.model_fields_set):
        for model in models:
            enable_activation_checkpointing(model)
    elif quantization != "none":
        logger.warning("training.base_quantization is %s with gradient_checkpointing: false: the quantized weights "
                       "save memory, but a large transformer's activations (Flux.1 at 1024 px) rarely fit a 16-24 GB "
                       "card without checkpointing. Set gradient_checkpointing: true if the step runs out of memory.",
                       quantization)

    groups = [{"params": [p for p in components.denoiser.parameters() if p.requires_grad],
               "lr": params.learning_rate}]
    for name in trained_te:
        groups.append({"params": [p for p in components.component(name).parameters() if p.requires_grad],
                       "lr": params.text_encoder_lr})
    optimizer = make_optimizer(params.optimizer, groups, params.optimizer_args)

    batches_per_epoch = len(bucket_batches(examples, params.batch_size, params.repeats, params.seed, 0))
    micro_per_process = max(1, batches_per_epoch // accelerator.num_processes)
    steps_per_epoch = max(1, micro_per_process // params.gradient_accumulation_steps)
    total_steps = params.max_steps or params.epochs * steps_per_epoch
    scheduler = get_scheduler(params.lr_scheduler, optimizer, num_warmup_steps=params.lr_warmup_steps,
                              num_training_steps=total_steps, num_cycles=params.lr_scheduler_num_cycles)
    objective = family.objective(components.scheduler, noise_offset=params.noise_offset,
                                 min_snr_gamma=params.min_snr_gamma, timestep_sampling=params.timestep_sampling,
                                 discrete_flow_shift=params.discrete_flow_shift, sigmoid_scale=params.sigmoid_scale)
    return TrainingRun(components, examples, params, cache, keep_tokens, accelerator, dtype, spec, trained_te,
                       signature, latent_keys, latents_encoded, text_cache, objective, models, optimizer, scheduler,
                       batches_per_epoch, steps_per_epoch, total_steps)


def quantize_base(components: DiffusionComponents, params: TrainingParams, device: torch.device) -> str:
    """``training.base_quantization`` on the frozen denoiser, before the fingerprint and PEFT (which must see the
    quantized layers to wrap them): done here unless the loader (or the caller) did it. Returns how the denoiser
    is quantized ("none", "nf4", "float8"); a quantized base trains under mixed_precision: bf16 only."""
    method = params.base_quantization
    done = quantized_with(components.denoiser)
    if method != "none" and done == "none":
        check_base_quantization(method, params.device, params.mixed_precision)
        quantize_denoiser(components.denoiser, method, device)
        done = method
    elif method != "none" and done != method:
        raise ConfigError(f"training.base_quantization is {method}, but the base was loaded quantized with {done}; "
                          f"load it with base_quantization={method!r} (or without any).")
    if done != "none" and params.mixed_precision != "bf16":
        raise ConfigError(f"training.mixed_precision: a base quantized with {done} computes in bf16, and "
                          f"mixed_precision is {params.mixed_precision}. Set mixed_precision: bf16.")
    return done


def trainer_core(run: TrainingRun, on_metrics: Callable[[dict[str, float], int], None] | None) -> TrainerCore:
    params = run.params
    return TrainerCore(
        accelerator=run.accelerator, seed=params.seed, subject=params.output_name,
        subject_folder=Path(params.checkpoint_dir) / params.output_name,
        signature=run.signature, total_steps=run.total_steps, save_steps=params.save_steps,
        save_every_steps=params.save_every_n_epochs * run.steps_per_epoch,
        keep_checkpoints=params.keep_checkpoints, log_every_steps=params.log_every_steps,
        advice="mixed_precision: bf16 instead of fp16, a lower learning_rate, or an fp32 VAE",
        desc=f"training {params.output_name}", unit="img", lora_state=lambda: lora_state_dict(run.components),
        on_metrics=on_metrics)


def step_data(run: TrainingRun, start_step: int) -> tuple[list[list[int]], Iterator[dict[str, torch.Tensor]]]:
    """The micro-batches from ``start_step`` to the end (example indices; which ones depends on seed and epoch
    only, so a resumed run sees the same) and the loader that reads their cached latents or pixels."""
    ga = run.params.gradient_accumulation_steps
    epoch_cache: dict[int, list[list[int]]] = {}
    micro_batches = [run.batch(micro, epoch_cache) for micro in range(start_step * ga, run.total_steps * ga)]
    workers = data_workers(run.params.data_workers, run.device)
    loader = iter(torch.utils.data.DataLoader(
        StepInputs(run.examples, run.cache, run.latent_keys), batch_sampler=micro_batches, num_workers=workers,
        pin_memory=run.device.type == "cuda", prefetch_factor=2 if workers else None))
    return micro_batches, loader


def conditioning(run: TrainingRun, texts: Sequence[str]) -> Conditioning:
    """The prompts' conditioning: from the text cache, from frozen encoders, or through the trained ones."""
    if run.text_cache is not None:
        return run.text_cache(texts)
    if not run.trained_te:
        with torch.no_grad():
            return run.components.encode_prompt(texts, run.device)
    return run.components.encode_prompt(texts, run.device, run.encoders)


def loss_step(run: TrainingRun, inputs: dict[str, torch.Tensor], indices: Sequence[int], generator: torch.Generator,
              rng: random.Random) -> torch.Tensor:
    """One micro-batch's loss: latents (cached, or VAE-encoded now), the family's objective (noise, timesteps,
    input, target, weight), captions augmented, the denoiser's prediction, prior-preservation weights.

    Every random draw comes from ``generator`` (noise) and ``rng`` (captions), in a fixed order."""
    family, params, device = run.family, run.params, run.device
    if params.cache_latents:
        mean, std = inputs["mean"], inputs["std"]
    else:  # the textbook loop: VAE-encode the batch every step
        with torch.no_grad():
            vae = run.components.vae
            mean, std = latent_stats(vae, inputs["pixels"].to(device, vae.dtype, non_blocking=True), device)
            mean, std = mean.float().cpu(), std.float().cpu()
    latents = family.sample_latents(mean, std, generator, run.components.vae)
    noise, timesteps = run.objective.draw(latents.shape, generator)
    chosen = [run.examples[i % len(run.examples)] for i in indices]
    texts = [prepare_caption(ex.text, rng, params.caption_dropout, params.shuffle_tags, run.keep_tokens)
             for ex in chosen]
    batch = run.objective.noised(latents.to(device, non_blocking=True), noise.to(device, non_blocking=True),
                                 timesteps.to(device, non_blocking=True))
    with run.accelerator.autocast():
        cond = conditioning(run, texts)
        pred = family.predict(run.denoiser, batch, cond, family.micro_conditioning(chosen, device), run.dtype)
    loss = run.objective.per_sample_loss(pred, batch)
    if any(ex.is_reg for ex in chosen):  # DreamBooth prior preservation, as kohya weights it
        loss = loss * torch.tensor([params.prior_loss_weight if ex.is_reg else 1.0 for ex in chosen],
                                   device=loss.device)
    return loss.mean()


def train(
    components: DiffusionComponents,
    examples: Sequence[Example],
    params: TrainingParams,
    cache: DiskCache,
    *,
    dataset_hash: str,
    keep_tokens: int = 0,
    init_state: dict[str, torch.Tensor] | None = None,
    on_metrics: Callable[[dict[str, float], int], None] | None = None,
    on_samples: Callable[[list[Any], int], None] | None = None,
    step_callback: StepCallback | None = None,
) -> TrainResult:
    """Train a LoRA on ``examples``. Resumable, deterministic on CPU, accelerate-aware (1 CPU, 1 or N GPUs)."""
    run = set_up(components, examples, params, cache, dataset_hash, keep_tokens, init_state)
    core = trainer_core(run, on_metrics)
    with core.locked():  # one run per subject; checkpoints are read and written under the lock
        restored = core.resume(params.resume, run.optimizer, run.scheduler)
        if restored is not None:
            load_lora_state(components, restored, f"checkpoint {core.resumed_from}")
        run.prepare()
        micro_batches, loader = step_data(run, core.start_step)
        sample_error = loop(run, core, micro_batches, loader, on_samples, step_callback)
        images_per_second = core.finish(run.optimizer, run.scheduler)  # the final checkpoint is on disk from here
        samples: list[Any] = []
        if params.sample_prompts and run.accelerator.is_main_process and sample_error is None:
            samples, sample_error = samples_or_error(components, params, run.total_steps)
        if on_samples and samples:
            on_samples(samples, run.total_steps)
        return TrainResult(
            lora_state=lora_state_dict(components), spec=run.spec, losses=core.losses.values, steps=run.total_steps,
            epochs_done=run.total_steps * params.gradient_accumulation_steps / run.batches_per_epoch,
            images_per_second=images_per_second, peak_memory_mb=peak_memory_mb(run.device),
            samples=samples, resumed_from=core.resumed_from, latents_encoded=run.latents_encoded,
            optimizer=_class_path(getattr(run.optimizer, "optimizer", run.optimizer)),  # inside accelerate's wrapper
            sample_error=sample_error,
        )


def loop(run: TrainingRun, core: TrainerCore, micro_batches: list[list[int]],
         loader: Iterator[dict[str, torch.Tensor]], on_samples: Callable[[list[Any], int], None] | None,
         step_callback: StepCallback | None) -> str | None:
    """The optimizer steps from ``core.start_step`` on, with samples and callbacks between them; returns why
    sample images failed, if they did."""
    params = run.params
    ga, start_step = params.gradient_accumulation_steps, core.start_step
    trainable = [p for g in run.optimizer.param_groups for p in g["params"]]
    for model in run.models:
        model.train()
    core.start()
    sample_error = None
    for step in range(start_step, run.total_steps):
        step_loss = torch.zeros((), device=run.device)
        seen = 0
        for accum in range(ga):
            micro = step * ga + accum
            generator, rng = core.micro_seeds(micro)
            indices = micro_batches[micro - start_step * ga]
            inputs = next(loader)
            with run.accelerator.accumulate(*run.models):
                loss = loss_step(run, inputs, indices, generator, rng)
                optimizer_step(run.accelerator, loss, trainable, run.optimizer, run.scheduler, params.max_grad_norm)
            step_loss += loss.detach() / ga
            seen += len(indices)
        core.end_step(step, step_loss, seen, run.optimizer, run.scheduler)
        done = step + 1
        if (on_samples and params.sample_prompts and params.sample_every_steps and sample_error is None
                and done % params.sample_every_steps == 0):
            images, sample_error = samples_or_error(run.components, params, done)
            if images:
                on_samples(images, done)
        if step_callback is not None:
            step_callback(done, run.components)
    return sample_error


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__name__}"


def samples_or_error(components: DiffusionComponents, params: TrainingParams,
                     step: int) -> tuple[list[Any], str | None]:
    """Sample images, or none and the reason: a failure while sampling must never cost the trained LoRA."""
    try:
        return render_samples(components, params), None
    except Exception as exc:  # whatever broke: the weights are worth more than the pictures
        reason = f"{type(exc).__name__}: {exc}"
        logger.error("Sample images at step %d failed (%s). The LoRA itself is complete: it is checkpointed and "
                     "exported as usual, without samples. Next: render it with the generation pipeline "
                     "(kedro run --pipelines generation); if that fails too, report this error with the "
                     "traceback below. training.sample_prompts: [] skips samples.", step, reason, exc_info=True)
        return [], reason


@torch.no_grad()
def render_samples(components: DiffusionComponents, params: TrainingParams) -> list[Any]:
    """Sample images with the LoRA as it is now (fixed seeds, so samples across steps are comparable).

    The denoiser and text encoders sample in the dtype they train in; the VAE decodes in its own (fp32 under
    fp16/bf16 training)."""
    family, denoiser = components.family, _unwrap(components.denoiser)
    pipe = components.pipeline(**{family.denoiser: denoiser}, **{name: _unwrap(te) for name, te in
                                                                 zip(family.text_encoders, components.text_encoders)})
    pipe.set_progress_bar_config(disable=True)
    device = next(denoiser.parameters()).device
    # the VAE is on the GPU already when latents are not cached; frozen text encoders are off it once their
    # outputs are cached: each comes for the samples and goes back
    parked = [(module, next(module.parameters()).device) for module in (pipe.vae, *components.text_encoders)]
    was_training = denoiser.training
    for module, _ in parked:
        module.to(device)
    denoiser.eval()
    size = params.sample_size
    images = []
    try:
        with vae_decodes_in_own_dtype(pipe.vae):
            for index, prompt in enumerate(tqdm(params.sample_prompts, desc="samples", unit="img", leave=False)):
                generator = torch.Generator().manual_seed(params.seed + index)
                images.extend(pipe(**family.prompt_kwargs(pipe, prompt, None, components.clip_skip),
                                   num_inference_steps=params.sample_inference_steps, generator=generator,
                                   height=size, width=size).images)
    finally:  # also after a failure: training may go on
        for module, home in parked:
            module.to(home)
        denoiser.train(was_training)
    return images


@torch.no_grad()
def denoising_loss(components: DiffusionComponents, examples: Sequence[Example], cache: DiskCache,
                   latent_keys: dict[str, str], seed: int = 0,
                   timesteps: Sequence[int] = (100, 300, 500, 700, 900)) -> float:
    """Mean denoising MSE at fixed timesteps, noise and latents: a reproducible quality figure.

    Lower is better; comparing base vs base+LoRA on held-out images shows what the LoRA learned. The family's
    objective (without noise offset or loss weights) says what the denoiser gets and must predict.
    """
    family, denoiser = components.family, _unwrap(components.denoiser)
    device = next(denoiser.parameters()).device
    objective = family.objective(components.scheduler)
    total, count = 0.0, 0
    for index, ex in enumerate(tqdm(examples, desc="denoising loss", unit="img", leave=False)):
        stats = cache.get_tensors(latent_keys[ex.sha256])
        cond = components.encode_prompt([ex.text], device)
        micro = family.micro_conditioning([ex], device)
        for t in timesteps:
            generator = torch.Generator().manual_seed(derive_seed(seed, index, t))
            latents = family.sample_latents(stats["mean"], stats["std"], generator, components.vae)
            latents = latents.unsqueeze(0).to(device)
            noise = objective.noise(latents.shape, generator).to(device)
            batch = objective.noised(latents, noise, torch.tensor([t], device=device))
            pred = family.predict(denoiser, batch, cond, micro, denoiser.dtype)
            total += F.mse_loss(pred.float(), batch.target.float()).item()
            count += 1
    return total / max(count, 1)
