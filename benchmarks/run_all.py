"""lora-pipeline benchmarks: print figures, write benchmarks/RESULTS.md, log to the MLflow 'benchmarks' experiment.

    .venv/bin/python benchmarks/run_all.py            # everything (CPU: ~15-25 min on 2 cores)
    .venv/bin/python benchmarks/run_all.py --quick    # smaller sizes, for a smoke run

Sections: training throughput vs a textbook diffusers+PEFT loop (tiny SD, CPU), data stages at 1k/10k images,
incremental re-run after +1% images, LLM tokens/s vs a bare PEFT loop, peak memory.
Speed targets live here, never in the test suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import click  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

HERE = Path(__file__).resolve().parent


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- training throughput

def _dataset(folder: Path, n: int, size: int):
    from lora_pipeline.core.files import sha256_file
    from lora_pipeline.diffusion.training import Example

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    examples = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(path)
        examples.append(Example(path, f"sks, sample {i % 4}", size, size, sha256_file(path)))
    return examples


def bare_stepper(components, examples, batch: int, rank: int, device: str = "cpu", dtype=torch.float32):
    """The textbook diffusers + PEFT loop (as in diffusers' train_text_to_image_lora.py): set up, then return
    its step function ``step(i)``."""
    from peft import LoraConfig

    from lora_pipeline.core.config import KOHYA_UNET_TARGETS
    from lora_pipeline.prep.images import load_rgb

    unet, vae, text_encoder = components.unet, components.vae, components.text_encoder
    tokenizer, scheduler = components.tokenizer, components.scheduler
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.to(device, dtype)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=KOHYA_UNET_TARGETS))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    for param in trainable:
        param.data = param.data.float()  # LoRA weights in fp32, as the diffusers script casts them
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    unet.train()

    def step(i: int) -> None:
        chosen = [examples[(i * batch + k) % len(examples)] for k in range(batch)]
        pixels = torch.stack([torch.from_numpy(np.asarray(load_rgb(e.path), dtype=np.float32)).permute(2, 0, 1)
                              / 127.5 - 1 for e in chosen]).to(device, dtype)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            ids = tokenizer([e.text for e in chosen], padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(device)
            hidden = text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            pred = unet(scheduler.add_noise(latents, noise, t), t, hidden).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)  # as diffusers' train_text_to_image_lora.py does
        optimizer.step()
        optimizer.zero_grad()

    return step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_rate(durations: list[float], batch: int) -> float:
    return batch / statistics.median(durations)


NO_MLFLOW = False  # --no-mlflow: for a GPU machine without MLflow installed (our loop then logs nothing)


@contextlib.contextmanager
def step_metrics(workdir: Path):
    """Step metrics to an MLflow run, as the ``training`` node logs them (nothing with --no-mlflow)."""
    if NO_MLFLOW:
        yield None
        return
    import mlflow

    from lora_pipeline.pipelines.tracking import StepMetricsLogger

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    with mlflow.start_run(), StepMetricsLogger("train") as log_metrics:
        yield log_metrics


def ours_against_bare(make_sd, examples, steps: int, batch: int, rank: int, cache: bool, workdir: Path,
                      device: str = "cpu", mixed_precision: str = "no", log_every_steps: int = 1
                      ) -> tuple[float, float]:
    """(our images/s, the textbook loop's images/s), measured in lockstep: one step of our loop, one step of
    the textbook loop, and so on, in one process on the same data.

    Lockstep because this shared VM's speed drifts by +-25% over seconds (other tenants): two loops run one
    after the other see different machines, two loops taking turns step by step see the same one. Our loop
    runs as the ``training`` node runs it (step metrics to an MLflow run, written synchronously in batches
    inside its own turn, so its logging is never billed to the other loop). Each rate is from the median step;
    the first step of each loop (one-off warm-up) is left out.
    """
    from lora_pipeline.core.cache import DiskCache
    from lora_pipeline.core.config import TrainingParams
    from lora_pipeline.diffusion.training import train

    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    other = bare_stepper(make_sd(), examples, batch, rank, device, dtype)
    params = TrainingParams(base_model="bench", device=device, lora_rank=rank, alpha=rank, batch_size=batch,
                            max_steps=steps, cache_latents=cache, checkpoint_dir=str(workdir / "ckpt"),
                            output_name=f"bench_{random.random():.6f}", resume="none", mixed_precision=mixed_precision,
                            log_every_steps=log_every_steps)
    ours_times: list[float] = []
    bare_times: list[float] = []
    turn_ended: list[float] = []

    def take_turns(step: int, _sd) -> None:
        _sync(device)
        ours_done = time.perf_counter()
        if turn_ended:
            ours_times.append(ours_done - turn_ended[-1])
        other(step)
        _sync(device)
        turn_ended.append(time.perf_counter())
        bare_times.append(turn_ended[-1] - ours_done)

    with step_metrics(workdir) as log_metrics:
        train(make_sd(), examples, params, DiskCache(workdir / "cache"), dataset_hash="bench",
              on_metrics=log_metrics, step_callback=take_turns)
    return _median_rate(ours_times, batch), _median_rate(bare_times[1:], batch)


def _ratios(pairs: dict[str, list[tuple[float, float]]], prefix: str) -> dict[str, float]:
    """``pairs[mode]``: (our images/s, the textbook loop's images/s) of each lockstep run in that mode."""
    out = {}
    for mode, runs in pairs.items():
        ratios = [ours / bare for ours, bare in runs]
        out[f"{prefix}_img_s_ours_{mode}"] = statistics.median(ours for ours, _ in runs)
        out[f"{prefix}_img_s_bare_{mode}"] = statistics.median(bare for _, bare in runs)
        out[f"{prefix}_ratio_{mode}"] = statistics.median(ratios)
        out[f"{prefix}_ratio_{mode}_min"] = min(ratios)
        out[f"{prefix}_ratio_{mode}_max"] = max(ratios)
    return out


def bench_training(models: dict[str, Path], quick: bool) -> dict[str, float]:
    """Tiny SD on CPU: 128 px, batch 4, r=8, fp32; lockstep pairs, repeated; median of the paired ratios."""
    from lora_pipeline.diffusion.loading import load_diffusion_model

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    examples = _dataset(work / "images", 16, 128)
    model = str(models["tiny-sd"])
    steps, batch, rank = (15, 4, 8) if quick else (40, 4, 8)
    make_sd = partial(load_diffusion_model, model)
    # Fill the latent cache first: "from the second epoch on".
    ours_against_bare(make_sd, examples, 2, batch, rank, True, work)
    pairs = {"nocache": [], "cache": []}
    for _ in range(2 if quick else 3):
        for mode, cache in (("nocache", False), ("cache", True)):
            pairs[mode].append(ours_against_bare(make_sd, examples, steps, batch, rank, cache, work))
    figures = _ratios(pairs, "train")
    # A/A: the textbook loop against itself, in lockstep. Its spread is this method's noise floor.
    noise = []
    for _ in range(2 if quick else 3):
        first = bare_stepper(make_sd(), examples, batch, rank)
        second = bare_stepper(make_sd(), examples, batch, rank)
        a_times, b_times = [], []
        for i in range(steps):
            for stepper, times in ((first, a_times), (second, b_times)):
                started = time.perf_counter()
                stepper(i)
                times.append(time.perf_counter() - started)
        noise.append(statistics.median(a_times[1:]) / statistics.median(b_times[1:]))
    figures.update(train_ratio_bare_vs_bare=statistics.median(noise), train_ratio_bare_vs_bare_min=min(noise),
                   train_ratio_bare_vs_bare_max=max(noise))
    return figures


def sd15_components(tiny_sd: Path):
    """SD1.5-size UNet, VAE and text encoder with random weights (real configs); the tiny model's tokenizer."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from lora_pipeline.demo.tiny_models import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG
    from lora_pipeline.diffusion.families import SD1
    from lora_pipeline.diffusion.loading import DiffusionComponents

    torch.manual_seed(0)
    return DiffusionComponents(SD1, UNet2DConditionModel(**SD15_UNET_CONFIG), AutoencoderKL(**SD15_VAE_CONFIG),
                               [CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))],
                               [CLIPTokenizer.from_pretrained(str(tiny_sd / "tokenizer"))],
                               DDPMScheduler.from_pretrained(str(tiny_sd / "scheduler")), "sd15-random")


def step_flops(unet, vae, text_encoders, pixels: int, prefix: str) -> dict[str, float]:
    """TFLOP per image (``torch.utils.flop_counter``): one LoRA training step of the UNet with our default kohya
    targets at r=8 (forward + backward), one VAE encode and one text-encoder forward at ``pixels`` px; and
    the most caching can speed a compute-bound step up by (``<prefix>_cache_ceiling_by_flops``)."""
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    from lora_pipeline.core.config import KOHYA_UNET_TARGETS

    device = next(unet.parameters()).device
    unet.requires_grad_(False)
    with torch.device(device):
        unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=KOHYA_UNET_TARGETS))
        unet.train()
        latent = pixels // 8
        hidden = torch.randn(1, 77, unet.config.cross_attention_dim)
        extra = {}
        if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embedding + 6 size/crop ids
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled), "time_ids": torch.randn(1, 6)}}
        counts = {}
        with FlopCounterMode(display=False) as counter:
            unet(torch.randn(1, 4, latent, latent), torch.tensor([500]), hidden, **extra).sample.pow(2).mean().backward()
        counts[f"{prefix}_unet_lora_step_tflop_per_image"] = counter.get_total_flops() / 1e12
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            vae.encode(torch.randn(1, 3, pixels, pixels))
        counts[f"{prefix}_vae_encode_tflop_per_image"] = counter.get_total_flops() / 1e12
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            for text_encoder in text_encoders:
                text_encoder(torch.zeros(1, 77, dtype=torch.long))
        counts[f"{prefix}_text_encode_tflop_per_image"] = counter.get_total_flops() / 1e12
    step = counts[f"{prefix}_unet_lora_step_tflop_per_image"]
    counts[f"{prefix}_cache_ceiling_by_flops"] = (step + counts[f"{prefix}_vae_encode_tflop_per_image"]
                                                  + counts[f"{prefix}_text_encode_tflop_per_image"]) / step
    return counts


def sd15_flops() -> dict[str, float]:
    """SD1.5 at 512 px, counted on meta tensors (no weights, no compute)."""
    from diffusers import AutoencoderKL

    from lora_pipeline.demo.tiny_models import SD15_VAE_CONFIG, build_sd15_architecture

    unet, text_encoder = build_sd15_architecture("meta")
    with torch.device("meta"):
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
    return step_flops(unet, vae, [text_encoder], 512, "sd15")


def sdxl_flops() -> dict[str, float]:
    """SDXL base at 1024 px (its native bucket), counted on meta tensors (no weights, no compute): both text
    encoders count towards what caching saves."""
    from diffusers import AutoencoderKL

    from lora_pipeline.demo.tiny_models import SDXL_VAE_CONFIG, build_sdxl_architecture

    unet, text_encoder, text_encoder_2 = build_sdxl_architecture("meta")
    with torch.device("meta"):
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
    return step_flops(unet, vae, [text_encoder, text_encoder_2], 1024, "sdxl")


def tiny_flops(models: dict[str, Path]) -> dict[str, float]:
    """The benchmark's tiny SD at its 128 px: why caching cannot reach 1.5x there."""
    from lora_pipeline.diffusion.loading import load_diffusion_model

    components = load_diffusion_model(str(models["tiny-sd"]))
    return step_flops(components.unet, components.vae, components.text_encoders, 128, "tiny")


# Dense bf16 peak (no sparsity), TFLOP/s, from the vendors' data sheets (SXM parts).
GPU_BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}


def bench_sd15(models: dict[str, Path], device: str, quick: bool) -> dict[str, float]:
    """SD1.5-size model at 512 px: our loop (cached / not) against the textbook loop, same settings.

    CPU: batch 1, fp32, 4 steps each (the first is warm-up), one repeat: a CPU step takes ~20-30 s.
    GPU: batch 4, bf16, 20 steps, three repeats, plus model-FLOPs utilization with cached latents.
    """
    work = Path(tempfile.mkdtemp(prefix=f"bench-sd15-{device}-"))
    gpu = device == "cuda"
    batch, steps, repeats = (4, 20, 3) if gpu else (1, 4, 1)
    dtype, mixed = (torch.bfloat16, "bf16") if gpu else (torch.float32, "no")
    examples = _dataset(work / "images", 2 * batch, 512)
    tiny = models["tiny-sd"]
    from lora_pipeline.core.cache import DiskCache
    from lora_pipeline.diffusion.training import encode_latents

    components = sd15_components(tiny)
    encode_latents(components, examples, DiskCache(work / "cache"), torch.device(device))  # "from the second epoch on"
    del components
    pairs = {"nocache": [], "cache": []}
    for _ in range(repeats):
        for mode, cache in (("nocache", False), ("cache", True)):
            pairs[mode].append(ours_against_bare(partial(sd15_components, tiny), examples, steps, batch, 8, cache,
                                                 work, device, mixed, log_every_steps=10 if gpu else 1))
    prefix = f"sd15_{device}_{'bf16' if gpu else 'fp32'}"
    out = _ratios(pairs, prefix)
    if gpu:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in GPU_BF16_PEAK_TFLOPS.items() if k in name), None)
        if peak:
            step_tflop = sd15_flops()["sd15_unet_lora_step_tflop_per_image"]
            out[f"{prefix}_mfu_cache"] = out[f"{prefix}_img_s_ours_cache"] * step_tflop / peak
    return out


