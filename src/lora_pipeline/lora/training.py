"""The LoRA training loop for SD1.x: PEFT injection, cached latents, aspect buckets, checkpoints, exact resume.

Plain Python (no Kedro): call :func:`train` from a notebook, a Kedro node, or under ``accelerate launch``.

Determinism: every micro-step draws its randomness (noise, timesteps, caption dropout/shuffle, LoRA dropout)
from generators seeded by ``(seed, micro_step)``. A resumed run therefore needs only the LoRA weights, the
optimizer and scheduler states and the step, and it continues bit-for-bit like an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import os
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lora_pipeline.config import TrainingParams
from lora_pipeline.errors import ConfigError, LoraPipelineError
from lora_pipeline.lora.cache import DiskCache, settings_key
from lora_pipeline.lora.checkpoints import choose_resume, list_checkpoints, load_checkpoint, save_checkpoint
from lora_pipeline.lora.images import load_rgb
from lora_pipeline.lora.sd import SDComponents, module_fingerprint

logger = logging.getLogger(__name__)

class NonFiniteLossError(LoraPipelineError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class Example:
    """One training image: its file, caption, bucket size and content hash."""

    path: Path
    text: str
    width: int
    height: int
    sha256: str


@dataclass
class TrainResult:
    lora_state: dict[str, torch.Tensor]
    losses: list[float]
    steps: int
    epochs_done: float
    images_per_second: float
    peak_memory_mb: float
    samples: list[Any] = field(default_factory=list)
    resumed_from: str | None = None
    latents_encoded: int = 0


# ----------------------------------------------------------------------------- LoRA injection

def lora_config(rank: int, alpha: float, dropout: float, targets: Sequence[str]):
    from peft import LoraConfig

    # Gaussian init for A, zeros for B (PEFT's default, same as kohya): step 0 equals the base model.
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                      init_lora_weights=True)


def inject_lora(sd: SDComponents, params: TrainingParams) -> None:
    """Add LoRA adapters (PEFT) to the UNet and optionally the text encoder; freeze everything else."""
    for module in (sd.unet, sd.vae, sd.text_encoder):
        module.requires_grad_(False)
    try:
        sd.unet.add_adapter(lora_config(params.lora_rank, params.alpha, params.dropout, params.unet_targets))
        if params.train_text_encoder:
            sd.text_encoder.add_adapter(
                lora_config(params.lora_rank, params.alpha, params.dropout, params.text_encoder_targets)
            )
    except ValueError as exc:
        raise LoraPipelineError(
            f"LoRA targets matched no layer ({exc}). Check training.unet_targets / text_encoder_targets; "
            f"the kohya defaults are to_q, to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2, proj_in, proj_out."
        ) from None


def lora_state_dict(sd: SDComponents) -> dict[str, torch.Tensor]:
    """The trainable LoRA weights with ``unet.`` / ``text_encoder.`` prefixes (diffusers' layout)."""
    from peft.utils import get_peft_model_state_dict

    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(_unwrap(sd.unet)).items()}
    if getattr(_unwrap(sd.text_encoder), "peft_config", None):
        state.update({f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(_unwrap(sd.text_encoder)).items()})
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}


def load_lora_state(sd: SDComponents, state: dict[str, torch.Tensor], what: str) -> None:
    """Put LoRA weights (training layout) into the injected adapters; every weight must find its layer."""
    from peft.utils import set_peft_model_state_dict

    for prefix, module in (("unet.", sd.unet), ("text_encoder.", sd.text_encoder)):
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not part:
            continue
        if not getattr(_unwrap(module), "peft_config", None):
            raise LoraPipelineError(f"{what} has text-encoder weights; set training.train_text_encoder: true.")
        own = get_shapes(module)
        for key, tensor in part.items():
            peft_key = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
                ".lora_B.weight", ".lora_B.default.weight")
            if peft_key not in own:
                raise LoraPipelineError(f"{what}: weight {prefix}{key} has no matching LoRA layer; "
                                        f"check training.unet_targets / text_encoder_targets.")
            if tuple(own[peft_key]) != tuple(tensor.shape):
                raise LoraPipelineError(f"{what}: {prefix}{key} has shape {tuple(tensor.shape)}, the adapter "
                                        f"{tuple(own[peft_key])}; set training.lora_rank to the file's rank.")
        result = set_peft_model_state_dict(_unwrap(module), part)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise LoraPipelineError(f"{what}: unexpected keys {unexpected[:3]}")


