"""The LoRA training loop for SD1.x and SDXL: PEFT injection, cached latents and text embeddings, aspect
buckets, SDXL size conditioning, checkpoints, exact resume.

Plain Python (no Kedro): call :func:`train` from a notebook, a Kedro node, or under ``accelerate launch``.
The bookkeeping shared with the LLM loop (accelerate, seeds, resume, loss read-back, checkpoints) lives in
:mod:`lora_pipeline.core.trainer`; what differs between families (prompt encoding, names) in :mod:`families`.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lora_pipeline.core.cache import DiskCache, settings_key
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
from lora_pipeline.diffusion.families import Conditioning, ModelFamily
from lora_pipeline.diffusion.generation import vae_decodes_in_own_dtype
from lora_pipeline.diffusion.loading import DiffusionComponents, module_fingerprint
from lora_pipeline.prep.concepts import epoch_items
from lora_pipeline.prep.images import load_rgb

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One training image: its file, caption, bucket size and content hash; for SDXL's size conditioning also
    the size it had before resizing and where the center crop started (defaults: the bucket, no crop)."""

    path: Path
    text: str
    width: int
    height: int
    sha256: str
    original_size: tuple[int, int] | None = None  # (width, height)
    crop_top_left: tuple[int, int] = (0, 0)  # (top, left), in SDXL's order
    repeats: int = 1  # kohya's N of an N_concept folder
    is_reg: bool = False  # a regularization (class) image: its loss is weighted by prior_loss_weight

    def time_ids(self) -> list[int]:
        """SDXL ``add_time_ids``: original (h, w), crop (top, left), target (h, w)."""
        width, height = self.original_size or (self.width, self.height)
        return [height, width, *self.crop_top_left, self.height, self.width]


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
    """The LoRA this run trains: the UNet, plus every text encoder of the family when asked."""
    targets: dict[str, list[str] | str] = {"unet": list(params.unet_targets)}
    if params.train_text_encoder:
        targets.update({name: list(params.text_encoder_targets) for name in family.text_encoders})
    return LoraSpec(family=family.name, rank=params.lora_rank, alpha=params.alpha, dropout=params.dropout,
                    targets=targets)


def inject_lora(components: DiffusionComponents, spec: LoraSpec) -> None:
    """Add LoRA adapters (PEFT) to each component the spec names; freeze everything else."""
    for module in [components.unet, components.vae, *components.text_encoders]:
        module.requires_grad_(False)
    for component in spec.components:
        try:
            components.component(component).add_adapter(spec.peft_config(component))
        except ValueError as exc:
            raise LoraPipelineError(
                f"LoRA targets matched no layer of the {component} ({exc}). Check training.unet_targets / "
                f"text_encoder_targets; the kohya defaults are to_q, to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2, "
                f"proj_in, proj_out (UNet) and q_proj, k_proj, v_proj, out_proj, fc1, fc2 (text encoders).") from None


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


# ----------------------------------------------------------------------------- caching

FLIPPED = ":flip"  # suffix of a mirrored image's key in the latent-key map


