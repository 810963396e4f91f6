"""The trainer core shared by the image and the LLM loops.

Each loop only computes its loss; this module owns what they have in common: the accelerate setup, the
choice of checkpoint to resume from, per-micro-step seeds, the optimizer step, the loss read-back and NaN
guard, throughput, the progress bar, metric windows and the checkpoint cadence.

Determinism: every micro-step draws its randomness from generators seeded by ``(seed, micro_step)``. A
resumed run therefore needs only the LoRA weights, the optimizer and scheduler states and the step, and it
continues bit-for-bit like an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import resource
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from lora_pipeline.core.checkpoints import (
    choose_resume,
    list_checkpoints,
    load_checkpoint,
    run_folder,
    save_checkpoint,
)
from lora_pipeline.core.errors import ConfigError, LoraPipelineError
from lora_pipeline.core.lock import subject_lock
from lora_pipeline.core.models import pick_device

logger = logging.getLogger(__name__)

MetricsCallback = Callable[[dict[str, float], int], None]


class NonFiniteLossError(LoraPipelineError):
    """The loss became NaN or infinite."""


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


def make_accelerator(device: str, mixed_precision: str, gradient_accumulation_steps: int, allow_tf32: bool = True,
                     gpu: int | None = None, setting: str = "mixed_precision"):
    """The one accelerate setup: CPU when asked or when no GPU exists, TF32 matmuls on Ampere+ GPUs.

    ``gpu`` picks this process's GPU when several are visible and the run is not distributed (one subject per
    GPU under ParallelRunner); ``accelerate launch`` keeps assigning one GPU per process itself. ``setting``
    names the parameter in the warning about fp16/bf16 on a CPU that has no native support for it.
    """
    from accelerate import Accelerator

    cpu = pick_device(device).type == "cpu"  # an unavailable explicit choice fails here, with the fix
    index = gpu_for(gpu, torch.cuda.device_count() if not cpu else 0, distributed=_launched_distributed())
    if index is not None:
        torch.cuda.set_device(index)  # accelerate's single-process device is plain "cuda": the current one
        logger.info("Training on GPU %d of %d", index, torch.cuda.device_count())
    if not _launched_distributed():
        # accelerate keeps its settings in a process-wide singleton and refuses a second Accelerator with another
        # mixed_precision or device ("restart your runtime"). One `kedro run` trains subject after subject in one
        # process, each with its own settings, so a single-process run starts from a clean state. (Under
        # `accelerate launch` every process trains the one subject with the launcher's settings: left alone.)
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu,
                              gradient_accumulation_steps=gradient_accumulation_steps)
    if accelerator.device.type == "cpu":
        warn_slow_cpu_precision(mixed_precision, cpu_features(), setting)
    if accelerator.device.type == "cuda" and allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True  # as diffusers' --allow_tf32: ~2x matmuls on Ampere+
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


# CPU flags (Linux /proc/cpuinfo names) that give fp16/bf16 matmuls native speed; without them torch emulates
# the type and a step runs ~100x slower than in fp32 (0.2 GFLOP/s bf16 vs 25 fp32 measured on an AVX2 CPU).
NATIVE_CPU_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16", "bf16"), "fp16": ("avx512_fp16", "amx_fp16", "asimdhp")}


def cpu_features() -> set[str]:
    """This CPU's flags: /proc/cpuinfo where there is one, plus what torch.cpu reports (other systems)."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.split(":")[0].strip() in ("flags", "Features"):  # x86, ARM
                flags.update(line.split(":", 1)[1].split())
    for flag, check in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_bf16", "_is_amx_tile_supported"),
                        ("amx_fp16", "_is_amx_fp16_supported")):
        with contextlib.suppress(Exception):  # private helpers: absent on some builds
            if getattr(torch.cpu, check)():
                flags.add(flag)
    return flags


def cpu_runs_natively(mixed_precision: str, flags: set[str]) -> bool:
    """Whether a CPU with these flags computes in ``mixed_precision`` at native speed (fp32 always does)."""
    return mixed_precision not in NATIVE_CPU_FLAGS or any(f in flags for f in NATIVE_CPU_FLAGS[mixed_precision])


def warn_slow_cpu_precision(mixed_precision: str, flags: set[str], setting: str = "mixed_precision") -> bool:
    """Say so before training when the CPU has no native fp16/bf16: otherwise the user only sees a crawl."""
    if cpu_runs_natively(mixed_precision, flags):
        return False
    logger.warning("%s: %s on this CPU, which has no native %s instructions (CPU flags %s): training runs "
                   "about 100x slower than in fp32. Set %s: \"no\" for CPU runs (fp16/bf16 pay off on GPUs).",
                   setting, mixed_precision, mixed_precision, " or ".join(NATIVE_CPU_FLAGS[mixed_precision]), setting)
    return True