def get_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in _unwrap(module).named_parameters() if "lora_" in name}


def _unwrap(module: Any) -> Any:
    return getattr(module, "module", module)


# ----------------------------------------------------------------------------- caching

def encode_latents(sd: SDComponents, examples: Sequence[Example], cache: DiskCache, device: torch.device,
                   batch_size: int = 8) -> tuple[dict[str, str], int]:
    """Encode every image's VAE latent distribution once; returns ({sha256: cache key}, number encoded).

    Keys are image hash + VAE fingerprint, so a retrain on the same base model re-encodes only new images,
    and a changed image or another VAE can never hit a stale entry.
    """
    vae_id = module_fingerprint(sd.vae)
    keys = {ex.sha256: f"latent-{ex.sha256[:32]}-{vae_id}" for ex in examples}
    missing = [ex for ex in examples if not cache.has(keys[ex.sha256], ".safetensors")]
    if missing:
        sd.vae.to(device)
        groups: dict[tuple[int, int], list[Example]] = {}
        for ex in missing:
            groups.setdefault((ex.width, ex.height), []).append(ex)
        with tqdm(total=len(missing), desc="encoding latents", unit="img") as bar, torch.inference_mode():
            for group in groups.values():
                for start in range(0, len(group), batch_size):
                    chunk = group[start:start + batch_size]
                    pixels = torch.stack([_to_tensor(load_rgb(ex.path)) for ex in chunk]).to(device, sd.vae.dtype)
                    dist = sd.vae.encode(pixels).latent_dist
                    for ex, mean, std in zip(chunk, dist.mean, dist.std):
                        cache.put_tensors(keys[ex.sha256], {"mean": mean.float(), "std": std.float()})
                    bar.update(len(chunk))
    logger.info("Latents: %d cached, %d new", len(examples) - len(missing), len(missing))
    return keys, len(missing)


def _to_tensor(image) -> torch.Tensor:
    import numpy as np

    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return array / 127.5 - 1.0


class TextEncoderCache:
    """Frozen-text-encoder embeddings by exact prompt text, in memory and on disk."""

    def __init__(self, sd: SDComponents, cache: DiskCache, device: torch.device):
        self.sd, self.cache, self.device = sd, cache, device
        self.te_id = module_fingerprint(sd.text_encoder)
        self.memory: dict[str, torch.Tensor] = {}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        todo = [t for t in dict.fromkeys(texts) if t not in self.memory]
        for text in todo:
            key = f"text-{settings_key({'t': text})}-{self.te_id}"
            hit = self.cache.get_tensors(key)
            if hit is None:
                with torch.inference_mode():
                    hit = {"emb": encode_text(self.sd, [text], self.device)[0].float().cpu()}
                self.cache.put_tensors(key, hit)
            self.memory[text] = hit["emb"]
        for text in texts:
            out.append(self.memory[text])
        return torch.stack(out).to(self.device)