# ----------------------------------------------------------------------------- data stages at scale
# ----------------------------------------------------------------------------- data stages at scale

def make_images(folder: Path, start: int, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        w, h = [(512, 512), (768, 512), (512, 768)][i % 3]
        base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.random(3)[None, None, :]
        image = Image.fromarray(np.broadcast_to(base, (h, w, 3)).astype(np.uint8))
        image.save(folder / f"img_{i:06d}.png", compress_level=1)
        (folder / f"img_{i:06d}.txt").write_text(f"sks, tag{i % 7}, tag{i % 11}")
        if i % 997 == 0:
            (folder / f"bad_{i:06d}.jpg").write_bytes(b"not an image")


def data_stages_once(raw: Path, out: Path, cache: Path) -> dict[str, float]:
    """captioning (sidecar) + normalization on ``raw``; run in a fresh process for a clean peak RSS."""
    import pandas as pd

    from lora_pipeline.core.cache import DiskCache
    from lora_pipeline.datasets.image_folder import ImageFolderDataset
    from lora_pipeline.pipelines.captioning.nodes import caption_images, scan_images
    from lora_pipeline.pipelines.normalization.nodes import build_training_metadata, inspect_images, render_images

    started = time.perf_counter()
    folder = ImageFolderDataset(str(raw)).load()
    manifest = scan_images(folder, DiskCache(cache / "cap"))
    captions, _ = caption_images(manifest, pd.DataFrame(columns=["file_name", "text"]), DiskCache(cache / "cap"),
                                 folder, {"backend": "sidecar", "trigger": "sks"})
    t_caption = time.perf_counter() - started
    params = {"min_size": 256}
    checks = inspect_images(folder, params, DiskCache(cache / "check"))
    build_training_metadata(checks, captions, params)
    ImageFolderDataset(str(out)).save(render_images(folder, checks, params))
    total = time.perf_counter() - started
    return {"images": len(folder.names), "caption_s": t_caption, "normalize_s": total - t_caption,
            "total_s": total, "peak_rss_mb": peak_rss_mb()}


def _in_subprocess(*args: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_data(quick: bool) -> dict[str, float]:
    sizes = (200, 2000) if quick else (1000, 10000)
    figures = {}
    per_image = {}
    for n in sizes:
        work = Path(tempfile.mkdtemp(prefix=f"bench-data-{n}-"))
        make_images(work / "raw", 0, n)
        first = _in_subprocess("--data-stage", str(work))
        figures[f"data_{n}_img_s"] = first["images"] / first["total_s"]
        figures[f"data_{n}_peak_rss_mb"] = first["peak_rss_mb"]
        per_image[n] = first["total_s"] / first["images"]
        if n == sizes[-1]:
            make_images(work / "raw", n, n // 100)  # +1% new images
            again = _in_subprocess("--data-stage", str(work))
            figures["incremental_rerun_fraction"] = again["total_s"] / first["total_s"]
    figures["data_per_image_ratio_large_vs_small"] = per_image[sizes[1]] / per_image[sizes[0]]
    return figures


# ----------------------------------------------------------------------------- LLM

def _llm_ours(model_dir: str, tokenizer, items, steps: int, batch: int, packing: bool, on_tick=None):
    from lora_pipeline.core.config import LLMTrainingParams
    from lora_pipeline.llm.training import load_causal_lm, train_causal_lm

    params = LLMTrainingParams(base_model=model_dir, device="cpu", batch_size=batch, max_steps=steps,
                               checkpoint_dir=tempfile.mkdtemp(prefix="bench-llm-"), resume="none",
                               lr_scheduler="constant", packing=packing)
    return train_causal_lm(load_causal_lm(model_dir)[0], tokenizer, items, [], params, dataset_hash="b",
                           step_callback=on_tick)


def bench_llm(models: dict[str, Path], quick: bool) -> dict[str, float]:
    """Tiny Llama, LoRA r=16 on all linear layers, batch 8, CPU fp32.

    Ratio: equal-length samples (so every step holds the same tokens) and median step times, as for images.
    Packing: variable-length samples, real (non-pad) tokens/s and the share of padding, packed vs not.
    """
    from peft import LoraConfig, get_peft_model

    from lora_pipeline.llm.training import load_causal_lm
    from lora_pipeline.prep.llm_data import pack, pad_batch, parse_record, tokenize

    model_dir = str(models["tiny-llm"])
    _, tokenizer = load_causal_lm(model_dir)

    def items_for(response_of):
        convs = [parse_record({"prompt": f"患者：头痛{i % 10}天", "response": response_of(i)}, i) for i in range(64)]
        return [tokenize(tokenizer, c, None, 256, "truncate") for c in convs]

    steps, batch = (10, 8) if quick else (40, 8)
    same = items_for(lambda i: "建议休息，多喝水。" * 2)
    per_step = batch * len(same[0]["input_ids"])
    assert all(len(item["input_ids"]) == len(same[0]["input_ids"]) for item in same)
    ours_rates, bare_rates = [], []
    for _ in range(2 if quick else 3):
        # Lockstep, as for images: after each step of our loop, one step of the bare loop.
        model = get_peft_model(load_causal_lm(model_dir)[0], LoraConfig(r=16, lora_alpha=32, lora_dropout=0.2,
                                                                        target_modules="all-linear"))
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=2e-4)
        model.train()
        ours_times, bare_times, turn_ended = [], [], []

        def take_turns(step: int, _model) -> None:
            ours_done = time.perf_counter()
            if turn_ended:
                ours_times.append(ours_done - turn_ended[-1])
            start = (step * batch) % len(same)
            model(**pad_batch(same[start:start + batch], tokenizer.pad_token_id)).loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)  # as TRL/transformers Trainer do by default
            optimizer.step()
            optimizer.zero_grad()
            turn_ended.append(time.perf_counter())
            bare_times.append(turn_ended[-1] - ours_done)

        _llm_ours(model_dir, tokenizer, same, steps, batch, False, take_turns)
        ours_rates.append(_median_rate(ours_times, per_step))
        bare_rates.append(_median_rate(bare_times[1:], per_step))
    figures = {"llm_tok_s_ours": statistics.median(ours_rates), "llm_tok_s_bare": statistics.median(bare_rates),
               "llm_ratio": statistics.median(o / b for o, b in zip(ours_rates, bare_rates))}

    varied = items_for(lambda i: "建议休息，多喝水。" * (1 + i % 6))
    length = max(len(item["input_ids"]) for item in varied)
    real = sum(len(item["input_ids"]) for item in varied)
    rows = pack(varied, length)
    padded_plain = sum(batch * max(len(x["input_ids"]) for x in varied[i:i + batch]) for i in range(0, 64, batch))
    padded_packed = sum(len(rows[i:i + batch]) * max(len(x["input_ids"]) for x in rows[i:i + batch])
                        for i in range(0, len(rows), batch))
    rates = {False: [], True: []}
    for _ in range(3):
        for packing in (False, True):
            rates[packing].append(_llm_ours(model_dir, tokenizer, varied, steps, batch, packing).tokens_per_second)
    figures.update({
        "llm_pad_share_unpacked": 1 - real / padded_plain, "llm_pad_share_packed": 1 - real / padded_packed,
        "llm_real_tok_s_unpacked": statistics.median(rates[False]),
        "llm_real_tok_s_packed": statistics.median(rates[True]),
        "llm_packing_speedup": statistics.median(rates[True]) / statistics.median(rates[False]),
    })
    return figures


# ----------------------------------------------------------------------------- memory

def bench_memory_sd15(mode: str) -> dict[str, float]:
    """Peak memory of one LoRA training step of an SD1.5-size model (random weights, real configs), batch 1,
    512 px. ``mode``: ``<checkpointing|plain>-<cached|uncached>-<fp32|bf16>``; uncached adds the VAE encode of
    the 512 px image and the text encoder, as a step without caches does. Peak RSS on CPU, CUDA peak on a GPU.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_pipeline.core.config import KOHYA_UNET_TARGETS
    from lora_pipeline.demo.tiny_models import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG

    checkpointing, caching, precision = mode.split("-")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).to(device, dtype)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=KOHYA_UNET_TARGETS))
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    if checkpointing == "checkpointing":
        unet.enable_gradient_checkpointing()
    unet.train()
    started = time.perf_counter()
    with torch.no_grad():
        if caching == "uncached":
            vae = AutoencoderKL(**SD15_VAE_CONFIG).to(device, dtype)
            text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG)).to(device, dtype)
            latents = vae.encode(torch.randn(1, 3, 512, 512, device=device, dtype=dtype)).latent_dist.sample()
            hidden = text_encoder(torch.zeros(1, 77, dtype=torch.long, device=device))[0]
            del vae, text_encoder  # the textbook loop keeps them; their weights are in the peak either way
        else:
            latents = torch.randn(1, 4, 64, 64, device=device, dtype=dtype)
            hidden = torch.randn(1, 77, 768, device=device, dtype=dtype)
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        pred = unet(latents, torch.tensor([500], device=device), hidden).sample
    pred.float().pow(2).mean().backward()
    _sync(device)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb()
    return {"seconds": time.perf_counter() - started, "peak_mb": peak}


# ----------------------------------------------------------------------------- report

TARGETS = {
    "train_ratio_nocache": (">=", 1.0), "train_ratio_cache": (">=", 1.5), "llm_ratio": (">=", 1.0),
    "sd15_cpu_fp32_ratio_nocache": (">=", 1.0), "sd15_cpu_fp32_ratio_cache": (">=", 1.5),
    "sd15_cuda_bf16_ratio_nocache": (">=", 1.0), "sd15_cuda_bf16_ratio_cache": (">=", 1.5),
    "sd15_cuda_bf16_mfu_cache": (">=", 0.40), "sd15_cuda_peak_mb_checkpointing-cached-bf16": ("<=", 6144),
    "data_per_image_ratio_large_vs_small": ("<=", 1.2), "incremental_rerun_fraction": ("<=", 0.10),
}


def _previous_figures(text: str) -> dict[str, str]:
    """The value cells of the figures table already in RESULTS.md (kept for sections not re-run)."""
    rows = {}
    for line in text.split("\n## ", 1)[0].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("figure", "---"):
            rows[cells[0]] = cells[1]
    return rows


def write_report(figures: dict[str, float], machine: str, path: Path, sections: list[str]) -> str:
    """The figures table of RESULTS.md: this run's figures replace theirs, the others stay, and so do the file's
    other sections (``## Flux.1 memory`` ...), so re-running one section never erases the rest."""
    import datetime

    old = path.read_text() if path.exists() else ""
    values = {name: f"{value:.4g}" for name, value in figures.items()}
    merged = {**_previous_figures(old), **values}
    today = datetime.date.today().isoformat()
    lines = [f"# Benchmark results\n\nMachine: {machine}. Last run {today}: {', '.join(sections)}.\n",
             "| figure | value | target | status |", "| --- | --- | --- | --- |"]
    for name, shown in merged.items():
        op, goal = TARGETS.get(name, (None, None))
        status = ""
        if op:
            value = float(shown)
            ok = value >= goal if op == ">=" else value <= goal
            status = "ok" if ok else "**MISSED**"
            if name.endswith("ratio") or "ratio_" in name:
                status += " (REGRESSION < 0.9)" if op == ">=" and value < 0.9 else ""
        lines.append(f"| {name} | {shown} | {op + ' ' + str(goal) if op else ''} | {status} |")
    rest = old.split("\n## ", 1)[1] if "\n## " in old else ""
    text = "\n".join(lines) + "\n" + ("\n## " + rest if rest else "")
    path.write_text(text)
    return text


@click.command(help=__doc__)
@click.option("--quick", is_flag=True, help="smaller sizes, for a smoke run")
@click.option("--only", multiple=True, help="sections, repeated or comma-separated: training data llm memory flops "
                                            "sd15 (sd15_cuda: the CUDA half of sd15 alone)")
@click.option("--no-mlflow", is_flag=True, help="neither log step metrics nor the figures")
@click.option("--data-stage", hidden=True)
@click.option("--memory-stage", hidden=True)
def main(quick: bool, only: tuple[str, ...], no_mlflow: bool, data_stage: str | None, memory_stage: str | None
         ) -> None:
    global NO_MLFLOW
    NO_MLFLOW = no_mlflow
    if data_stage:
        work = Path(data_stage)
        print(json.dumps(data_stages_once(work / "raw", work / "out", work / "cache")))
        return
    if memory_stage:
        print(json.dumps(bench_memory_sd15(memory_stage)))
        return
    from lora_pipeline.demo.tiny_models import build_all

    sections = [name for value in only for name in value.split(",") if name] or \
        ["training", "data", "llm", "memory", "flops", "sd15"]
    models = build_all(Path(tempfile.mkdtemp(prefix="bench-models-")))
    figures: dict[str, float] = {}
    if "training" in sections:
        figures.update(bench_training(models, quick))
        print(figures, flush=True)
    if "data" in sections:
        figures.update(bench_data(quick))
        print(figures, flush=True)
    if "llm" in sections:
        figures.update(bench_llm(models, quick))
        print(figures, flush=True)
    if "memory" in sections and not quick:
        gpu = torch.cuda.is_available()
        # bf16 on this CPU (no AVX512-BF16/AMX) is emulated: minutes per step, so CPU runs fp32 only.
        for precision in (("fp32", "bf16") if gpu else ("fp32",)):
            for caching in ("cached", "uncached"):
                for checkpointing in ("checkpointing", "plain"):
                    mode = f"{checkpointing}-{caching}-{precision}"
                    result = _in_subprocess("--memory-stage", mode)
                    where = "cuda" if gpu else "cpu_rss"
                    figures[f"sd15_{where}_peak_mb_{mode}"] = result["peak_mb"]
                    figures[f"sd15_step_s_{mode}"] = result["seconds"]
    if "flops" in sections:
        figures.update(tiny_flops(models))
        figures.update(sd15_flops())
        figures.update(sdxl_flops())
    if "sd15" in sections:
        figures.update(bench_sd15(models, "cpu", quick))
    if {"sd15", "sd15_cuda"} & set(sections):
        if torch.cuda.is_available():
            figures.update(bench_sd15(models, "cuda", quick))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    machine = f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {gpu}"
    print(write_report(figures, machine, HERE / ("RESULTS_GPU.md" if torch.cuda.is_available() else "RESULTS.md"),
                       sections))
    if NO_MLFLOW:
        return
    import mlflow

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{HERE.parent / 'mlflow.db'}"))
    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name="quick" if quick else "full"):
        mlflow.log_params({"machine": machine, "quick": quick})
        mlflow.log_metrics(figures)


if __name__ == "__main__":
    main()
