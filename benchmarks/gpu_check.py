"""What the CPU-only suite cannot check, run on a CUDA machine: prints figures, exits 1 if a check fails.

    python benchmarks/gpu_check.py [--steps 40]

- the diffusion trainer on CUDA in fp32, fp16 and bf16, for SD1.x and SDXL (tiny models, real architectures):
  losses finite, images/s, peak memory, and its sample images rendered after the last step (the UNet in the
  training dtype, the VAE in fp32: on CUDA a dtype mismatch raises where the CPU may let it pass);
- generation in fp16 and bf16 on CUDA: a UNet and text encoders in that dtype beside an fp32 VAE, and the
  generation stage on a base saved in that dtype (a merged model, a downloaded fp16 checkpoint);
- the exported kohya file, read back by diffusers' own ``load_lora_weights`` on the GPU, reproduces the trained
  UNet's output (and differs from the base's, so the comparison can fail);
- run-to-run determinism on CUDA, and a crashed run resumed from its checkpoint against an uninterrupted one;
- the LLM LoRA in bf16 on CUDA, its adapter reloaded with PEFT giving the trained model's logits;
- Flux.1 with ``training.base_quantization`` nf4 (bitsandbytes) and float8 (torchao): the tiny Flux loaded
  quantized onto the GPU, a LoRA trained on it in bf16 with gradient checkpointing (losses finite, every LoRA up
  weight moved), the text encoders off the GPU after caching, its sample rendered, the kohya file exported and read back (``--only quantization``; needs
  ``pip install 'lora_pipeline[quantization]'``).

Not a test: CI has no GPU. The suite checks all of this on CPU; this script says whether it also holds on a GPU.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import click  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

FAILED: list[str] = []
DEVICE = "cuda"


def check(ok: bool, what: str) -> None:
    print(f"  [{'ok' if ok else 'FAILED'}] {what}", flush=True)
    if not ok:
        FAILED.append(what)


def make_examples(folder: Path):
    from lora_pipeline.core.files import sha256_file
    from lora_pipeline.diffusion.training import Example

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    captions = ["sks, red circle", "sks, blue square", "sks, green stripes", "sks, yellow circle"]
    examples = []
    for index in range(8):
        size = (64, 64) if index < 6 else (96, 64)  # two aspect buckets
        path = folder / f"img_{index}.png"
        Image.fromarray((rng.random((size[1], size[0], 3)) * 64 + index * 20).astype(np.uint8)).save(path)
        examples.append(Example(path, captions[index % 4], size[0], size[1], sha256_file(path)))
    return examples


class Crash(Exception):
    """Raised from the step callback: a run dying mid-way (after a checkpoint, before the end)."""


def train_once(base: Path, examples, work: Path, name: str, mixed: str, steps: int, **overrides):
    from lora_pipeline.core.cache import DiskCache
    from lora_pipeline.core.config import TrainingParams
    from lora_pipeline.diffusion.loading import load_diffusion_model
    from lora_pipeline.diffusion.training import train

    callback = overrides.pop("_callback", None)
    params = TrainingParams(**{**dict(base_model=str(base), device=DEVICE, mixed_precision=mixed, lora_rank=4,
                                      alpha=8, batch_size=2, max_steps=steps, learning_rate=1e-3, dropout=0.1,
                                      checkpoint_dir=str(work / "ckpt"), resume="none", output_name=name),
                               **overrides})
    components = load_diffusion_model(params.base_model)
    result = train(components, examples, params, DiskCache(work / "cache"), dataset_hash="gpu", step_callback=callback)
    return components, result


def fp32_forward(model):
    """The model without the autocast wrapper that accelerate puts on a mixed-precision model's forward."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_fp32_wrapper=False)


@torch.no_grad()
def unet_output(unet, seed: int = 0) -> torch.Tensor:
    """The UNet's prediction on fixed inputs, fp32 on the GPU (SDXL gets its pooled text and time ids)."""
    unet = fp32_forward(unet)
    torch.backends.cuda.matmul.allow_tf32 = False  # training turns TF32 on; compare in true fp32
    torch.backends.cudnn.allow_tf32 = False
    unet = getattr(unet, "module", unet).to(DEVICE, torch.float32).eval()
    config = unet.config
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, config.in_channels, 8, 8, generator=g)
    hidden = torch.randn(2, 77, config.cross_attention_dim, generator=g)
    kwargs = {}
    if config.addition_embed_type == "text_time":  # SDXL
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=g).to(DEVICE),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2).to(DEVICE)}
    return unet(sample.to(DEVICE), torch.tensor([10, 500]).to(DEVICE), hidden.to(DEVICE), **kwargs).sample.float().cpu()


