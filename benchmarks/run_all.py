"""lora-pipeline benchmarks: print figures, write benchmarks/RESULTS.md, log to the MLflow 'benchmarks' experiment.

    .venv/bin/python benchmarks/run_all.py            # everything (CPU: ~15-25 min on 2 cores)
    .venv/bin/python benchmarks/run_all.py --quick    # smaller sizes, for a smoke run

Sections: training throughput vs a textbook diffusers+PEFT loop (tiny SD, CPU), data stages at 1k/10k images,
incremental re-run after +1% images, LLM tokens/s vs a bare PEFT loop, peak memory.
Speed targets live here, never in the test suite.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

HERE = Path(__file__).resolve().parent


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- training throughput

def _dataset(folder: Path, n: int, size: int):
    from lora_pipeline.lora.files import sha256_file
    from lora_pipeline.lora.training import Example

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    examples = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(path)
        examples.append(Example(path, f"sks, sample {i % 4}", size, size, sha256_file(path)))
    return examples


def bare_loop(model_dir: str, examples, steps: int, batch: int, rank: int) -> float:
    """The textbook diffusers + PEFT loop (as in diffusers' train_text_to_image_lora.py), images/s."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    from lora_pipeline.config import KOHYA_UNET_TARGETS
    from lora_pipeline.lora.images import load_rgb

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=KOHYA_UNET_TARGETS))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    unet.train()

    def step(i: int) -> None:
        chosen = [examples[(i * batch + k) % len(examples)] for k in range(batch)]
        pixels = torch.stack([torch.from_numpy(np.asarray(load_rgb(e.path), dtype=np.float32)).permute(2, 0, 1)
                              / 127.5 - 1 for e in chosen])
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            ids = tokenizer([e.text for e in chosen], padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            hidden = text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        pred = unet(scheduler.add_noise(latents, noise, t), t, hidden).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)  # as diffusers' train_text_to_image_lora.py does
        optimizer.step()
        optimizer.zero_grad()

    step(0)  # warm-up, as our loop's first step also pays one-off costs before timing matters
    started = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    return steps * batch / (time.perf_counter() - started)


def ours(model_dir: str, examples, steps: int, batch: int, rank: int, cache: bool, workdir: Path) -> float:
    from lora_pipeline.config import TrainingParams
    from lora_pipeline.lora.cache import DiskCache
    from lora_pipeline.lora.sd import load_sd
    from lora_pipeline.lora.training import train

    params = TrainingParams(base_model=model_dir, device="cpu", lora_rank=rank, alpha=rank, batch_size=batch,
                            max_steps=steps, cache_latents=cache, checkpoint_dir=str(workdir / "ckpt"),
                            output_name=f"bench_{random.random():.6f}", resume="none", log_every_steps=10)
    result = train(load_sd(model_dir), examples, params, DiskCache(workdir / "cache"), dataset_hash="bench")
    return result.images_per_second


def bench_training(models: dict[str, Path], quick: bool) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    examples = _dataset(work / "images", 16, 128)
    model = str(models["tiny-sd"])
    steps, batch, rank = (10, 4, 8) if quick else (30, 4, 8)
    ours(model, examples, 2, batch, rank, True, work)  # fills the latent cache: "from the second epoch on"
    rows = {"bare": [], "ours_nocache": [], "ours_cache": []}
    for _ in range(2 if quick else 3):  # interleaved repeats
        rows["bare"].append(bare_loop(model, examples, steps, batch, rank))
        rows["ours_nocache"].append(ours(model, examples, steps, batch, rank, False, work))
        rows["ours_cache"].append(ours(model, examples, steps, batch, rank, True, work))
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {"train_img_s_bare": med["bare"], "train_img_s_ours_nocache": med["ours_nocache"],
            "train_img_s_ours_cache": med["ours_cache"],
            "train_ratio_nocache": statistics.median(o / b for o, b in zip(rows["ours_nocache"], rows["bare"])),
            "train_ratio_cache": statistics.median(o / b for o, b in zip(rows["ours_cache"], rows["bare"]))}


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

    from lora_pipeline.datasets.image_folder import ImageFolderDataset
    from lora_pipeline.lora.cache import DiskCache
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

