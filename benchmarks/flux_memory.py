"""Flux.1-dev LoRA training on one GPU: what the weights, the LoRA and its optimizer take, and what a step costs.

    python benchmarks/flux_memory.py [--rank 16] [--no-write] [--no-count]

Everything comes from the real Flux.1-dev transformer config (``FLUX1_DEV_TRANSFORMER_CONFIG``) built on the meta
device: no weights, no GPU. Printed, and written to benchmarks/RESULTS.md under "## Flux.1 memory" (that section
only: the rest of the file is run_all.py's).

- frozen transformer weights, exact bytes per ``training.base_quantization``: bf16 (2 bytes a parameter); nf4 as
  :func:`lora_pipeline.diffusion.loading.quantize_denoiser` stores it with bitsandbytes (every ``nn.Linear``
  weight: 4-bit codes packed two a byte, one uint8 absmax per 64-weight block, those absmax double-quantized
  with one fp32 absmax per 256 blocks, a 256-entry fp32 code map, an fp32 offset and the 16-entry NF4 map per
  layer; biases and every other parameter bf16), and nf4 with plain fp32 absmax (diffusers'/transformers'
  ``BitsAndBytesConfig`` default, no double quant) for comparison; float8 as torchao's
  ``Float8WeightOnlyConfig`` stores it (one e4m3 byte a weight, one fp32 scale per output row). The layouts were
  checked against the tensors bitsandbytes 0.50 and torchao 0.18 actually create (tests/library/test_quantization.py);
- the LoRA at ``--rank`` on kohya's default targets (every Linear of the double and single blocks:
  ``BLOCK_LINEARS``): weights, gradients and AdamW's two moments, all fp32 as the trainer keeps them;
- the text encoders (CLIP-L, T5-XXL) in bf16: the trainer keeps them on the GPU while it fills the text cache;
- the matmul FLOPs of one training step per 1024 px image (4096 image tokens, 512 T5 tokens), counted from the
  config: every Linear (2 x tokens x in x out), attention scores (QK^T and PV over the 4608 joint tokens), the
  LoRA's two small matmuls; backward computes input gradients only where something upstream trains (the frozen
  base has no weight gradients), both operands' gradients of the attention matmuls, and the LoRA's weight
  gradients; gradient checkpointing adds one forward of the blocks. Cross-checked with torch's
  ``FlopCounterMode`` on the meta model (``--no-count`` skips that).

Not counted: activations (they depend on checkpointing, batch and resolution), the VAE (latents are cached), CUDA
workspace and allocator slack.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import click
import torch

HERE = Path(__file__).resolve().parent
SECTION = "## Flux.1 memory"
IMAGE_TOKENS = 4096  # 1024 px: 128x128 latents packed 2x2
TEXT_TOKENS = 512  # T5 length of Flux.1-dev
GIB = 1024**3

# Flux.1's text encoders as published (openai/clip-vit-large-patch14's text tower, google/t5-v1_1-xxl's encoder).
CLIP_L_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
T5_XXL_CONFIG = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                     relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                     use_cache=False)


# ----------------------------------------------------------------------------- bytes of one quantized Linear weight

def nf4_bytes(weights: int, double_quant: bool = True, blocksize: int = 64) -> int:
    """bitsandbytes' 4-bit storage of one weight matrix of ``weights`` elements (quantize_4bit with
    ``compress_statistics=double_quant``): codes, absmax, and the per-layer quant-state tensors."""
    blocks = math.ceil(weights / blocksize)
    codes = math.ceil(weights / 2)  # two 4-bit codes a byte
    nf4_map = 16 * 4  # the 16 NF4 values, fp32
    if not double_quant:
        return codes + 4 * blocks + nf4_map  # one fp32 absmax per block
    # absmax - offset quantized blockwise (256 a block) to uint8 with the 256-entry dynamic map
    return codes + blocks + 4 + 4 * math.ceil(blocks / 256) + 256 * 4 + nf4_map


def float8_bytes(out_features: int, in_features: int) -> int:
    """torchao Float8WeightOnlyConfig (PerRow): e4m3 weights and one fp32 scale per output row."""
    return out_features * in_features + 4 * out_features


# ----------------------------------------------------------------------------- the model on the meta device

def meta_transformer():
    from diffusers import FluxTransformer2DModel

    from lora_pipeline.demo.tiny_models import FLUX1_DEV_TRANSFORMER_CONFIG

    with torch.device("meta"):
        return FluxTransformer2DModel(**FLUX1_DEV_TRANSFORMER_CONFIG)


def frozen_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Exact bytes of the frozen weights per storage: every ``nn.Linear`` weight quantized (what quantize_denoiser
    converts), the rest (biases, norms, embeddings) in bf16."""
    linear_weights = {id(m.weight): m for m in model.modules() if type(m) is torch.nn.Linear}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in linear_weights)
    linears = list(linear_weights.values())
    total = sum(p.numel() for p in model.parameters())
    return {
        "params": total,
        "linear_weight_params": sum(m.weight.numel() for m in linears),
        "linear_layers": len(linears),
        "bf16": 2 * total,
        "nf4": sum(nf4_bytes(m.weight.numel()) for m in linears) + 2 * rest,
        "nf4_fp32_absmax": sum(nf4_bytes(m.weight.numel(), double_quant=False) for m in linears) + 2 * rest,
        "float8": sum(float8_bytes(m.out_features, m.in_features) for m in linears) + 2 * rest,
    }