def diffusers_reads_the_export(base: Path, components, result, work: Path) -> float:
    """Relative max difference between the LoRA's effect on the trained UNet and on diffusers' pipeline with the
    exported file loaded.

    The effect (output with the LoRA minus output without it) is compared, not the outputs: after fp16/bf16
    training the trained UNet's frozen weights are rounded to that dtype, while diffusers loads the fp32 base.
    """
    from safetensors.torch import save_file

    from lora_pipeline.diffusion.lora_files import to_kohya_state_dict

    kohya = to_kohya_state_dict(result.lora_state, components.family, 8.0, components.unet.config, dtype=torch.float32)
    path = work / f"{components.family.name}.safetensors"
    save_file(kohya, str(path))
    unet = fp32_forward(components.unet)
    trained = unet_output(unet)
    unet.disable_adapters()
    trained_base = unet_output(unet)
    unet.enable_adapters()
    pipe = components.family.pipeline_class().from_pretrained(str(base), dtype=torch.float32).to(DEVICE)
    base_out = unet_output(pipe.unet)
    pipe.load_lora_weights(str(path), adapter_name="gpu_check")
    loaded = unet_output(pipe.unet)
    effect = trained - trained_base
    size = effect.abs().max().item()
    check(size > 1e-3 * trained.abs().max().item(),
          f"{components.family.name}: the LoRA changes the UNet's output (max {size:.2e})")
    return ((loaded - base_out) - effect).abs().max().item() / size


def diffusion_checks(models: dict[str, Path], examples, root: Path, steps: int) -> None:
    for model in ("tiny-sd", "tiny-sdxl"):
        for mixed in ("no", "fp16", "bf16"):
            work = root / f"{model}-{mixed}"
            print(f"{model}, mixed_precision={mixed}, {steps} steps", flush=True)
            started = time.perf_counter()
            components, result = train_once(models[model], examples, work, "gpu", mixed, steps,
                                            sample_prompts=["sks, red circle"], sample_size=64,
                                            sample_inference_steps=4)
            seconds = time.perf_counter() - started
            losses = result.losses
            check(all(np.isfinite(losses)), f"losses finite (first 5 mean {np.mean(losses[:5]):.4f}, "
                                            f"last 5 mean {np.mean(losses[-5:]):.4f})")
            check(result.sample_error is None and len(result.samples) == 1 and is_picture(result.samples[0]),
                  f"the sample after the last step renders at 64x64 ({result.sample_error or 'no error'})")
            print(f"  {result.images_per_second:.1f} img/s in the loop, {seconds:.1f} s with loading, "
                  f"peak {result.peak_memory_mb:.0f} MB", flush=True)
            diff = diffusers_reads_the_export(models[model], components, result, work)
            limit = 1e-3 if mixed == "no" else 2e-2  # fp16/bf16: the effect on rounded vs fp32 base weights
            check(diff < limit, f"diffusers' load_lora_weights reproduces the LoRA's effect on the trained UNet "
                                f"(relative max diff {diff:.2e}, limit {limit:g})")
            del components
            torch.cuda.empty_cache()


def is_picture(image, size=(64, 64)) -> bool:
    """The right size and not one flat colour (NaN latents decode to black)."""
    return image.size == size and float(np.asarray(image, dtype=float).std()) > 1.0


def precision_checks(models: dict[str, Path], root: Path) -> None:
    from lora_pipeline.core.config import PromptSpec
    from lora_pipeline.diffusion.generation import render
    from lora_pipeline.diffusion.loading import load_diffusion_model
    from lora_pipeline.pipelines.generation.nodes import generate_images

    spec = PromptSpec(prompt="-", steps=4, width=64, height=64)
    for model in ("tiny-sd", "tiny-sdxl"):
        for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            print(f"{model}, generation in {name}", flush=True)
            components = load_diffusion_model(str(models[model]))
            for module in (components.unet, *components.text_encoders):
                module.to(DEVICE, dtype)
            pipe = components.pipeline().to(DEVICE)
            pipe.set_progress_bar_config(disable=True)
            try:
                ok, note = is_picture(render(pipe, "sks, red circle", spec, 0)), ""
            except RuntimeError as exc:
                ok, note = False, f": {exc}"
            check(ok, f"render: UNet and text encoders in {name}, VAE in fp32{note}")
            base = root / f"{model}-saved-{name}"
            components.pipeline().to(dtype=dtype).save_pretrained(base)
            params = {"base_model": str(base), "lora_dirs": [str(root)], "device": DEVICE, "prompt": "sks, red circle",
                      "comparison_weights": [1.0], "thumbnail": 32,
                      "defaults": {"prompt": "-", "steps": 4, "width": 64, "height": 64}}
            try:
                images, _, _ = generate_images(params, {"metadata": {}})
                ok, note = is_picture(next(iter(images.values()))), ""
            except RuntimeError as exc:
                ok, note = False, f": {exc}"
            check(ok, f"generation stage on a base saved in {name}{note}")
            del components, pipe
            torch.cuda.empty_cache()


