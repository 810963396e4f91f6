"""Stable Diffusion 3.5 as a family: training with flow matching on the tiny SD3.5 (Medium-like: x-block
self-attention in its first block), the kohya file read back by ComfyUI's rule written here (its
``mmdit_to_diffusers`` table, the last block's swapped modulation halves included), the diffusers folder through
diffusers' own ``StableDiffusion3Pipeline.load_lora_weights``, kohya module counts on the real SD3.5 configs,
and an exact resume."""

from __future__ import annotations

import pytest
import torch
from comfyui_rules import apply_mmdit_rule
from safetensors.torch import save_file
from train_helpers import assert_same_run, make_params, straight_and_resumed, summary_for

from lora_pipeline.core.cache import DiskCache
from lora_pipeline.demo.tiny_models import SD35_LARGE_TRANSFORMER_CONFIG, SD35_MEDIUM_TRANSFORMER_CONFIG
from lora_pipeline.diffusion.families import SD3, detect_family
from lora_pipeline.diffusion.families.sd3 import BLOCK_LINEARS
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.lora_files import (
    build_kohya_file,
    kohya_modules,
    read_lora_modules,
    save_diffusers_lora,
    to_peft_state,
)
from lora_pipeline.diffusion.training import inject_lora, load_lora_state, lora_spec, train

SETTINGS = dict(max_steps=6, save_steps=2, lora_rank=4, alpha=2, learning_rate=5e-3, dropout=0.1,
                caption_dropout=0.2, lr_scheduler="cosine", lr_warmup_steps=2)


@pytest.fixture(scope="module")
def sd3_trained(tiny_models, tiny_examples, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd3")
    params = make_params(tiny_models, tmp, base_model=str(tiny_models["tiny-sd3"]), **SETTINGS)
    components = load_diffusion_model(params.base_model)
    result = train(components, tiny_examples, params, DiskCache(tmp / "cache"), dataset_hash="d")
    summary = summary_for(params, result.spec, family="sd3",
                          unet_layout=SD3.naming_layout(components.denoiser.config), recipe=SD3.recipe(params, None))
    return {"components": components, "result": result, "params": params, "tmp": tmp, "summary": summary}


@torch.no_grad()
def _out(transformer) -> torch.Tensor:
    transformer.eval()
    generator, config = torch.Generator().manual_seed(0), transformer.config
    return transformer(hidden_states=torch.randn(2, 16, 8, 8, generator=generator),
                       encoder_hidden_states=torch.randn(2, 12, config.joint_attention_dim, generator=generator),
                       pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=generator),
                       timestep=torch.tensor([300.0, 800.0]), return_dict=False)[0]


def _comfyui_rule(transformer, kohya_state) -> int:
    modules = kohya_modules(kohya_state)
    apply_mmdit_rule(transformer, {name: (p["down"], p["up"], float(p["alpha"])) for name, p in modules.items()}, 1.0)
    return len(modules)


def test_sd3_is_detected_and_trains_every_joint_block_linear(sd3_trained, tiny_models):
    components, result = sd3_trained["components"], sd3_trained["result"]
    assert components.family is SD3 and detect_family(str(tiny_models["tiny-sd3"])) is SD3
    assert result.steps == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    trained = {k.split(".lora_")[0] for k in result.lora_state}
    assert {"transformer.transformer_blocks.0.attn2.to_q", "transformer.transformer_blocks.1.norm1_context.linear",
            "transformer.transformer_blocks.0.ff_context.net.2"} <= trained
    assert not any("proj_out" in k or "context_embedder" in k or "pos_embed" in k for k in trained)