def enable_activation_checkpointing(model) -> None:
    """Recompute activations in the backward pass, with each library's current call: diffusers models have
    ``enable_gradient_checkpointing``; transformers 5 renamed its ``gradient_checkpointing_enable`` (deprecated,
    a FutureWarning on every call) to ``activation_checkpointing_enable``."""
    for name in ("activation_checkpointing_enable", "enable_gradient_checkpointing", "gradient_checkpointing_enable"):
        if callable(getattr(model, name, None)):
            getattr(model, name)()
            return
    raise LoraPipelineError(f"{type(model).__name__} has no gradient checkpointing; set "
                            f"gradient_checkpointing: false.")


def throughput(rate: float, unit: str) -> str:
    """``12.3 img/s``; below one per second the seconds each takes (``4.2 s/img``), so slow steps never read 0.0."""
    if rate <= 0:
        return f"- {unit}/s"  # nothing measured yet (the first step), rather than a speed of zero
    if rate >= 1:
        return f"{rate:.1f} {unit}/s"
    return f"{1 / rate:.1f} s/{unit}"


def gpu_for(gpu: int | None, gpu_count: int, distributed: bool) -> int | None:
    """The GPU index for a single-process run that asked for ``gpu``, or None to leave the default."""
    if gpu is None or gpu_count <= 1 or distributed:
        return None
    return gpu % gpu_count


def _launched_distributed() -> bool:
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


# One multiplier per random stream keeps the streams of one seed apart. They are part of every run's randomness:
# changing one changes what a seed trains, and a run resumed across the change would not continue bit for bit.
SEED_STREAMS = {"noise": 1_000_003, "order": 1_000_003, "dropout": 7_919, "captions": 104_729}


def derive_seed(base: int, *parts: int, stream: str = "noise") -> int:
    """The seed of one random ``stream`` (noise, batch order, LoRA dropout, caption augmentation) at one place of
    a run: ``base * SEED_STREAMS[stream]`` plus ``parts`` read as base-1000 digits, e.g. ``(micro_step,)``,
    ``(epoch,)`` or ``(image, timestep)``."""
    offset = 0
    for part in parts:
        offset = offset * 1000 + part
    return base * SEED_STREAMS[stream] + offset


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


OPTIMIZER_PACKAGES = {  # name -> (module, class, pip requirement, extra of this project)
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", "cuda"),
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt", "optimizers"),
    "lion": ("lion_pytorch", "Lion", "lion-pytorch", "optimizers"),
    "adafactor": ("transformers.optimization", "Adafactor", "transformers", None),
}
# kohya's defaults for Adafactor with an explicit learning rate (its relative_step mode ignores the lr).
ADAFACTOR_DEFAULTS = {"scale_parameter": False, "relative_step": False, "warmup_init": False}