def bench_llm(models: dict[str, Path], quick: bool) -> dict[str, float]:
    from peft import LoraConfig, get_peft_model

    from lora_pipeline.config import LLMTrainingParams
    from lora_pipeline.lora.llm import load_causal_lm, train_causal_lm
    from lora_pipeline.lora.llm_data import pad_batch, parse_record, tokenize

    model_dir = str(models["tiny-llm"])
    _, tokenizer = load_causal_lm(model_dir)
    convs = [parse_record({"prompt": f"患者：头痛{i}天", "response": "建议休息，多喝水。" * (1 + i % 3)}, i)
             for i in range(64)]
    items = [tokenize(tokenizer, c, None, 128, "truncate") for c in convs]
    steps, batch = (10, 8) if quick else (40, 8)
    ours_rates, bare_rates = [], []
    for _ in range(3):
        work = Path(tempfile.mkdtemp(prefix="bench-llm-"))
        params = LLMTrainingParams(base_model=model_dir, device="cpu", batch_size=batch, max_steps=steps,
                                   checkpoint_dir=str(work), resume="none", lr_scheduler="constant")
        ours_rates.append(train_causal_lm(load_causal_lm(model_dir)[0], tokenizer, items, [], params,
                                          dataset_hash="b").tokens_per_second)
        model = get_peft_model(load_causal_lm(model_dir)[0], LoraConfig(r=16, lora_alpha=32, lora_dropout=0.2,
                                                                        target_modules="all-linear"))
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=2e-4)
        tokens, started = 0, time.perf_counter()
        for s in range(steps):
            if s == 1:
                tokens, started = 0, time.perf_counter()  # steady state, like the loop under test
            chunk = pad_batch(items[(s * batch) % len(items):(s * batch) % len(items) + batch], tokenizer.pad_token_id)
            model(**chunk).loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)  # as TRL/transformers Trainer do by default
            optimizer.step()
            optimizer.zero_grad()
            tokens += int(chunk["attention_mask"].sum())
        bare_rates.append(tokens / (time.perf_counter() - started))
    return {"llm_tok_s_ours": statistics.median(ours_rates), "llm_tok_s_bare": statistics.median(bare_rates),
            "llm_ratio": statistics.median(o / b for o, b in zip(ours_rates, bare_rates))}


# ----------------------------------------------------------------------------- memory

def bench_memory_sd15(checkpointing: bool) -> dict[str, float]:
    """Peak RSS of one LoRA training step of an SD1.5-size UNet (random weights, real config), batch 1, 512 px."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from lora_pipeline.config import KOHYA_UNET_TARGETS
    from lora_pipeline.lora.tiny_models import SD15_UNET_CONFIG

    unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=KOHYA_UNET_TARGETS))
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    started = time.perf_counter()
    pred = unet(torch.randn(1, 4, 64, 64), torch.tensor([500]), torch.randn(1, 77, 768)).sample
    pred.float().pow(2).mean().backward()
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}


# ----------------------------------------------------------------------------- report

TARGETS = {
    "train_ratio_nocache": (">=", 1.0), "train_ratio_cache": (">=", 1.5), "llm_ratio": (">=", 1.0),
    "data_per_image_ratio_large_vs_small": ("<=", 1.2), "incremental_rerun_fraction": ("<=", 0.10),
}


def write_report(figures: dict[str, float], machine: str, path: Path) -> str:
    lines = [f"# Benchmark results\n\nMachine: {machine}\n",
             "| figure | value | target | status |", "| --- | --- | --- | --- |"]
    for name, value in figures.items():
        op, goal = TARGETS.get(name, (None, None))
        status = ""
        if op:
            ok = value >= goal if op == ">=" else value <= goal
            status = "ok" if ok else "**MISSED**"
            if name.endswith("ratio") or "ratio_" in name:
                status += " (REGRESSION < 0.9)" if op == ">=" and value < 0.9 else ""
        lines.append(f"| {name} | {value:.3f} | {op + ' ' + str(goal) if op else ''} | {status} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", default=None, help="training data llm memory")
    parser.add_argument("--data-stage", help=argparse.SUPPRESS)
    parser.add_argument("--memory-stage", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.data_stage:
        work = Path(args.data_stage)
        print(json.dumps(data_stages_once(work / "raw", work / "out", work / "cache")))
        return
    if args.memory_stage:
        print(json.dumps(bench_memory_sd15(args.memory_stage == "checkpointing")))
        return
    from lora_pipeline.lora.tiny_models import build_all

    sections = args.only or ["training", "data", "llm", "memory"]
    models = build_all(Path(tempfile.mkdtemp(prefix="bench-models-")))
    figures: dict[str, float] = {}
    if "training" in sections:
        figures.update(bench_training(models, args.quick))
        print(figures, flush=True)
    if "data" in sections:
        figures.update(bench_data(args.quick))
        print(figures, flush=True)
    if "llm" in sections:
        figures.update(bench_llm(models, args.quick))
        print(figures, flush=True)
    if "memory" in sections and not args.quick:
        for mode in ("checkpointing", "plain"):
            result = _in_subprocess("--memory-stage", mode)
            figures[f"sd15_cpu_fp32_peak_rss_mb_{mode}"] = result["peak_rss_mb"]
            figures[f"sd15_cpu_fp32_step_s_{mode}"] = result["seconds"]
    machine = f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, no GPU"
    print(write_report(figures, machine, HERE / "RESULTS.md"))
    import mlflow

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{HERE.parent / 'mlflow.db'}"))
    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name="quick" if args.quick else "full"):
        mlflow.log_params({"machine": machine, "quick": args.quick})
        mlflow.log_metrics(figures)


if __name__ == "__main__":
    main()
