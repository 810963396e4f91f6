"""A single-file Flux transformer as the base -- ``flux1-dev.safetensors`` as ComfyUI users keep it in
``models/diffusion_models``: the transformer alone, in BFL's original layout -- with ``single_file_config`` (a
diffusers Flux folder) for the VAE, text encoders and scheduler.

diffusers' converter (``convert_flux_transformer_checkpoint_to_diffusers``) hard-codes Flux.1's width, so the file
is written here from the real-width Flux (1 + 1 blocks), by a layout table of this test's own."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from train_helpers import real_width_flux

from lora_pipeline.core.errors import ConfigError
from lora_pipeline.diffusion.families import FLUX, detect_family
from lora_pipeline.diffusion.loading import load_diffusion_model

pytestmark = pytest.mark.slow

PLAIN = {  # BFL name -> diffusers name (weights and biases alike)
    "img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
}
DOUBLE = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear", "img_attn.proj": "attn.to_out.0",
          "txt_attn.proj": "attn.to_add_out", "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
          "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2"}
DOUBLE_NORMS = {"img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale":
                "attn.norm_k.weight", "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
                "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight"}
DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}


def bfl_checkpoint(transformer) -> dict[str, torch.Tensor]:
    """The transformer in BFL's layout (what ``flux1-dev.safetensors`` holds)."""
    ours = transformer.state_dict()
    out = {}
    for kind in ("weight", "bias"):
        for bfl, name in PLAIN.items():
            out[f"{bfl}.{kind}"] = ours[f"{name}.{kind}"]
        shift, scale = ours[f"norm_out.linear.{kind}"].chunk(2)  # diffusers keeps (scale, shift): BFL (shift, scale)
        out[f"final_layer.adaLN_modulation.1.{kind}"] = torch.cat([scale, shift])
        for i in range(transformer.config.num_layers):
            for bfl, name in DOUBLE.items():
                out[f"double_blocks.{i}.{bfl}.{kind}"] = ours[f"transformer_blocks.{i}.{name}.{kind}"]
            for bfl, parts in DOUBLE_FUSED.items():
                out[f"double_blocks.{i}.{bfl}.{kind}"] = torch.cat(
                    [ours[f"transformer_blocks.{i}.{p}.{kind}"] for p in parts])
        for i in range(transformer.config.num_single_layers):
            block = f"single_transformer_blocks.{i}."
            out[f"single_blocks.{i}.linear1.{kind}"] = torch.cat(
                [ours[block + f"{p}.{kind}"] for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")])
            out[f"single_blocks.{i}.linear2.{kind}"] = ours[block + f"proj_out.{kind}"]
            out[f"single_blocks.{i}.modulation.lin.{kind}"] = ours[block + f"norm.linear.{kind}"]
    for i in range(transformer.config.num_layers):
        for bfl, name in DOUBLE_NORMS.items():
            out[f"double_blocks.{i}.{bfl}"] = ours[f"transformer_blocks.{i}.{name}"]
    for i in range(transformer.config.num_single_layers):
        out[f"single_blocks.{i}.norm.query_norm.scale"] = ours[f"single_transformer_blocks.{i}.attn.norm_q.weight"]
        out[f"single_blocks.{i}.norm.key_norm.scale"] = ours[f"single_transformer_blocks.{i}.attn.norm_k.weight"]
    assert sum(t.numel() for t in out.values()) == sum(t.numel() for t in ours.values())  # nothing left out
    return {k: v.contiguous() for k, v in out.items()}


def test_a_bfl_flux_transformer_file_loads_as_the_base_with_single_file_config_holding_the_rest(tiny_models, tmp_path):
    from diffusers import FluxTransformer2DModel

    folder = real_width_flux(tiny_models["tiny-flux"], tmp_path / "flux-wide")
    original = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    checkpoint = tmp_path / "flux1-dev.safetensors"
    save_file(bfl_checkpoint(original), checkpoint)
    assert detect_family(checkpoint) is FLUX

    with pytest.raises(ValueError, match="single_file_config"):
        load_diffusion_model(str(checkpoint))
    components = load_diffusion_model(str(checkpoint), single_file_config=str(folder))
    assert components.family is FLUX and components.vae is not None and len(components.text_encoders) == 2
    loaded, expected = components.denoiser.state_dict(), original.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)  # every weight, norm_out's swap included

    for weights in (folder / "vae").glob("*.safetensors"):  # a config folder with configs only
        weights.unlink()
    with pytest.raises(ConfigError, match="must hold the other components' weights"):
        load_diffusion_model(str(checkpoint), single_file_config=str(folder))