def lora_targets(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """kohya's default Flux targets, matched as PEFT matches a regex (the whole module path)."""
    from lora_pipeline.diffusion.families.flux import BLOCK_LINEARS

    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and re.fullmatch(BLOCK_LINEARS, name)}


def lora_bytes(model: torch.nn.Module, rank: int) -> dict[str, int]:
    params = sum(rank * (m.in_features + m.out_features) for m in lora_targets(model).values())
    return {"lora_modules": len(lora_targets(model)), "lora_params": params, "lora_weights": 4 * params,
            "lora_grads": 4 * params, "adamw_state": 8 * params}


def text_encoder_bytes() -> dict[str, int]:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG))
        t5 = T5EncoderModel(T5Config(**T5_XXL_CONFIG))
    return {"clip_l_params": sum(p.numel() for p in clip.parameters()),
            "t5_xxl_params": sum(p.numel() for p in t5.parameters())}


# ----------------------------------------------------------------------------- FLOPs

def tokens_of(name: str, image: int, text: int) -> tuple[int, bool]:
    """(tokens a Linear sees per image, whether its input carries a gradient) from its path in the model.

    Modulation Linears (norm*.linear) and the embedders act on the timestep/guidance/pooled embedding or the raw
    inputs: one row, or inputs nothing upstream of which trains."""
    joint = image + text
    if name.startswith("transformer_blocks."):
        if name.endswith(("norm1.linear", "norm1_context.linear")):
            return 1, False
        if ".attn.add_" in name or name.endswith("attn.to_add_out") or ".ff_context." in name:
            return text, True
        return image, True
    if name.startswith("single_transformer_blocks."):
        return (1, False) if name.endswith("norm.linear") else (joint, True)
    if name == "x_embedder":
        return image, False
    if name == "context_embedder":
        return text, False
    if name == "proj_out":
        return image, True
    return 1, False  # time_text_embed.*, norm_out.linear