def test_the_kohya_file_reproduces_the_trained_transformer_by_comfyuis_rule(sd3_trained):
    from diffusers import SD3Transformer2DModel

    components, result, params = sd3_trained["components"], sd3_trained["result"], sd3_trained["params"]
    summary = sd3_trained["summary"]
    state, header = build_kohya_file(result.lora_state, summary, summary.unet_config(), "fp32", "t", "tiny")
    names = {k.split(".")[0] for k in state}
    assert {"lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_0_x_block_attn2_qkv",
            "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1"} <= names
    assert not any("to_q" in n or "add_q_proj" in n for n in names)  # fused, as the original MMDiT has them
    assert header["ss_base_model_version"] == "5-medium"
    assert header["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    base = SD3Transformer2DModel.from_pretrained(params.base_model, subfolder="transformer")
    before = _out(base)
    assert _comfyui_rule(base, state) == len(names)
    trained = _out(components.denoiser)
    effect = (trained - before).abs().max().item()
    assert effect > 1e-4
    assert (_out(base) - trained).abs().max().item() < 1e-4 * max(1.0, effect)


def test_diffusers_loads_the_diffusers_folder_with_the_trained_effect(sd3_trained):
    from diffusers import StableDiffusion3Pipeline

    components, result, params = sd3_trained["components"], sd3_trained["result"], sd3_trained["params"]
    folder = save_diffusers_lora(sd3_trained["tmp"] / "sd3_diffusers", result.lora_state, sd3_trained["summary"])
    pipe = StableDiffusion3Pipeline.from_pretrained(params.base_model)
    before = _out(pipe.transformer)
    pipe.load_lora_weights(str(folder))
    after, trained = _out(pipe.transformer), _out(components.denoiser)
    assert (after - before).abs().max() > 1e-4
    assert torch.allclose(after, trained, atol=1e-5)


def test_a_retrain_starts_from_the_kohya_file_at_the_trained_rank(sd3_trained, tmp_path):
    components, result, params = sd3_trained["components"], sd3_trained["result"], sd3_trained["params"]
    summary = sd3_trained["summary"]
    state, header = build_kohya_file(result.lora_state, summary, summary.unet_config(), "fp32", "t", "tiny")
    save_file(state, tmp_path / "k.safetensors")
    fresh = load_diffusion_model(params.base_model)
    init = to_peft_state(read_lora_modules(tmp_path / "k.safetensors", SD3, fresh.modules()),
                         target_scale=params.alpha / params.lora_rank)
    assert init.keys() == result.lora_state.keys()
    assert all(torch.allclose(init[k], result.lora_state[k], atol=1e-6) for k in init)  # swap undone too
    inject_lora(fresh, lora_spec(params, SD3))
    load_lora_state(fresh, init, "init")
    assert torch.allclose(_out(fresh.denoiser), _out(components.denoiser), atol=1e-5)


@pytest.mark.parametrize(("config", "diffusers_modules", "kohya_modules_expected"), [
    # Large: 38 joint blocks; x half qkv, proj, fc1, fc2, adaLN (5 kohya, 7 diffusers), the same for the context
    # half, except in the last block (context_pre_only): its qkv and adaLN only (2 kohya, 4 diffusers)
    (SD35_LARGE_TRANSFORMER_CONFIG, 37 * 14 + 7 + 4, 37 * 10 + 5 + 2),
    # Medium: 24 blocks, the first 13 with x-block self-attention (attn2: qkv + proj, 4 diffusers modules)
    (SD35_MEDIUM_TRANSFORMER_CONFIG, 23 * 14 + 7 + 4 + 13 * 4, 23 * 10 + 5 + 2 + 13 * 2),
], ids=["sd3.5-large", "sd3.5-medium"])
def test_default_targets_on_the_real_sd35_configs_match_kohyas_module_count(config, diffusers_modules,
                                                                            kohya_modules_expected):
    import re

    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    targeted = [name for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) and re.fullmatch(BLOCK_LINEARS, name)]
    assert len(targeted) == diffusers_modules
    pairs = {(SD3.denoiser, name): (torch.zeros(1, 1), torch.zeros(2, 1)) for name in targeted}
    assert len(SD3.to_kohya_modules(pairs, 1.0, model.config)) == kohya_modules_expected
    every_block_linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                          and n.startswith("transformer_blocks.")]
    assert sorted(targeted) == sorted(every_block_linear)  # kohya: every Linear of the joint blocks


def test_interrupted_then_resumed_sd3_run_equals_uninterrupted(tiny_models, tiny_examples, tmp_path):
    assert_same_run(*straight_and_resumed(tiny_models, tiny_examples, tmp_path, str(tiny_models["tiny-sd3"]),
                                          **SETTINGS, shuffle_tags=True))