def determinism_and_resume(models: dict[str, Path], examples, root: Path) -> None:
    for mixed in ("no", "bf16"):
        print(f"tiny-sd, {mixed}: two identical runs, and a crash at step 13 resumed from checkpoint 10", flush=True)
        runs = [train_once(models["tiny-sd"], examples, root / f"same-{mixed}-{i}", "same", mixed, 20)[1]
                for i in range(2)]
        same = max((runs[0].lora_state[k] - runs[1].lora_state[k]).abs().max().item() for k in runs[0].lora_state)
        check(same == 0.0, f"identical inputs give identical LoRA weights on CUDA (max diff {same:.2e})")

        def crash(step, _sd):
            if step == 13:  # noqa: PLR2004
                raise Crash

        work = root / f"resume-{mixed}"
        try:
            train_once(models["tiny-sd"], examples, work, "resume", mixed, 20, save_steps=10, _callback=crash)
        except Crash:
            pass
        _, resumed = train_once(models["tiny-sd"], examples, work, "resume", mixed, 20, save_steps=10,
                                resume="latest")
        check(resumed.resumed_from is not None and resumed.resumed_from.endswith("checkpoint-0000010"),
              f"resumed from {resumed.resumed_from}")
        diff = max((resumed.lora_state[k] - runs[0].lora_state[k]).abs().max().item() for k in runs[0].lora_state)
        check(diff == 0.0, f"crash + resume equals an uninterrupted run (max diff {diff:.2e})")


def llm_checks(models: dict[str, Path], root: Path) -> None:
    from peft import PeftModel

    from lora_pipeline.core.config import LLMTrainingParams
    from lora_pipeline.llm.training import load_causal_lm, train_causal_lm

    print("tiny Llama, bf16 on CUDA", flush=True)
    model, tokenizer = load_causal_lm(str(models["tiny-llm"]))
    rng = np.random.default_rng(0)
    items = []
    for i in range(32):
        prompt = tokenizer(f"question {i}: what is {i} plus one?").input_ids
        answer = tokenizer(f" {i + 1}", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        items.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer,
                      "attention_mask": [1] * (len(prompt) + len(answer))})
    rng.shuffle(items)
    params = LLMTrainingParams(base_model=str(models["tiny-llm"]), device=DEVICE, mixed_precision="bf16",
                               max_steps=60, batch_size=8, learning_rate=2e-3, lora_rank=8, alpha=16,
                               checkpoint_dir=str(root / "llm-ckpt"), resume="none", output_name="gpu_llm")
    started = time.perf_counter()
    trained_model = []
    result = train_causal_lm(model, tokenizer, items[:28], items[28:], params, dataset_hash="gpu",
                             step_callback=lambda step, peft_model: trained_model[:1] or trained_model.append(peft_model))
    losses = result.losses
    print(f"  {time.perf_counter() - started:.1f} s, loss {np.mean(losses[:5]):.3f} -> {np.mean(losses[-5:]):.3f}")
    check(all(np.isfinite(losses)) and np.mean(losses[-5:]) < np.mean(losses[:5]), "LLM loss finite and going down")
    peft_model = fp32_forward(trained_model[0])
    adapter = root / "llm-adapter"
    peft_model.save_pretrained(str(adapter))
    batch = torch.tensor([items[0]["input_ids"]]).to(DEVICE)
    with torch.no_grad():
        trained = peft_model.to(DEVICE, torch.float32).eval()(batch).logits.float().cpu()
        base, _ = load_causal_lm(str(models["tiny-llm"]))
        reloaded = PeftModel.from_pretrained(base, str(adapter)).to(DEVICE, torch.float32).eval()(batch).logits
    diff = (reloaded.float().cpu() - trained).abs().max().item()
    check(diff < 1e-4, f"PEFT reloads the saved adapter with the trained logits (max diff {diff:.2e})")