def encode_latents(components: DiffusionComponents, examples: Sequence[Example], cache: DiskCache, device: torch.device,
                   batch_size: int = 8, flip: bool = False) -> tuple[dict[str, str], int]:
    """Encode every image's VAE latent distribution once; returns ({sha256: cache key}, number encoded).

    Keys are image hash + VAE fingerprint, so a retrain on the same base model re-encodes only new images,
    and a changed image or another VAE can never hit a stale entry. With ``flip`` (kohya's flip_aug) the
    mirrored image is encoded and cached too (``sha256 + ":flip"``): a mirrored latent is not the mirror
    of the latent, so flipping cached latents would train on something the VAE never produced.
    """
    vae_id = module_fingerprint(components.vae)
    todo = [(ex, False) for ex in examples] + ([(ex, True) for ex in examples] if flip else [])
    keys = {}
    for ex, flipped in todo:
        keys[ex.sha256 + (FLIPPED if flipped else "")] = f"latent-{ex.sha256[:32]}{'-flip' if flipped else ''}-{vae_id}"
    missing = [(ex, flipped) for ex, flipped in dict.fromkeys(todo)
               if not cache.has(keys[ex.sha256 + (FLIPPED if flipped else "")], ".safetensors")]
    if missing:
        components.vae.to(device)
        groups: dict[tuple[int, int], list[tuple[Example, bool]]] = {}
        for ex, flipped in missing:
            groups.setdefault((ex.width, ex.height), []).append((ex, flipped))
        with tqdm(total=len(missing), desc="encoding latents", unit="img") as bar, torch.inference_mode():
            for group in groups.values():
                for start in range(0, len(group), batch_size):
                    chunk = group[start:start + batch_size]
                    pixels = torch.stack([_to_tensor(load_rgb(ex.path), flipped) for ex, flipped in chunk])
                    dist = components.vae.encode(pixels.to(device, components.vae.dtype)).latent_dist
                    for (ex, flipped), mean, std in zip(chunk, dist.mean, dist.std):
                        cache.put_tensors(keys[ex.sha256 + (FLIPPED if flipped else "")],
                                          {"mean": mean.float(), "std": std.float()})
                    bar.update(len(chunk))
    logger.info("Latents: %d cached, %d new", len(keys) - len(missing), len(missing))
    return keys, len(missing)


def _to_tensor(image, flipped: bool = False) -> torch.Tensor:
    import numpy as np

    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    if flipped:
        array = array.flip(-1)
    return array / 127.5 - 1.0


class TextEncoderCache:
    """Frozen-text-encoder conditioning by exact prompt text (both SDXL encoders and the pooled embedding),
    in memory and on disk."""

    def __init__(self, components: DiffusionComponents, cache: DiskCache, device: torch.device):
        self.components, self.cache, self.device = components, cache, device
        identity: dict[str, Any] = {"te": [module_fingerprint(te) for te in components.text_encoders]}
        if components.clip_skip > 1:
            identity["clip_skip"] = components.clip_skip
        self.te_id = settings_key(identity)
        self.memory: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, texts: Sequence[str]) -> Conditioning:
        for text in dict.fromkeys(texts):
            if text in self.memory:
                continue
            key = f"text-{settings_key({'t': text})}-{self.te_id}"
            hit = self.cache.get_tensors(key)
            if hit is None:
                with torch.inference_mode():
                    cond = self.components.encode_prompt([text], self.device)
                hit = {"hidden": cond.hidden[0].float().cpu()}
                if cond.pooled is not None:
                    hit["pooled"] = cond.pooled[0].float().cpu()
                self.cache.put_tensors(key, hit)
            self.memory[text] = hit
        hidden = torch.stack([self.memory[t]["hidden"] for t in texts]).to(self.device)
        pooled = None
        if "pooled" in self.memory[texts[0]]:
            pooled = torch.stack([self.memory[t]["pooled"] for t in texts]).to(self.device)
        return Conditioning(hidden, pooled)


def time_ids_for(components: DiffusionComponents, examples: Sequence[Example],
                 device: torch.device) -> torch.Tensor | None:
    if not components.family.uses_time_ids():
        return None
    return torch.tensor([ex.time_ids() for ex in examples], dtype=torch.float32, device=device)


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
            return {"pixels": _to_tensor(load_rgb(example.path), bool(flipped))}
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
                         "optimizer_args": {}, "lr_scheduler_num_cycles": 1}


