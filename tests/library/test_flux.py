"""Flux.1 as a family: training with flow matching on the tiny Flux, the kohya file (fused qkv / linear1) read
back by a rule written here, and the diffusers file through diffusers' own FluxPipeline.load_lora_weights."""

from __future__ import annotations

import pytest
import torch
from train_helpers import flux_transformer_inputs, make_params, summary_for

from lora_pipeline.core.cache import DiskCache
from lora_pipeline.diffusion.families import FLUX, detect_family
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.lora_files import kohya_modules, save_diffusers_lora, to_kohya_state_dict
from lora_pipeline.diffusion.training import train


@pytest.fixture(scope="module")
def flux_trained(tiny_models, tiny_examples, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flux")
    params = make_params(tiny_models, tmp, base_model=str(tiny_models["tiny-flux"]), max_steps=6, lora_rank=4,
                         alpha=2, learning_rate=5e-3)
    components = load_diffusion_model(params.base_model)
    result = train(components, tiny_examples, params, DiskCache(tmp / "cache"), dataset_hash="d")
    return {"components": components, "result": result, "params": params, "tmp": tmp}


@torch.no_grad()
def _out(transformer) -> torch.Tensor:
    transformer.eval()
    return transformer(**flux_transformer_inputs(transformer), return_dict=False)[0]


def test_flux_is_detected_and_trains_its_transformer(flux_trained, tiny_models):
    components, result = flux_trained["components"], flux_trained["result"]
    assert components.family is FLUX and detect_family(str(tiny_models["tiny-flux"])) is FLUX
    assert result.steps == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    trained = {k.split(".lora_")[0] for k in result.lora_state}
    assert "transformer.transformer_blocks.0.attn.to_q" in trained  # kohya's default: every block Linear
    assert "transformer.single_transformer_blocks.1.proj_mlp" in trained
    assert "transformer.proj_out" not in trained and not any("x_embedder" in k for k in trained)  # not blocks


def _kohya_rule_here(transformer, kohya_state) -> None:
    """Apply a kohya Flux file as WebUI/ComfyUI do (W += alpha/r * up @ down), with the fused qkv / linear1 rows
    cut back to diffusers' modules: written here, independently of the project's name mapping."""
    h = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    blocks = {}
    for i in range(transformer.config.num_layers):
        b = f"transformer_blocks.{i}."
        blocks[f"double_blocks_{i}_img_attn_qkv"] = [b + "attn.to_q", b + "attn.to_k", b + "attn.to_v"]
        blocks[f"double_blocks_{i}_txt_attn_qkv"] = [b + "attn.add_q_proj", b + "attn.add_k_proj", b + "attn.add_v_proj"]
        for bfl, ours in (("img_attn_proj", "attn.to_out.0"), ("txt_attn_proj", "attn.to_add_out"),
                          ("img_mlp_0", "ff.net.0.proj"), ("img_mlp_2", "ff.net.2"), ("txt_mlp_0", "ff_context.net.0.proj"),
                          ("txt_mlp_2", "ff_context.net.2"), ("img_mod_lin", "norm1.linear"),
                          ("txt_mod_lin", "norm1_context.linear")):
            blocks[f"double_blocks_{i}_{bfl}"] = [b + ours]
    for i in range(transformer.config.num_single_layers):
        b = f"single_transformer_blocks.{i}."
        blocks[f"single_blocks_{i}_linear1"] = [b + "attn.to_q", b + "attn.to_k", b + "attn.to_v", b + "proj_mlp"]
        blocks[f"single_blocks_{i}_linear2"] = [b + "proj_out"]
        blocks[f"single_blocks_{i}_modulation_lin"] = [b + "norm.linear"]
    modules = dict(transformer.named_modules())
    with torch.no_grad():
        for name, parts in kohya_modules(kohya_state).items():
            delta = float(parts["alpha"]) / parts["down"].shape[0] * parts["up"].float() @ parts["down"].float()
            row = 0
            for path in blocks[name.removeprefix("lora_unet_")]:
                weight = modules[path].weight
                weight += delta[row:row + weight.shape[0]]
                row += weight.shape[0]
            assert row == delta.shape[0] and (len(blocks[name.removeprefix("lora_unet_")]) == 1 or h > 0)


def test_the_kohya_file_reproduces_the_trained_transformer(flux_trained):
    from diffusers import FluxTransformer2DModel

    components, result, params = flux_trained["components"], flux_trained["result"], flux_trained["params"]
    state = to_kohya_state_dict(result.lora_state, FLUX, params.alpha, None, torch.float32)
    names = {k.split(".")[0] for k in state}
    assert "lora_unet_double_blocks_0_img_attn_qkv" in names and "lora_unet_single_blocks_1_linear1" in names
    assert not any("to_q" in n or "proj_mlp" in n for n in names)  # fused, as kohya writes them
    qkv = kohya_modules(state)["lora_unet_double_blocks_0_img_attn_qkv"]
    assert qkv["down"].shape[0] == 3 * params.lora_rank and float(qkv["alpha"]) == 3 * params.alpha  # same strength
    base = FluxTransformer2DModel.from_pretrained(params.base_model, subfolder="transformer")
    before = _out(base)
    _kohya_rule_here(base, state)
    trained = _out(components.denoiser)
    effect = (trained - before).abs().max()
    assert effect > 1e-4  # the LoRA changes the output ...
    assert (_out(base) - trained).abs().max() < 1e-4 * max(1.0, effect.item())  # ... and the file carries all of it


def test_diffusers_loads_the_diffusers_folder_with_the_trained_effect(flux_trained):
    from diffusers import FluxPipeline

    components, result, params = flux_trained["components"], flux_trained["result"], flux_trained["params"]
    summary = summary_for(params, result.spec, family="flux")
    folder = save_diffusers_lora(flux_trained["tmp"] / "flux_diffusers", result.lora_state, summary)
    pipe = FluxPipeline.from_pretrained(params.base_model)
    before = _out(pipe.transformer)
    pipe.load_lora_weights(str(folder))
    after, trained = _out(pipe.transformer), _out(components.denoiser)
    assert (after - before).abs().max() > 1e-4
    assert torch.allclose(after, trained, atol=1e-5)


def test_a_retrain_starts_from_the_exported_kohya_file_at_the_trained_rank(flux_trained, tmp_path):
    """init_lora from our fused kohya file: each of q/k/v (and linear1's parts) gets its own rank-r pair back,
    so the retrain has the rank it trained at and reproduces the trained transformer at step 0."""
    from safetensors.torch import save_file

    from lora_pipeline.diffusion.lora_files import read_lora_modules, to_peft_state
    from lora_pipeline.diffusion.training import inject_lora, load_lora_state, lora_spec

    components, result, params = flux_trained["components"], flux_trained["result"], flux_trained["params"]
    save_file(to_kohya_state_dict(result.lora_state, FLUX, params.alpha, None, torch.float32), tmp_path / "k.safetensors")
    fresh = load_diffusion_model(params.base_model)
    init = to_peft_state(read_lora_modules(tmp_path / "k.safetensors", FLUX, fresh.modules()),
                         target_scale=params.alpha / params.lora_rank)
    assert init.keys() == result.lora_state.keys()
    assert all(init[k].shape == result.lora_state[k].shape for k in init)  # rank 4 everywhere, not 12 or 16
    inject_lora(fresh, lora_spec(params, FLUX))
    load_lora_state(fresh, init, "init")
    assert torch.allclose(_out(fresh.denoiser), _out(components.denoiser), atol=1e-5)


@pytest.mark.parametrize("t5_tokens", [512, 64])
def test_the_t5_tokenizers_length_is_the_sequence_of_training_and_of_flux_pipelines_sampling(tiny_models, t5_tokens):
    # 512 as Flux.1-dev's tokenizer; 64 as the demo's pre-trained tiny Flux.1 (demo/pretrain_flux.py)
    components = load_diffusion_model(str(tiny_models["tiny-flux"]))
    components.tokenizers[1].model_max_length = t5_tokens
    pipe = components.pipeline()
    kwargs = components.family.prompt_kwargs(pipe, "lorachar, circle", None, None)
    with torch.no_grad():
        trained_on = components.encode_prompt(["lorachar, circle"], torch.device("cpu"))
        sampled_with, pooled, _ = pipe.encode_prompt(kwargs["prompt"], prompt_2=None, device="cpu",
                                                     max_sequence_length=kwargs["max_sequence_length"])
    assert kwargs["max_sequence_length"] == trained_on.hidden.shape[1] == t5_tokens
    assert torch.allclose(sampled_with, trained_on.hidden) and torch.allclose(pooled, trained_on.pooled)
