"""LoRA training memory and step FLOPs for the other transformer families, from their real configs on the meta
device (no weights, no GPU): SD3.5 Large, SD3.5 Medium, Chroma, Z-Image, Flux.2 and
Qwen-Image.

    python benchmarks/transformer_memory.py [--family sd3.5-large] [--rank 16] [--no-write]

For each: the frozen transformer's exact bytes per ``training.base_quantization`` (bf16, nf4, float8: the storage
rules of flux_memory.py, which documents them), the LoRA at ``--rank`` on the family's default targets with its
fp32 gradients and AdamW moments, the text encoders in bf16, and the matmul FLOPs of one training step on one
1024 px image counted by torch's ``FlopCounterMode`` over a forward and backward of the meta model with the LoRA
injected (gradient checkpointing adds about one more forward). Flux.1 has its own script (flux_memory.py), which
also derives the FLOPs analytically. Written to benchmarks/RESULTS.md under "## <family> memory".
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any, Callable

import click
import torch
from flux_memory import CLIP_L_CONFIG, GIB, HERE, T5_XXL_CONFIG, frozen_bytes, write_section

# OpenCLIP ViT-bigG's text tower, as SD3's text_encoder_2 (CLIPTextModelWithProjection)
CLIP_G_CONFIG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                     num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
IMAGE_LATENT = 128  # 1024 px / 8


@dataclass(frozen=True)
class Case:
    title: str
    transformer_class: str
    config: dict[str, Any]
    targets: str  # the family's default LoRA targets (a PEFT regex)
    text_encoders: dict[str, tuple[str, dict[str, Any]]]  # name -> (transformers class, config)
    inputs: Callable[[Any], dict[str, torch.Tensor]]  # the model's config -> one 1024 px image's inputs


def _sd3_inputs(config) -> dict[str, torch.Tensor]:
    return dict(hidden_states=torch.randn(1, 16, IMAGE_LATENT, IMAGE_LATENT),
                encoder_hidden_states=torch.randn(1, 77 + 256, config.joint_attention_dim),
                pooled_projections=torch.randn(1, config.pooled_projection_dim), timestep=torch.tensor([500.0]))


def _chroma_inputs(config) -> dict[str, torch.Tensor]:
    image = (IMAGE_LATENT // 2) ** 2
    return dict(hidden_states=torch.randn(1, image, config.in_channels),
                encoder_hidden_states=torch.randn(1, 512, config.joint_attention_dim), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(image, 3), txt_ids=torch.zeros(512, 3))


Z_IMAGE_CAPTION = 512  # ZImagePipeline's max_sequence_length: the longest caption (it drops a prompt's padding)


FLUX2_CAPTION = 512  # Flux2Pipeline's max_sequence_length (padded: every prompt is this long)


def _flux2_inputs(config) -> dict[str, torch.Tensor]:
    """Flux2Pipeline's call: 64x64 tokens of the 128-channel patchified latent, 4-axis ids, sigma, guidance."""
    image = (IMAGE_LATENT // 2) ** 2
    return dict(hidden_states=torch.randn(1, image, config.in_channels),
                encoder_hidden_states=torch.randn(1, FLUX2_CAPTION, config.joint_attention_dim),
                timestep=torch.tensor([0.5]), guidance=torch.tensor([1.0]), img_ids=torch.zeros(1, image, 4),
                txt_ids=torch.zeros(1, FLUX2_CAPTION, 4))


QWEN_IMAGE_CAPTION = 512  # one 512-token caption (QwenImagePipeline pads a batch to its longest, at most 1024)


def _qwen_image_inputs(config) -> dict[str, Any]:
    """QwenImagePipeline's call: 64x64 tokens of 2x2-packed latents with their img_shapes, the caption, sigma."""
    side = IMAGE_LATENT // 2
    return dict(hidden_states=torch.randn(1, side * side, config.in_channels),
                encoder_hidden_states=torch.randn(1, QWEN_IMAGE_CAPTION, config.joint_attention_dim),
                encoder_hidden_states_mask=torch.ones(1, QWEN_IMAGE_CAPTION, dtype=torch.bool),
                timestep=torch.tensor([0.5]), img_shapes=[[(1, side, side)]])


def _z_image_inputs(config) -> dict[str, Any]:
    """ZImagePipeline's call: one (C, 1, H, W) latent and one caption per image, time 1 - sigma."""
    return dict(x=[torch.randn(config.in_channels, 1, IMAGE_LATENT, IMAGE_LATENT)], t=torch.tensor([0.5]),
                cap_feats=[torch.randn(Z_IMAGE_CAPTION, config.cap_feat_dim)])


def cases() -> dict[str, Case]:
    from lora_pipeline.demo.tiny_models import (
        CHROMA_TRANSFORMER_CONFIG,
        FLUX2_TRANSFORMER_CONFIG,
        MISTRAL3_24B_CONFIG,
        QWEN3_4B_CONFIG,
        QWEN25_VL_7B_TEXT_CONFIG,
        QWEN_IMAGE_TRANSFORMER_CONFIG,
        SD35_LARGE_TRANSFORMER_CONFIG,
        SD35_MEDIUM_TRANSFORMER_CONFIG,
        Z_IMAGE_TRANSFORMER_CONFIG,
    )
    from lora_pipeline.diffusion.families.flux import BLOCK_LINEARS as FLUX_BLOCKS
    from lora_pipeline.diffusion.families.flux2 import BLOCK_LINEARS as FLUX2_BLOCKS
    from lora_pipeline.diffusion.families.qwen_image import BLOCK_LINEARS as QWEN_IMAGE_BLOCKS
    from lora_pipeline.diffusion.families.sd3 import BLOCK_LINEARS as SD3_BLOCKS
    from lora_pipeline.diffusion.families.z_image import BLOCK_LINEARS as Z_IMAGE_BLOCKS

    sd3_encoders = {"CLIP-L": ("CLIPTextModelWithProjection", CLIP_L_CONFIG),
                    "CLIP-G": ("CLIPTextModelWithProjection", CLIP_G_CONFIG), "T5-XXL": ("T5EncoderModel", T5_XXL_CONFIG)}
    return {
        "sd3.5-large": Case("SD3.5 Large", "SD3Transformer2DModel", SD35_LARGE_TRANSFORMER_CONFIG, SD3_BLOCKS,
                            sd3_encoders, _sd3_inputs),
        "sd3.5-medium": Case("SD3.5 Medium", "SD3Transformer2DModel", SD35_MEDIUM_TRANSFORMER_CONFIG, SD3_BLOCKS,
                             sd3_encoders, _sd3_inputs),
        "chroma": Case("Chroma", "ChromaTransformer2DModel", CHROMA_TRANSFORMER_CONFIG, FLUX_BLOCKS,
                       {"T5-XXL": ("T5EncoderModel", T5_XXL_CONFIG)}, _chroma_inputs),
        "z-image": Case("Z-Image", "ZImageTransformer2DModel", Z_IMAGE_TRANSFORMER_CONFIG, Z_IMAGE_BLOCKS,
                        {"Qwen3-4B": ("Qwen3Model", QWEN3_4B_CONFIG)}, _z_image_inputs),
        # Qwen2.5-VL-7B's language model (the vision tower and lm_head the pipeline also loads are not counted)
        "qwen-image": Case("Qwen-Image", "QwenImageTransformer2DModel", QWEN_IMAGE_TRANSFORMER_CONFIG,
                           QWEN_IMAGE_BLOCKS, {"Qwen2.5-VL-7B (language model)": ("Qwen2_5_VLTextModel",
                                                                               QWEN25_VL_7B_TEXT_CONFIG)},
                           _qwen_image_inputs),
        "flux2": Case("Flux.2 dev", "Flux2Transformer2DModel", FLUX2_TRANSFORMER_CONFIG, FLUX2_BLOCKS,
                      {"Mistral-Small-3.1-24B": ("Mistral3ForConditionalGeneration", MISTRAL3_24B_CONFIG)},
                      _flux2_inputs),
    }


def _meta(case: Case):
    import diffusers

    with torch.device("meta"):
        return getattr(diffusers, case.transformer_class)(**case.config)


def _encoder_params(class_name: str, config: dict[str, Any]) -> int:
    import transformers

    model_class = getattr(transformers, class_name)
    with torch.device("meta"):
        model = model_class(model_class.config_class(**config))
    return sum(p.numel() for p in model.parameters())


def _step_flops(case: Case, rank: int) -> tuple[float, float]:
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    model = _meta(case)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=case.targets))
    model.train()
    with torch.device("meta"):
        inputs = case.inputs(model.config)
        with FlopCounterMode(display=False) as counter:
            out = model(**inputs, return_dict=False)[0]
            if isinstance(out, list):  # Z-Image: one output per image
                out = torch.stack(out)
        forward = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            out.float().pow(2).mean().backward()
        backward = counter.get_total_flops()
    return float(forward), float(backward)