def encode_text(sd: SDComponents, texts: Sequence[str], device: torch.device) -> torch.Tensor:
    tok = sd.tokenizer(list(texts), padding="max_length", max_length=sd.tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    return sd.text_encoder(tok.input_ids.to(device))[0]


# ----------------------------------------------------------------------------- batches and captions

class StepInputs(torch.utils.data.Dataset):
    """One example's input to a training step: its cached latent statistics, or its pixels when latents are
    not cached (the textbook path: VAE-encode every step). Served by torch's DataLoader, so ``data_workers``
    processes read and decode the next batches while the current step computes."""

    def __init__(self, examples: Sequence[Example], cache: DiskCache, latent_keys: dict[str, str]):
        self.examples, self.cache, self.latent_keys = examples, cache, latent_keys

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        example = self.examples[index]
        if not self.latent_keys:
            return {"pixels": _to_tensor(load_rgb(example.path))}
        stats = self.cache.get_tensors(self.latent_keys[example.sha256])
        if stats is None:
            raise LoraPipelineError(f"The cached latents of {example.path} disappeared during training "
                                    f"(cache folder {self.cache.root}); run the training pipeline again.")
        return stats


def data_workers(requested: int | None, device: torch.device) -> int:
    """``None`` means: none on CPU (torch already uses every core for the step), up to 4 beside a GPU."""
    if requested is not None:
        return requested
    return 0 if device.type == "cpu" else min(4, max(1, (os.cpu_count() or 2) - 1))


def bucket_batches(examples: Sequence[Example], batch_size: int, repeats: int, seed: int, epoch: int
                   ) -> list[list[int]]:
    """This epoch's batches: each holds one bucket's images only; order depends on (seed, epoch) alone."""
    rng = random.Random(seed * 1_000_003 + epoch)
    groups: dict[tuple[int, int], list[int]] = {}
    for index, ex in enumerate(examples):
        groups.setdefault((ex.width, ex.height), []).extend([index] * repeats)
    batches = []
    for key in sorted(groups):
        members = groups[key][:]
        rng.shuffle(members)
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

def run_signature(params: TrainingParams, base_id: str, dataset_hash: str) -> dict[str, Any]:
    """What must match for a checkpoint to continue *this* run rather than silently start another."""
    keys = ("lora_rank", "alpha", "dropout", "unet_targets", "train_text_encoder", "text_encoder_targets",
            "batch_size", "gradient_accumulation_steps", "seed", "repeats", "learning_rate", "text_encoder_lr",
            "lr_scheduler", "lr_warmup_steps", "caption_dropout", "shuffle_tags", "noise_offset",
            "min_snr_gamma", "init_lora")
    return {"base_model": base_id, "dataset": dataset_hash, **{k: getattr(params, k) for k in keys}}



StepCallback = Callable[[int, SDComponents], None]


class LossLog:
    """Per-step losses, kept on the device and read back to the host in one sync per window.

    A per-step ``.item()`` makes the CPU wait for the GPU to drain its queue every step; reading back every
    ``log_every_steps`` keeps the queue full. A NaN/inf loss is caught at the read-back, and a read-back always
    precedes a checkpoint write, so every saved checkpoint is finite.
    """

    def __init__(self, checkpoint_folder: Path, advice: str):
        self.values: list[float] = []
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._folder, self._advice = checkpoint_folder, advice

    def add(self, step: int, loss: torch.Tensor) -> None:
        self._pending.append((step, loss.detach().float().reshape(())))

    def flush(self) -> list[float]:
        """The pending losses as floats (one host sync); raises :class:`NonFiniteLossError` on NaN/inf."""
        if not self._pending:
            return []
        read = torch.stack([loss for _, loss in self._pending]).cpu().tolist()
        for (step, _), value in zip(self._pending, read):
            if not math.isfinite(value):
                last = list_checkpoints(self._folder)
                raise NonFiniteLossError(
                    f"Loss became {value} at step {step}. Training stopped; the last good checkpoint is kept "
                    f"({last[-1] if last else 'none saved yet'}). Try {self._advice}, then resume: latest.")
        self._pending.clear()
        self.values.extend(read)
        return read


def train(
    sd: SDComponents,
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
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params, compute_snr

    if not examples:
        raise LoraPipelineError("No training images. Run the normalization pipeline first.")
    if params.batch_size > len(examples) * params.repeats:
        raise ConfigError(f"training.batch_size ({params.batch_size}) is larger than the training set "
                          f"({len(examples)} images x repeats {params.repeats}); lower batch_size or raise repeats.")
    cpu = params.device == "cpu" or (params.device == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(mixed_precision=params.mixed_precision, cpu=cpu,
                              gradient_accumulation_steps=params.gradient_accumulation_steps)
    device = accelerator.device
    if device.type == "cuda" and params.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True  # as diffusers' --allow_tf32: ~2x matmuls on Ampere+
        torch.backends.cudnn.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(params.mixed_precision, torch.float32)
    checkpoint_folder = Path(params.checkpoint_dir) / params.output_name

    base_id = module_fingerprint(sd.unet)[:16]  # before injection: the base weights alone
    torch.manual_seed(params.seed)  # PEFT draws lora_A's initial values from the global RNG
    inject_lora(sd, params)
    if init_state is not None:
        load_lora_state(sd, init_state, f"init_lora {params.init_lora}")
    signature = run_signature(params, base_id, dataset_hash)

    if params.cache_latents:
        latent_keys, latents_encoded = encode_latents(sd, examples, cache, device)
        sd.vae.to("cpu")
    else:
        latent_keys, latents_encoded = {}, 0
        sd.vae.to(device)
    scaling = sd.vae.config.scaling_factor
    use_text_cache = params.cache_latents and not params.train_text_encoder
    text_cache = TextEncoderCache(sd, cache, device) if use_text_cache else None

    sd.unet.to(device, dtype=weight_dtype)
    sd.text_encoder.to(device, dtype=weight_dtype)
    models = [sd.unet] + ([sd.text_encoder] if params.train_text_encoder else [])
    cast_training_params(models, dtype=torch.float32)  # LoRA weights train in fp32 under mixed precision
    if params.gradient_checkpointing:
        sd.unet.enable_gradient_checkpointing()
        if params.train_text_encoder:
            sd.text_encoder.gradient_checkpointing_enable()

    groups = [{"params": [p for p in sd.unet.parameters() if p.requires_grad], "lr": params.learning_rate}]
    if params.train_text_encoder:
        groups.append({"params": [p for p in sd.text_encoder.parameters() if p.requires_grad],
                       "lr": params.text_encoder_lr})
    optimizer = make_adamw(groups, eight_bit=params.optimizer == "adamw8bit")

    batches_per_epoch = len(bucket_batches(examples, params.batch_size, params.repeats, params.seed, 0))
    micro_per_process = max(1, batches_per_epoch // accelerator.num_processes)
    steps_per_epoch = max(1, micro_per_process // params.gradient_accumulation_steps)
    total_steps = params.max_steps or params.epochs * steps_per_epoch
    scheduler = get_scheduler(params.lr_scheduler, optimizer, num_warmup_steps=params.lr_warmup_steps,
                              num_training_steps=total_steps)

    start_step, resumed_from = 0, None
    checkpoint = choose_resume(params.resume, checkpoint_folder, signature, total_steps)
    if checkpoint is not None:
        restored, start_step = load_checkpoint(checkpoint, optimizer, scheduler)
        load_lora_state(sd, restored, f"checkpoint {checkpoint}")
        resumed_from = str(checkpoint)

    prepared = accelerator.prepare(*models, optimizer, scheduler)
    unet = prepared[0]
    text_encoder = prepared[1] if params.train_text_encoder else sd.text_encoder
    optimizer, scheduler = prepared[-2], prepared[-1]
    trainable = [p for g in optimizer.param_groups for p in g["params"]]

    noise_scheduler = sd.scheduler
    prediction_type = noise_scheduler.config.prediction_type
    epoch_cache: dict[int, list[list[int]]] = {}
    losses = LossLog(checkpoint_folder, "mixed_precision: bf16 instead of fp16, a lower learning_rate, or an fp32 VAE")
    images_seen, started = 0, time.perf_counter()
    bar = tqdm(total=total_steps, initial=start_step, desc=f"training {params.output_name}", unit="step",
               disable=not accelerator.is_local_main_process)

    def batch_for(micro: int) -> list[int]:
        global_index = micro * accelerator.num_processes + accelerator.process_index
        epoch, index = divmod(global_index, batches_per_epoch)
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = bucket_batches(examples, params.batch_size, params.repeats, params.seed, epoch)
        return epoch_cache[epoch][index]

    ga = params.gradient_accumulation_steps
    micro_batches = [batch_for(micro) for micro in range(start_step * ga, total_steps * ga)]
    workers = data_workers(params.data_workers, device)
    loader = iter(torch.utils.data.DataLoader(
        StepInputs(examples, cache, latent_keys), batch_sampler=micro_batches, num_workers=workers,
        pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None))

    unet.train()
    if params.train_text_encoder:
        text_encoder.train()
    for step in range(start_step, total_steps):
        step_loss = torch.zeros((), device=device)
        for accum in range(ga):
            micro = step * ga + accum
            generator = torch.Generator().manual_seed(params.seed * 1_000_003 + micro)
            seed_dropout(params.seed * 7_919 + micro, device)
            rng = random.Random(params.seed * 104_729 + micro)
            indices = micro_batches[micro - start_step * ga]
            inputs = next(loader)
            with accelerator.accumulate(*([unet, text_encoder] if params.train_text_encoder else [unet])):
                if params.cache_latents:
                    mean, std = inputs["mean"], inputs["std"]
                else:  # the textbook loop: VAE-encode the batch every step
                    with torch.no_grad():
                        pixels = inputs["pixels"].to(device, sd.vae.dtype, non_blocking=True)
                        dist = sd.vae.encode(pixels).latent_dist
                        mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
                latents = (mean + std * torch.randn(mean.shape, generator=generator)) * scaling
                noise = torch.randn(latents.shape, generator=generator)
                if params.noise_offset:
                    noise = noise + params.noise_offset * torch.randn(
                        (latents.shape[0], latents.shape[1], 1, 1), generator=generator)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                          generator=generator)
                texts = [prepare_caption(examples[i].text, rng, params.caption_dropout, params.shuffle_tags,
                                         keep_tokens) for i in indices]
                latents = latents.to(device, non_blocking=True)
                noise = noise.to(device, non_blocking=True)
                timesteps = timesteps.to(device, non_blocking=True)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                with accelerator.autocast():
                    if text_cache is not None:
                        hidden = text_cache(texts).to(weight_dtype)
                    elif not params.train_text_encoder:
                        with torch.no_grad():
                            hidden = encode_text(sd, texts, device).to(weight_dtype)
                    else:
                        hidden = encode_text(SDComponents(unet, sd.vae, text_encoder, sd.tokenizer,
                                                          noise_scheduler, sd.source), texts, device)
                    pred = unet(noisy.to(weight_dtype), timesteps, hidden).sample
                target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(
                    latents, noise, timesteps)
                loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                if params.min_snr_gamma:
                    snr = compute_snr(noise_scheduler, timesteps)
                    weight = snr.clamp(max=params.min_snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1)
                    loss = loss * weight
                loss = loss.mean()
                optimizer_step(accelerator, loss, trainable, optimizer, scheduler, params.max_grad_norm)
            step_loss += loss.detach() / ga
            images_seen += len(indices)
        losses.add(step, step_loss)
        done = step + 1
        if done == start_step + 1 and total_steps - start_step > 1:
            # Throughput is steady-state: the first step pays one-off costs (allocator warm-up, lazy init).
            images_seen, started = 0, time.perf_counter()
        bar.update(1)
        saving = bool(params.save_steps and done % params.save_steps == 0 and done < total_steps)
        if done % params.log_every_steps == 0 or done == total_steps or saving:
            window = losses.flush()  # the only host sync; before any checkpoint write
            elapsed = time.perf_counter() - started
            rate = images_seen / elapsed if elapsed and images_seen else 0.0
            lr = scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{window[-1]:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}", refresh=False)
            if on_metrics:
                on_metrics({"loss": sum(window) / len(window), "lr": lr, "images_per_second": rate}, done)
        if saving and accelerator.is_main_process:
            save_checkpoint(checkpoint_folder, done, lora_state_dict(sd), optimizer, scheduler, signature,
                            params.keep_checkpoints)
        if on_samples and params.sample_prompts and params.sample_every_steps and done % params.sample_every_steps == 0:
            on_samples(render_samples(sd, params), done)
        if step_callback is not None:
            step_callback(done, sd)
    elapsed = time.perf_counter() - started  # the training steps alone: final checkpoint and samples excluded
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(checkpoint_folder, total_steps, lora_state_dict(sd), optimizer, scheduler, signature,
                        params.keep_checkpoints)
    samples = render_samples(sd, params) if params.sample_prompts and accelerator.is_main_process else []
    if on_samples and samples:
        on_samples(samples, total_steps)
    return TrainResult(
        lora_state=lora_state_dict(sd), losses=losses.values, steps=total_steps,
        epochs_done=total_steps * params.gradient_accumulation_steps / batches_per_epoch,
        images_per_second=images_seen / elapsed if elapsed else 0.0, peak_memory_mb=peak_memory_mb(device),
        samples=samples, resumed_from=resumed_from, latents_encoded=latents_encoded,
    )


def seed_dropout(seed: int, device: torch.device) -> None:
    """Seed the generator LoRA dropout draws from, for one micro-step (deterministic resume).

    Not ``torch.manual_seed``: on a CPU-only machine it also queues lazy seeding of CUDA, XPU and MTIA and
    formats a stack trace for each, ~1 ms a step in the profile (3-7% of a small model's step).
    """
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def optimizer_step(accelerator, loss: torch.Tensor, trainable, optimizer, scheduler, max_grad_norm: float) -> None:
    """Backward, clip, optimizer and scheduler step (no host sync: :class:`LossLog` checks the loss)."""
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        if max_grad_norm:
            accelerator.clip_grad_norm_(trainable, max_grad_norm)
        if accelerator.scaler is None and accelerator.distributed_type != "XLA":
            # What AcceleratedOptimizer.step does in this case, minus its per-call importlib lookup for the
            # optional lomo package (is_lomo_available: ~0.5 ms a step in the profile). fp16 (a grad scaler)
            # and XLA keep accelerate's path.
            optimizer.optimizer.step()
        else:
            optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def make_adamw(groups: list[dict], eight_bit: bool = False) -> torch.optim.Optimizer:
    """AdamW over the LoRA weights: bitsandbytes' 8-bit one when asked and possible, else torch's fused kernel.

    Fused (CUDA, and CPU since torch 2.4) updates all LoRA tensors in one kernel; the default per-tensor
    loop was ~5% of a small model's step in the profile (benchmarks/README.md).
    """
    if eight_bit:
        try:
            import bitsandbytes as bnb  # noqa: F401

            if torch.cuda.is_available():
                return bnb.optim.AdamW8bit(groups)
        except ImportError:
            pass
        logger.warning("optimizer: adamw8bit needs bitsandbytes and CUDA; using torch AdamW instead")
    try:
        return torch.optim.AdamW(groups, fused=True)
    except (RuntimeError, ValueError) as exc:  # a device or dtype the fused kernel does not support
        logger.info("Fused AdamW unavailable (%s); using the default implementation", exc)
        return torch.optim.AdamW(groups)


@torch.no_grad()
def render_samples(sd: SDComponents, params: TrainingParams) -> list[Any]:
    """Sample images with the LoRA as it is now (fixed seeds, so samples across steps are comparable)."""
    pipe = sd.pipeline(unet=_unwrap(sd.unet), text_encoder=_unwrap(sd.text_encoder))
    pipe.set_progress_bar_config(disable=True)
    device = next(_unwrap(sd.unet).parameters()).device
    pipe.vae.to(device)
    was_training = _unwrap(sd.unet).training
    _unwrap(sd.unet).eval()
    size = params.sample_size
    images = []
    for index, prompt in enumerate(params.sample_prompts):
        generator = torch.Generator().manual_seed(params.seed + index)
        images.extend(pipe(prompt, num_inference_steps=params.sample_inference_steps, generator=generator,
                           height=size, width=size).images)
    pipe.vae.to("cpu")
    _unwrap(sd.unet).train(was_training)
    return images


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is KiB on Linux: the process's peak resident memory.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def denoising_loss(sd: SDComponents, examples: Sequence[Example], cache: DiskCache, latent_keys: dict[str, str],
                   seed: int = 0, timesteps: Sequence[int] = (100, 300, 500, 700, 900)) -> float:
    """Mean denoising MSE at fixed timesteps, noise and latents: a reproducible quality figure.

    Lower is better; comparing base vs base+LoRA on held-out images shows what the LoRA learned.
    """
    unet = _unwrap(sd.unet)
    device = next(unet.parameters()).device
    scaling = sd.vae.config.scaling_factor
    total, count = 0.0, 0
    for index, ex in enumerate(examples):
        stats = cache.get_tensors(latent_keys[ex.sha256])
        hidden = encode_text(sd, [ex.text], device)
        for t in timesteps:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index * 1000 + t)
            latents = (stats["mean"] + stats["std"] * torch.randn(stats["mean"].shape, generator=generator))
            latents = (latents * scaling).unsqueeze(0).to(device)
            noise = torch.randn(latents.shape, generator=generator).to(device)
            step = torch.tensor([t], device=device)
            noisy = sd.scheduler.add_noise(latents, noise, step)
            pred = unet(noisy.to(unet.dtype), step, hidden.to(unet.dtype)).sample
            target = noise if sd.scheduler.config.prediction_type == "epsilon" else sd.scheduler.get_velocity(
                latents, noise, step)
            total += F.mse_loss(pred.float(), target.float()).item()
            count += 1
    return total / max(count, 1)
