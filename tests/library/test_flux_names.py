"""Flux.1 module names against kohya's original layout, and the fusing rule that keeps a LoRA's strength."""

from __future__ import annotations

import torch

from lora_pipeline.demo.tiny_models import FLUX1_DEV_TRANSFORMER_CONFIG
from lora_pipeline.diffusion.flux_names import fuse, fused_modules, kohya_name, original_name, split


def _block_linears() -> list[str]:
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX1_DEV_TRANSFORMER_CONFIG)
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
            and name.startswith(("transformer_blocks.", "single_transformer_blocks."))]


def test_every_block_linear_of_the_real_flux1_has_its_kohya_module():
    linears = _block_linears()
    assert len(linears) == 19 * 14 + 38 * 6 == 494  # diffusers splits q/k/v (and a single block's MLP input)
    groups = fused_modules(linears)
    assert len(groups) == 19 * 10 + 38 * 3 == 304  # kohya's lora_flux: every Linear of the BFL blocks
    assert sorted(m for g in groups.values() for m in g.parts) == sorted(linears)  # each in exactly one
    names = {kohya_name(g) for g in groups}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_18_txt_mlp_0",
            "lora_unet_double_blocks_3_img_mod_lin", "lora_unet_single_blocks_37_linear1",
            "lora_unet_single_blocks_0_modulation_lin"} <= names
    assert groups["single_blocks.5.linear1"].parts == tuple(f"single_transformer_blocks.5.{p}" for p in (
        "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))  # the original linear1's row order
    assert original_name("x_embedder") is None and original_name("norm_out.linear") is None  # not targeted


def test_fused_lora_adds_what_the_parts_add_at_the_same_strength():
    torch.manual_seed(0)
    rank, alpha, width, outs = 4, 2.0, 16, [16, 16, 16, 40]
    downs = [torch.randn(rank, width) for _ in outs]
    ups = [torch.randn(out, rank) for out in outs]
    down, up, fused_alpha = fuse(downs, ups, alpha)
    fused_delta = fused_alpha / down.shape[0] * up @ down  # what WebUI, ComfyUI and kohya apply
    parts_delta = torch.cat([alpha / rank * u @ d for d, u in zip(downs, ups)])
    assert torch.allclose(fused_delta, parts_delta, atol=1e-5)
    fused_scale = fused_alpha / down.shape[0]  # a split part keeps the fused module's scale
    for (part_down, part_up), expected, d, u in zip(split(down, up, outs), torch.split(parts_delta, outs), downs, ups):
        assert torch.allclose(fused_scale * part_up @ part_down, expected, atol=1e-5)
        assert torch.equal(part_down, d) and torch.equal(part_up, u)  # block-diagonal: each part's own rank-r pair


def test_a_qkv_trained_as_one_module_splits_into_rows_of_the_whole_rank():
    torch.manual_seed(0)
    down, up = torch.randn(6, 16), torch.randn(48, 6)  # dense up: not three LoRAs side by side
    parts = split(down, up, [16, 16, 16])
    assert all(torch.equal(d, down) for d, _ in parts)
    assert torch.equal(torch.cat([u @ d for d, u in parts]), up @ down)