def step_flops(model: torch.nn.Module, rank: int, image: int = IMAGE_TOKENS, text: int = TEXT_TOKENS
               ) -> dict[str, float]:
    """Matmul FLOPs of one LoRA training step on one image, from the module shapes."""
    config = model.config
    hidden = config.num_attention_heads * config.attention_head_dim
    joint = image + text
    targets = lora_targets(model)
    forward = backward = lora_forward = lora_backward = in_blocks = 0.0
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear:
            continue
        tokens, input_grad = tokens_of(name, image, text)
        flops = 2.0 * tokens * module.in_features * module.out_features
        forward += flops
        backward += flops if input_grad else 0.0  # dX = dY W; a frozen W has no dW
        if "transformer_blocks." in name:
            in_blocks += flops
        if name in targets:
            down, up = 2.0 * tokens * rank * module.in_features, 2.0 * tokens * rank * module.out_features
            lora_forward += down + up
            # dB and dh (= dY B): 2 x up; dA: down; dX through the LoRA: down again where the input has a gradient
            lora_backward += 2 * up + down + (down if input_grad else 0.0)
    blocks = config.num_layers + config.num_single_layers
    attention = blocks * 2 * (2.0 * joint * joint * hidden)  # QK^T and PV, all heads
    total_forward = forward + attention + lora_forward
    total_backward = backward + 2 * attention + lora_backward  # both operands of QK^T and PV need gradients
    recompute = in_blocks + attention + lora_forward  # checkpointing runs every block's forward again
    return {"forward_linear": forward, "forward_attention": attention, "forward_lora": lora_forward,
            "forward": total_forward, "backward": total_backward, "step": total_forward + total_backward,
            "step_checkpointing": total_forward + total_backward + recompute}


def counted_flops(model: torch.nn.Module, rank: int, image: int = IMAGE_TOKENS, text: int = TEXT_TOKENS
                  ) -> dict[str, float]:
    """torch's FlopCounterMode over one forward and backward of the meta model with the LoRA injected."""
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    from lora_pipeline.diffusion.families.flux import BLOCK_LINEARS

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=BLOCK_LINEARS))
    model.train()
    config = model.config
    with torch.device("meta"):
        inputs = dict(hidden_states=torch.randn(1, image, config.in_channels),
                      encoder_hidden_states=torch.randn(1, text, config.joint_attention_dim),
                      pooled_projections=torch.randn(1, config.pooled_projection_dim),
                      timestep=torch.tensor([0.5]), guidance=torch.tensor([1.0]),
                      img_ids=torch.zeros(image, 3), txt_ids=torch.zeros(text, 3))
        with FlopCounterMode(display=False) as counter:
            out = model(**inputs, return_dict=False)[0]
        forward = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            out.float().pow(2).mean().backward()
        backward = counter.get_total_flops()
    return {"forward": float(forward), "backward": float(backward), "step": float(forward + backward)}


# ----------------------------------------------------------------------------- report