StepCallback = Callable[[int, DiffusionComponents], None]


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
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params, compute_snr

    if not examples:
        raise LoraPipelineError("No training images. Run the normalization pipeline first.")
    if not any(not ex.is_reg for ex in examples):
        raise LoraPipelineError("Only regularization images and no training images. Put your subject's images in "
                                "the subject's images folder (kohya: train_data_dir), the class images in reg/.")
    places = sum(ex.repeats for ex in examples if not ex.is_reg) * params.repeats
    if params.batch_size > places:
        raise ConfigError(f"training.batch_size ({params.batch_size}) is larger than the training set "
                          f"({places} images x repeats); lower batch_size or raise repeats.")
    components.family.check_clip_skip(params.clip_skip)
    components.clip_skip = params.clip_skip
    accelerator = make_accelerator(params.device, params.mixed_precision, params.gradient_accumulation_steps,
                                   params.allow_tf32, params.gpu, setting="training.mixed_precision")
    device = accelerator.device
    dtype = DTYPES[params.mixed_precision]
    spec = lora_spec(params, components.family)
    trained_te = [name for name in components.family.text_encoders if spec.trains(name)]

    base_id = module_fingerprint(components.unet)[:16]  # before injection: the base weights alone
    torch.manual_seed(params.seed)  # PEFT draws lora_A's initial values from the global RNG
    inject_lora(components, spec)
    if init_state is not None:
        load_lora_state(components, init_state, f"init_lora {params.init_lora}")
    signature = run_signature(base_id, dataset_hash, spec,
                              {k: getattr(params, k) for k in (*SIGNATURE_SETTINGS, *SIGNATURE_ADDED_LATER)},
                              SIGNATURE_ADDED_LATER)

    if components.family.name == "sdxl" and params.mixed_precision == "fp16":
        # SDXL's original VAE overflows to NaN in fp16; it is kept in fp32 here (only the UNet and the text
        # encoders are cast), so latents stay finite. A fp16-fixed VAE saves memory if you need it.
        logger.warning("SDXL with fp16: the VAE stays fp32 (its fp16 version produces NaN latents); "
                       "bf16 is the safer choice for the UNet on GPUs that support it.")
    if params.cache_latents:
        latent_keys, latents_encoded = encode_latents(components, examples, cache, device, flip=params.flip_aug)
        components.vae.to("cpu")
    else:
        latent_keys, latents_encoded = {}, 0
        components.vae.to(device)
    scaling = components.vae.config.scaling_factor
    text_cache = TextEncoderCache(components, cache, device) if params.cache_latents and not trained_te else None

    components.unet.to(device, dtype=dtype)
    for encoder in components.text_encoders:
        encoder.to(device, dtype=dtype)
    models = [components.unet] + [components.component(name) for name in trained_te]
    cast_training_params(models, dtype=torch.float32)  # LoRA weights train in fp32 under mixed precision
    if params.gradient_checkpointing:
        for model in models:
            enable_activation_checkpointing(model)

    groups = [{"params": [p for p in components.unet.parameters() if p.requires_grad], "lr": params.learning_rate}]
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

    core = TrainerCore(
        accelerator=accelerator, seed=params.seed, subject=params.output_name,
        subject_folder=Path(params.checkpoint_dir) / params.output_name,
        signature=signature, total_steps=total_steps, save_steps=params.save_steps,
        save_every_steps=params.save_every_n_epochs * steps_per_epoch,
        keep_checkpoints=params.keep_checkpoints, log_every_steps=params.log_every_steps,
        advice="mixed_precision: bf16 instead of fp16, a lower learning_rate, or an fp32 VAE",
        desc=f"training {params.output_name}", unit="img", lora_state=lambda: lora_state_dict(components),
        on_metrics=on_metrics)
    with core.locked():  # one run per subject; checkpoints are read and written under the lock
        restored = core.resume(params.resume, optimizer, scheduler)
        if restored is not None:
            load_lora_state(components, restored, f"checkpoint {core.resumed_from}")
        start_step = core.start_step

        prepared = accelerator.prepare(*models, optimizer, scheduler)
        unet = prepared[0]
        encoders = list(components.text_encoders)
        for name, wrapped in zip(trained_te, prepared[1:1 + len(trained_te)]):
            encoders[components.family.text_encoders.index(name)] = wrapped
        trained_modules = [unet] + [encoders[components.family.text_encoders.index(n)] for n in trained_te]
        optimizer, scheduler = prepared[-2], prepared[-1]
        trainable = [p for g in optimizer.param_groups for p in g["params"]]

        noise_scheduler = components.scheduler
        prediction_type = noise_scheduler.config.prediction_type
        epoch_cache: dict[int, list[list[int]]] = {}

        def batch_for(micro: int) -> list[int]:
            global_index = micro * accelerator.num_processes + accelerator.process_index
            epoch, index = divmod(global_index, batches_per_epoch)
            if epoch not in epoch_cache:
                epoch_cache.clear()
                epoch_cache[epoch] = bucket_batches(examples, params.batch_size, params.repeats, params.seed, epoch,
                                                    params.flip_aug)
            return epoch_cache[epoch][index]

        ga = params.gradient_accumulation_steps
        micro_batches = [batch_for(micro) for micro in range(start_step * ga, total_steps * ga)]
        workers = data_workers(params.data_workers, device)
        loader = iter(torch.utils.data.DataLoader(
            StepInputs(examples, cache, latent_keys), batch_sampler=micro_batches, num_workers=workers,
            pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None))

        unet.train()
        for name in trained_te:
            encoders[components.family.text_encoders.index(name)].train()
        core.start()
        sample_error = None
        for step in range(start_step, total_steps):
            step_loss = torch.zeros((), device=device)
            seen = 0
            for accum in range(ga):
                micro = step * ga + accum
                generator, rng = core.micro_seeds(micro)
                indices = micro_batches[micro - start_step * ga]
                inputs = next(loader)
                with accelerator.accumulate(*trained_modules):
                    if params.cache_latents:
                        mean, std = inputs["mean"], inputs["std"]
                    else:  # the textbook loop: VAE-encode the batch every step
                        with torch.no_grad():
                            pixels = inputs["pixels"].to(device, components.vae.dtype, non_blocking=True)
                            dist = components.vae.encode(pixels).latent_dist
                            mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
                    latents = (mean + std * torch.randn(mean.shape, generator=generator)) * scaling
                    noise = torch.randn(latents.shape, generator=generator)
                    if params.noise_offset:
                        noise = noise + params.noise_offset * torch.randn(
                            (latents.shape[0], latents.shape[1], 1, 1), generator=generator)
                    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                              generator=generator)
                    chosen = [examples[i % len(examples)] for i in indices]
                    texts = [prepare_caption(ex.text, rng, params.caption_dropout, params.shuffle_tags,
                                             keep_tokens) for ex in chosen]
                    latents = latents.to(device, non_blocking=True)
                    noise = noise.to(device, non_blocking=True)
                    timesteps = timesteps.to(device, non_blocking=True)
                    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                    with accelerator.autocast():
                        if text_cache is not None:
                            cond = text_cache(texts)
                        elif not trained_te:
                            with torch.no_grad():
                                cond = components.encode_prompt(texts, device)
                        else:
                            cond = components.encode_prompt(texts, device, encoders)
                        hidden = cond.hidden.to(dtype)
                        if cond.pooled is not None:
                            cond = Conditioning(hidden, cond.pooled.to(dtype))
                        time_ids = time_ids_for(components, chosen, device)
                        pred = unet(noisy.to(dtype), timesteps, hidden,
                                    **cond.unet_kwargs(time_ids.to(dtype) if time_ids is not None else None)).sample
                    target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(
                        latents, noise, timesteps)
                    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                    if params.min_snr_gamma:
                        snr = compute_snr(noise_scheduler, timesteps)
                        weight = snr.clamp(max=params.min_snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1)
                        loss = loss * weight
                    if any(ex.is_reg for ex in chosen):  # DreamBooth prior preservation, as kohya weights it
                        loss = loss * torch.tensor([params.prior_loss_weight if ex.is_reg else 1.0 for ex in chosen],
                                                   device=loss.device)
                    loss = loss.mean()
                    optimizer_step(accelerator, loss, trainable, optimizer, scheduler, params.max_grad_norm)
                step_loss += loss.detach() / ga
                seen += len(indices)
            core.end_step(step, step_loss, seen, optimizer, scheduler)
            done = step + 1
            if (on_samples and params.sample_prompts and params.sample_every_steps and sample_error is None
                    and done % params.sample_every_steps == 0):
                images, sample_error = samples_or_error(components, params, done)
                if images:
                    on_samples(images, done)
            if step_callback is not None:
                step_callback(done, components)
        images_per_second = core.finish(optimizer, scheduler)  # the final checkpoint is on disk from here on
        samples: list[Any] = []
        if params.sample_prompts and accelerator.is_main_process and sample_error is None:
            samples, sample_error = samples_or_error(components, params, total_steps)
        if on_samples and samples:
            on_samples(samples, total_steps)
        return TrainResult(
            lora_state=lora_state_dict(components), spec=spec, losses=core.losses.values, steps=total_steps,
            epochs_done=total_steps * params.gradient_accumulation_steps / batches_per_epoch,
            images_per_second=images_per_second, peak_memory_mb=peak_memory_mb(device),
            samples=samples, resumed_from=core.resumed_from, latents_encoded=latents_encoded,
            optimizer=_class_path(getattr(optimizer, "optimizer", optimizer)),  # inside accelerate's wrapper
            sample_error=sample_error,
        )


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

    The UNet and text encoders sample in the dtype they train in; the VAE decodes in its own (fp32 under
    fp16/bf16 training)."""
    pipe = components.pipeline(unet=_unwrap(components.unet), **{name: _unwrap(te) for name, te in
                                                  zip(components.family.text_encoders, components.text_encoders)})
    pipe.set_progress_bar_config(disable=True)
    device = next(_unwrap(components.unet).parameters()).device
    vae_device = next(pipe.vae.parameters()).device  # on the GPU already when latents are not cached
    was_training = _unwrap(components.unet).training
    pipe.vae.to(device)
    _unwrap(components.unet).eval()
    size = params.sample_size
    images = []
    try:
        with vae_decodes_in_own_dtype(pipe.vae):
            for index, prompt in enumerate(tqdm(params.sample_prompts, desc="samples", unit="img", leave=False)):
                generator = torch.Generator().manual_seed(params.seed + index)
                images.extend(pipe(**components.family.prompt_kwargs(pipe, prompt, None, components.clip_skip),
                                   num_inference_steps=params.sample_inference_steps, generator=generator,
                                   height=size, width=size).images)
    finally:  # also after a failure: training may go on
        pipe.vae.to(vae_device)
        _unwrap(components.unet).train(was_training)
    return images


@torch.no_grad()
def denoising_loss(components: DiffusionComponents, examples: Sequence[Example], cache: DiskCache,
                   latent_keys: dict[str, str], seed: int = 0,
                   timesteps: Sequence[int] = (100, 300, 500, 700, 900)) -> float:
    """Mean denoising MSE at fixed timesteps, noise and latents: a reproducible quality figure.

    Lower is better; comparing base vs base+LoRA on held-out images shows what the LoRA learned.
    """
    unet = _unwrap(components.unet)
    device = next(unet.parameters()).device
    scaling, scheduler = components.vae.config.scaling_factor, components.scheduler
    total, count = 0.0, 0
    for index, ex in enumerate(tqdm(examples, desc="denoising loss", unit="img", leave=False)):
        stats = cache.get_tensors(latent_keys[ex.sha256])
        cond = components.encode_prompt([ex.text], device)
        time_ids = time_ids_for(components, [ex], device)
        for t in timesteps:
            generator = torch.Generator().manual_seed(derive_seed(seed, index, t))
            latents = (stats["mean"] + stats["std"] * torch.randn(stats["mean"].shape, generator=generator))
            latents = (latents * scaling).unsqueeze(0).to(device)
            noise = torch.randn(latents.shape, generator=generator).to(device)
            step = torch.tensor([t], device=device)
            noisy = scheduler.add_noise(latents, noise, step)
            pred = unet(noisy.to(unet.dtype), step, cond.hidden.to(unet.dtype), **cond.unet_kwargs(time_ids)).sample
            target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(
                latents, noise, step)
            total += F.mse_loss(pred.float(), target.float()).item()
            count += 1
    return total / max(count, 1)