def report(name: str, rank: int) -> str:
    case = cases()[name]
    model = _meta(case)
    frozen = frozen_bytes(model)
    targets = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(case.targets, n)]
    lora_params = sum(rank * (m.in_features + m.out_features) for m in targets)
    trainable = 16 * lora_params  # fp32 weights, gradients and AdamW's two moments
    encoders = {label: _encoder_params(*spec) for label, spec in case.text_encoders.items()}
    encoder_bytes = 2 * sum(encoders.values())
    forward, backward = _step_flops(case, rank)
    lines = [
        f"## {case.title} memory", "",
        f"`python benchmarks/transformer_memory.py --family {name}` (meta device, the real config; torch "
        f"{torch.__version__}). Exact bytes, GiB = 2^30 bytes; activations, the VAE and CUDA workspace not counted.",
        "",
        f"Transformer ({case.transformer_class}): {frozen['params']:,} parameters, {frozen['linear_layers']} Linear "
        f"weights. LoRA at rank {rank} on the default targets ({len(targets)} Linears): {lora_params:,} parameters; "
        f"weights, gradients and AdamW moments in fp32: {trainable / GIB:.3f} GiB.", "",
        "| frozen transformer (`training.base_quantization`) | GiB | + LoRA, grads, AdamW | + text encoders (bf16) |",
        "| --- | --- | --- | --- |",
    ]
    for key, label in (("bf16", "none (bf16)"), ("float8", "float8"), ("nf4", "nf4")):
        lines.append(f"| {label} | {frozen[key] / GIB:.2f} | {(frozen[key] + trainable) / GIB:.2f} | "
                     f"{(frozen[key] + trainable + encoder_bytes) / GIB:.2f} |")
    lines += ["", "Text encoders (bf16; on the GPU only while their outputs are cached): " + ", ".join(
        f"{label} {count:,} parameters = {2 * count / GIB:.2f} GiB" for label, count in encoders.items()) + ".", "",
        f"One training step on one 1024 px image (FlopCounterMode, LoRA injected): forward {forward / 1e12:.2f}, "
        f"backward {backward / 1e12:.2f}, step {(forward + backward) / 1e12:.2f} TFLOP; with gradient checkpointing "
        f"about {(2 * forward + backward) / 1e12:.2f}."]
    return "\n".join(lines) + "\n"


@click.command(help=__doc__)
@click.option("--family", "families", multiple=True, type=click.Choice(["sd3.5-large", "sd3.5-medium", "chroma", "z-image", "flux2",
                                                                        "qwen-image"]),
              help="repeatable; all when not given")
@click.option("--rank", type=int, default=16, show_default=True)
@click.option("--no-write", is_flag=True, help="print only; leave RESULTS.md alone")
def main(families: tuple[str, ...], rank: int, no_write: bool) -> None:
    for name in families or tuple(cases()):
        section = report(name, rank)
        print(section)
        if not no_write:
            write_section(HERE / "RESULTS.md", section)
            print(f"written to {HERE / 'RESULTS.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