def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def report(rank: int, count: bool) -> str:
    model = meta_transformer()
    frozen = frozen_bytes(model)
    lora = lora_bytes(model, rank)
    encoders = text_encoder_bytes()
    flops = step_flops(model, rank)
    counted = counted_flops(model, rank) if count else None
    trainable = lora["lora_weights"] + lora["lora_grads"] + lora["adamw_state"]
    t5, clip = 2 * encoders["t5_xxl_params"], 2 * encoders["clip_l_params"]
    lines = [
        SECTION, "",
        f"`python benchmarks/flux_memory.py` (meta device, real Flux.1-dev config; torch {torch.__version__}). "
        f"Exact bytes, GiB = 2^30 bytes. Not counted: activations, the VAE, CUDA workspace.", "",
        f"Transformer: {frozen['params']:,} parameters, {frozen['linear_weight_params']:,} of them in "
        f"{frozen['linear_layers']} Linear weights (what nf4/float8 quantize; the rest stays bf16).", "",
        "| frozen transformer (`training.base_quantization`) | bytes | GiB | bytes/param |",
        "| --- | --- | --- | --- |",
    ]
    for key, label in (("bf16", "none (bf16)"), ("float8", "float8 (torchao e4m3, fp32 scale per row)"),
                       ("nf4", "nf4 (bitsandbytes, double-quantized absmax: ours)"),
                       ("nf4_fp32_absmax", "nf4 with fp32 absmax (BitsAndBytesConfig default)")):
        lines.append(f"| {label} | {frozen[key]:,} | {frozen[key] / GIB:.2f} | {frozen[key] / frozen['params']:.4f} |")
    lines += [
        "",
        f"LoRA at rank {rank} on kohya's default targets ({lora['lora_modules']} block Linears): "
        f"{lora['lora_params']:,} parameters.", "",
        "| trained part (fp32) | bytes | GiB |", "| --- | --- | --- |",
        f"| LoRA weights | {lora['lora_weights']:,} | {lora['lora_weights'] / GIB:.3f} |",
        f"| LoRA gradients | {lora['lora_grads']:,} | {lora['lora_grads'] / GIB:.3f} |",
        f"| AdamW moments (exp_avg, exp_avg_sq) | {lora['adamw_state']:,} | {lora['adamw_state'] / GIB:.3f} |",
        f"| together | {trainable:,} | {trainable / GIB:.3f} |", "",
        f"Text encoders in bf16 (on the GPU while the text cache fills): T5-XXL {encoders['t5_xxl_params']:,} "
        f"parameters = {gib(t5)}, CLIP-L {encoders['clip_l_params']:,} = {gib(clip)}.", "",
        "| weights + LoRA + grads + AdamW | transformer only | with T5-XXL and CLIP-L in bf16 |",
        "| --- | --- | --- |",
    ]
    for key, label in (("bf16", "none (bf16)"), ("float8", "float8"), ("nf4", "nf4")):
        lines.append(f"| {label} | {gib(frozen[key] + trainable)} | {gib(frozen[key] + trainable + t5 + clip)} |")
    lines += [
        "",
        f"Step FLOPs per 1024 px image ({IMAGE_TOKENS} image + {TEXT_TOKENS} text tokens, rank {rank}), matmuls "
        f"only, counted from the config:", "",
        "| part | TFLOP |", "| --- | --- |",
        f"| forward: Linears (projections, MLPs, modulation, embedders) | {flops['forward_linear'] / 1e12:.2f} |",
        f"| forward: attention scores (QK^T, PV) | {flops['forward_attention'] / 1e12:.2f} |",
        f"| forward: LoRA | {flops['forward_lora'] / 1e12:.3f} |",
        f"| forward | {flops['forward'] / 1e12:.2f} |",
        f"| backward (input grads of the frozen base, LoRA weight grads) | {flops['backward'] / 1e12:.2f} |",
        f"| step (forward + backward) | {flops['step'] / 1e12:.2f} |",
        f"| step with gradient checkpointing (blocks' forward again) | {flops['step_checkpointing'] / 1e12:.2f} |",
    ]
    if counted:
        lines += ["", f"torch FlopCounterMode on the meta model with the LoRA injected: forward "
                      f"{counted['forward'] / 1e12:.2f}, backward {counted['backward'] / 1e12:.2f}, step "
                      f"{counted['step'] / 1e12:.2f} TFLOP (analytic above: {flops['forward'] / 1e12:.2f}, "
                      f"{flops['backward'] / 1e12:.2f}, {flops['step'] / 1e12:.2f})."]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace ``section``'s part of ``path`` (from its heading, its first line, to the next ``## `` heading), or
    append it (transformer_memory.py writes its sections the same way)."""
    heading = section.splitlines()[0]
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("\n" + text[end + 1:] if end >= 0 else "")
    path.write_text(text)


@click.command(help=__doc__)
@click.option("--rank", type=int, default=16, show_default=True)
@click.option("--no-write", is_flag=True, help="print only; leave RESULTS.md alone")
@click.option("--no-count", is_flag=True, help="skip the FlopCounterMode cross-check")
def main(rank: int, no_write: bool, no_count: bool) -> None:
    section = report(rank, not no_count)
    print(section)
    if not no_write:
        write_section(HERE / "RESULTS.md", section)
        print(f"written to {HERE / 'RESULTS.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