def make_optimizer(name: str, groups: list[dict], extra_args: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """The optimizer ``training.optimizer`` names, each from its own maintained package (none is written here):
    torch AdamW, bitsandbytes AdamW8bit (CUDA), prodigyopt's Prodigy, lion-pytorch's Lion, transformers'
    Adafactor. ``extra_args`` are kohya's ``optimizer_args``. A missing package stops with the pip command."""
    import importlib

    args = dict(extra_args or {})
    if name == "adamw":
        return make_adamw(groups, **args)
    module_name, class_name, requirement, extra = OPTIMIZER_PACKAGES[name]
    try:
        optimizer_class = getattr(importlib.import_module(module_name), class_name)
    except ImportError:
        install = f"pip install 'lora_pipeline[{extra}]' (or pip install {requirement})" if extra \
            else f"pip install {requirement}"
        raise ConfigError(f"training.optimizer: {name} needs the {requirement} package, which is not installed. "
                          f"Run `{install}`, or choose optimizer: adamw.") from None
    if name == "adamw8bit" and not torch.cuda.is_available():
        raise ConfigError("training.optimizer: adamw8bit runs on CUDA GPUs only (bitsandbytes); use adamw on "
                          "this machine.")
    if name == "adafactor":
        args = {**ADAFACTOR_DEFAULTS, **args}
    try:
        return optimizer_class(groups, **args)
    except TypeError as exc:
        raise ConfigError(f"training.optimizer_args {args} do not fit {class_name}: {exc}. Remove or rename "
                          f"the key.") from None


def make_adamw(groups: list[dict], **args: Any) -> torch.optim.Optimizer:
    """AdamW over the LoRA weights with torch's fused kernel where the device supports it.

    Fused (CUDA, and CPU since torch 2.4) updates all LoRA tensors in one kernel; the default per-tensor
    loop was ~5% of a small model's step in the profile (benchmarks/README.md).
    """
    try:
        return torch.optim.AdamW(groups, fused=True, **args)
    except (RuntimeError, ValueError) as exc:  # a device or dtype the fused kernel does not support
        logger.info("Fused AdamW unavailable (%s); using the default implementation", exc)
        return torch.optim.AdamW(groups, **args)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is KiB on Linux: the process's peak resident memory.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TrainerCore:
    """The bookkeeping around one training run; the loop calls :meth:`micro_seeds` per micro-step and
    :meth:`end_step` per optimizer step, then :meth:`finish`.

    ``unit`` names what throughput counts (``img`` or ``tok``); ``lora_state`` returns the weights to save.
    Checkpoints go to this run's own folder (:func:`run_folder`); :meth:`locked` keeps a second process off
    the subject while the run lasts.
    """

    def __init__(self, *, accelerator, seed: int, subject: str, subject_folder: Path, signature: dict[str, Any],
                 total_steps: int,
                 save_steps: int, keep_checkpoints: int, log_every_steps: int, advice: str, desc: str, unit: str,
                 lora_state: Callable[[], dict[str, torch.Tensor]], on_metrics: MetricsCallback | None = None,
                 save_every_steps: int = 0):
        self.accelerator, self.seed, self.signature = accelerator, seed, signature
        self.subject, self.subject_folder = subject, subject_folder
        self.folder = run_folder(subject_folder, signature)
        self.total_steps, self.save_steps, self.keep = total_steps, save_steps, keep_checkpoints
        self.save_every = save_every_steps  # steps in save_every_n_epochs epochs
        self.log_every, self.unit, self.lora_state, self.on_metrics = log_every_steps, unit, lora_state, on_metrics
        self.losses = LossLog(self.folder, advice)
        self.desc = desc
        self.start_step, self.resumed_from = 0, None
        self._seen, self._started, self._bar = 0, 0.0, None

    def locked(self):
        """The subject's lock, held by the main process (the one that writes checkpoints)."""
        if not self.accelerator.is_main_process:
            return contextlib.nullcontext()
        return subject_lock(self.subject_folder, self.subject)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def resume(self, mode: str, optimizer, scheduler) -> dict[str, torch.Tensor] | None:
        """Restore optimizer, scheduler and RNG from the checkpoint ``mode`` selects; return its LoRA weights."""
        checkpoint = choose_resume(mode, self.folder, self.signature, self.total_steps)
        if checkpoint is None:
            return None
        state, self.start_step = load_checkpoint(checkpoint, optimizer, scheduler)
        self.resumed_from = str(checkpoint)
        return state

    def start(self) -> None:
        self._bar = tqdm(total=self.total_steps, initial=self.start_step, desc=self.desc, unit="step",
                         disable=not self.accelerator.is_local_main_process)
        self._seen, self._started = 0, time.perf_counter()

    def micro_seeds(self, micro: int) -> tuple[torch.Generator, random.Random]:
        """This micro-step's noise generator and Python RNG; LoRA dropout is seeded too."""
        seed_dropout(derive_seed(self.seed, micro, stream="dropout"), self.device)
        return (torch.Generator().manual_seed(derive_seed(self.seed, micro, stream="noise")),
                random.Random(derive_seed(self.seed, micro, stream="captions")))

    def end_step(self, step: int, loss: torch.Tensor, seen: int, optimizer, scheduler,
                 evaluate: Callable[[], dict[str, float]] | None = None) -> None:
        """Record one optimizer step; at window ends read the losses back, log, and save checkpoints."""
        self.losses.add(step, loss)
        self._seen += seen
        done = step + 1
        if done == self.start_step + 1 and self.total_steps - self.start_step > 1:
            # Throughput is steady-state: the first step pays one-off costs (allocator warm-up, lazy init).
            self._seen, self._started = 0, time.perf_counter()
        self._bar.update(1)
        saving = done < self.total_steps and any(every and done % every == 0
                                                 for every in (self.save_steps, self.save_every))
        if done % self.log_every == 0 or done == self.total_steps or saving or evaluate is not None:
            window = self.losses.flush()  # the only host sync; before any checkpoint write
            rate = self.rate()
            lr = scheduler.get_last_lr()[0]
            self._bar.set_postfix(loss=f"{window[-1]:.4f}", lr=f"{lr:.2e}", speed=throughput(rate, self.unit),
                                  refresh=False)
            metrics = {"loss": sum(window) / len(window), "lr": lr,
                       ("images_per_second" if self.unit == "img" else "tokens_per_second"): rate}
            if evaluate is not None:
                metrics.update(evaluate())
            if self.on_metrics:
                self.on_metrics(metrics, done)
        if saving and self.accelerator.is_main_process:
            save_checkpoint(self.folder, done, self.lora_state(), optimizer, scheduler, self.signature, self.keep)

    def rate(self) -> float:
        elapsed = time.perf_counter() - self._started
        return self._seen / elapsed if elapsed and self._seen else 0.0

    def finish(self, optimizer, scheduler) -> float:
        """Close the bar, save the final checkpoint; returns the steady-state throughput of the steps alone."""
        rate = self.rate()  # measured before the final checkpoint and samples
        self._bar.close()
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save_checkpoint(self.folder, self.total_steps, self.lora_state(), optimizer, scheduler, self.signature,
                            self.keep)
        return rate