def quantization_checks(models: dict[str, Path], examples, root: Path, steps: int) -> None:
    from safetensors.torch import load_file, save_file

    from lora_pipeline.core.cache import DiskCache
    from lora_pipeline.core.config import TrainingParams
    from lora_pipeline.diffusion.families import FLUX
    from lora_pipeline.diffusion.loading import load_diffusion_model, quantize_denoiser, quantized_with
    from lora_pipeline.diffusion.lora_files import kohya_modules, to_kohya_state_dict
    from lora_pipeline.diffusion.training import train

    base = models["tiny-flux"]
    for method in ("nf4", "float8"):
        print(f"tiny-flux, base_quantization={method}, mixed_precision=bf16, {steps} steps", flush=True)
        work = root / f"flux-{method}"
        if DEVICE == "cuda":
            components = load_diffusion_model(str(base), base_quantization=method, device="cuda")
        else:  # --cpu-smoke: the loader refuses a CPU; quantize as it does after its CUDA check
            components = load_diffusion_model(str(base))
            quantize_denoiser(components.denoiser, method, DEVICE)
        weight = components.denoiser.transformer_blocks[0].attn.to_q.weight
        stored = type(weight).__name__
        check(quantized_with(components.denoiser) == method and stored in ("Params4bit", "Float8Tensor")
              and weight.device.type == DEVICE, f"loaded quantized: the block Linears hold {stored} on {weight.device}")
        params = TrainingParams(base_model=str(base), device=DEVICE, mixed_precision="bf16", base_quantization=method,
                                lora_rank=4, alpha=4, batch_size=2, max_steps=steps, learning_rate=1e-3,
                                checkpoint_dir=str(work / "ckpt"), resume="none", output_name=f"flux_{method}",
                                sample_prompts=["sks, red circle"], sample_size=64, sample_inference_steps=4)
        started = time.perf_counter()
        try:
            result = train(components, examples, params, DiskCache(work / "cache"), dataset_hash="gpu")
        except Exception as exc:  # report and go on to the other method
            check(False, f"{method}: training failed: {type(exc).__name__}: {exc}")
            continue
        losses = result.losses
        check(all(np.isfinite(losses)), f"losses finite (first 5 mean {np.mean(losses[:5]):.4f}, "
                                        f"last 5 mean {np.mean(losses[-5:]):.4f})")
        check(all(next(te.parameters()).device.type == "cpu" for te in components.text_encoders),
              "CLIP-L and T5 are off the GPU once their outputs are cached (and came back for the sample)")
        denoiser = getattr(components.denoiser, "module", components.denoiser)
        check(bool(denoiser.gradient_checkpointing), "gradient checkpointing on (the quantized-base default)")
        ups = [v for k, v in result.lora_state.items() if "lora_B" in k]
        check(bool(ups) and all(v.abs().max() > 0 for v in ups), f"all {len(ups)} LoRA up weights trained")
        check(result.sample_error is None and len(result.samples) == 1 and is_picture(result.samples[0]),
              f"the sample renders through the quantized transformer ({result.sample_error or 'no error'})")
        print(f"  {result.images_per_second:.1f} img/s in the loop, {time.perf_counter() - started:.1f} s, "
              f"peak {result.peak_memory_mb:.0f} MB", flush=True)
        path = work / f"flux_{method}.safetensors"
        save_file(to_kohya_state_dict(result.lora_state, FLUX, params.alpha, None, torch.float16), str(path))
        modules = kohya_modules(load_file(str(path)))
        check("lora_unet_double_blocks_0_img_attn_qkv" in modules and "lora_unet_single_blocks_0_linear1" in modules
              and all(torch.isfinite(p).all() for parts in modules.values() for p in parts.values()),
              f"the kohya file is written and read back ({len(modules)} modules, fused qkv/linear1)")
        del components
        torch.cuda.empty_cache()


@click.command(help=__doc__)
@click.option("--steps", type=int, default=40, show_default=True)
@click.option("--only", multiple=True, help="checks, repeated or comma-separated: diffusion precision resume llm "
                                            "quantization")
@click.option("--cpu-smoke", is_flag=True, hidden=True)  # try the script itself on CPU
def main(steps: int, only: tuple[str, ...], cpu_smoke: bool) -> None:
    global DEVICE
    only = [name for value in only for name in value.split(",") if name] or ["diffusion", "precision", "resume", "llm",
                                                                            "quantization"]
    if cpu_smoke:
        DEVICE = "cpu"
        torch.cuda.empty_cache = lambda: None
        torch.cuda.get_device_name = lambda: "CPU (smoke run)"
    elif not torch.cuda.is_available():
        sys.exit("No CUDA device: this script checks GPU behaviour; run it on a machine with one.")
    from lora_pipeline.demo.tiny_models import build_all

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    models = build_all(root / "models")
    examples = make_examples(root / "images")
    if "diffusion" in only:
        diffusion_checks(models, examples, root, steps)
    if "precision" in only:
        precision_checks(models, root)
    if "resume" in only:
        determinism_and_resume(models, examples, root)
    if "llm" in only:
        llm_checks(models, root)
    if "quantization" in only:
        quantization_checks(models, examples, root, steps)
    print(f"\n{len(FAILED)} check(s) failed" + (":\n  " + "\n  ".join(FAILED) if FAILED else ""))
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
