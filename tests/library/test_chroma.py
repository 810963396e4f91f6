"""Chroma as a family: training with flow matching on the tiny Chroma (T5 with its attention mask, no CLIP, no
modulation Linears in the blocks), the kohya file (Flux's BFL names) read back by ComfyUI's Flux rule written in
tests/comfyui_rules.py, the diffusers folder through ``ChromaPipeline.load_lora_weights``, downloaded kohya and
ComfyUI files stacked, kohya module counts on the real config, and an exact resume. diffusers' own kohya reader on
our file is checked at Chroma's real width in test_flux_diffusers_reader.py's way (the converter hard-codes it)."""

from __future__ import annotations

import re

import pytest
import torch
from comfyui_rules import apply_flux_rule, flux_to_diffusers
from safetensors.torch import save_file
from train_helpers import assert_same_run, make_params, straight_and_resumed, summary_for

from lora_pipeline.core.cache import DiskCache
from lora_pipeline.demo.tiny_models import CHROMA_TRANSFORMER_CONFIG
from lora_pipeline.diffusion.families import CHROMA, detect_family
from lora_pipeline.diffusion.families.flux import BLOCK_LINEARS
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.lora_files import build_kohya_file, kohya_modules, save_diffusers_lora
from lora_pipeline.diffusion.stack import load_stack, set_weights
from lora_pipeline.diffusion.training import train

SETTINGS = dict(max_steps=6, save_steps=2, lora_rank=4, alpha=2, learning_rate=5e-3, dropout=0.1,
                caption_dropout=0.2, lr_scheduler="cosine", lr_warmup_steps=2)


@pytest.fixture(scope="module")
def chroma_trained(tiny_models, tiny_examples, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chroma")
    params = make_params(tiny_models, tmp, base_model=str(tiny_models["tiny-chroma"]), **SETTINGS)
    components = load_diffusion_model(params.base_model)
    result = train(components, tiny_examples, params, DiskCache(tmp / "cache"), dataset_hash="d")
    summary = summary_for(params, result.spec, family="chroma", unet_layout={}, recipe=CHROMA.recipe(params, None))
    return {"components": components, "result": result, "params": params, "tmp": tmp, "summary": summary}


@torch.no_grad()
def _out(transformer) -> torch.Tensor:
    transformer.eval()
    generator, config = torch.Generator().manual_seed(0), transformer.config
    mask = torch.ones(2, 12 + 16, dtype=torch.bool)
    mask[1, 5:12] = False  # the second prompt is shorter: its padding is masked
    return transformer(hidden_states=torch.randn(2, 16, config.in_channels, generator=generator),
                       encoder_hidden_states=torch.randn(2, 12, config.joint_attention_dim, generator=generator),
                       timestep=torch.tensor([0.3, 0.8]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(12, 3),
                       attention_mask=mask, return_dict=False)[0]


def test_chroma_is_detected_and_trains_its_block_linears(chroma_trained, tiny_models):
    components, result = chroma_trained["components"], chroma_trained["result"]
    assert components.family is CHROMA and detect_family(str(tiny_models["tiny-chroma"])) is CHROMA
    assert detect_family(str(tiny_models["tiny-flux"])) is not CHROMA
    assert result.steps == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    trained = {k.split(".lora_")[0] for k in result.lora_state}
    assert {"transformer.transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.1.proj_mlp"} <= trained
    assert not any("distilled_guidance_layer" in k or "text_encoder" in k for k in trained)


def test_the_kohya_file_reproduces_the_trained_transformer_by_comfyuis_flux_rule(chroma_trained):
    from diffusers import ChromaTransformer2DModel

    components, result, summary = chroma_trained["components"], chroma_trained["result"], chroma_trained["summary"]
    state, header = build_kohya_file(result.lora_state, summary, summary.unet_config(), "fp32", "t", "tiny")
    assert header["ss_base_model_version"] == "chroma" and header["modelspec.architecture"] == "chroma/lora"
    assert header["ss_apply_t5_attn_mask"] == "True"
    modules = kohya_modules(state)
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1"} <= modules.keys()
    base = ChromaTransformer2DModel.from_pretrained(chroma_trained["params"].base_model, subfolder="transformer")
    before = _out(base)
    apply_flux_rule(base, {n: (p["down"], p["up"], float(p["alpha"])) for n, p in modules.items()}, 1.0)
    trained = _out(components.denoiser)
    effect = (trained - before).abs().max().item()
    assert effect > 1e-4
    assert (_out(base) - trained).abs().max().item() < 1e-4 * max(1.0, effect)


def test_diffusers_loads_the_diffusers_folder_with_the_trained_effect(chroma_trained):
    from diffusers import ChromaPipeline

    components, result = chroma_trained["components"], chroma_trained["result"]
    folder = save_diffusers_lora(chroma_trained["tmp"] / "chroma_diffusers", result.lora_state,
                                 chroma_trained["summary"])
    pipe = ChromaPipeline.from_pretrained(chroma_trained["params"].base_model)
    before = _out(pipe.transformer)
    pipe.load_lora_weights(str(folder))
    after, trained = _out(pipe.transformer), _out(components.denoiser)
    assert (after - before).abs().max() > 1e-4
    assert torch.allclose(after, trained, atol=1e-5)


def test_downloaded_kohya_and_comfyui_chroma_loras_stack_by_the_rule(tiny_models, tmp_path):
    from diffusers import ChromaPipeline

    pipe = ChromaPipeline.from_pretrained(str(tiny_models["tiny-chroma"]))
    base = _out(pipe.transformer)
    generator = torch.Generator().manual_seed(3)
    table = flux_to_diffusers(2, 2)
    loras = {}
    for file, names in (("a", ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1")),
                        ("b", ("lora_unet_double_blocks_1_txt_mlp_0", "lora_unet_single_blocks_0_linear2"))):
        loras[file] = {}
        for name in names:
            width = pipe.transformer.get_submodule(table[name][0]).in_features
            out = sum(pipe.transformer.get_submodule(p).out_features for p in table[name])
            loras[file][name] = (torch.randn(2, width, generator=generator).half() * 0.2,
                                 torch.randn(out, 2, generator=generator).half() * 0.2, 3.0)
    state_a = {f"{n}.{k}": v for n, (d, u, a) in loras["a"].items()
               for k, v in (("lora_down.weight", d), ("lora_up.weight", u), ("alpha", torch.tensor(a).half()))}
    state_b = {}  # ComfyUI's original names: diffusion_model.<BFL path>, lora_A / lora_B
    for name, (d, u, a) in loras["b"].items():
        bfl = re.sub(r"^lora_unet_(double|single)_blocks_(\d+)_", r"diffusion_model.\1_blocks.\2.", name)
        bfl = bfl.replace("txt_mlp_0", "txt_mlp.0").replace("linear2", "linear2")
        state_b.update({f"{bfl}.lora_A.weight": d, f"{bfl}.lora_B.weight": u, f"{bfl}.alpha": torch.tensor(a).half()})
    save_file(state_a, tmp_path / "a.safetensors")
    save_file(state_b, tmp_path / "b.safetensors")
    load_stack(pipe, CHROMA, {"a": str(tmp_path / "a.safetensors"), "b": str(tmp_path / "b.safetensors")})
    set_weights(pipe, {"a": 0.6, "b": 0.8})
    reference = ChromaPipeline.from_pretrained(str(tiny_models["tiny-chroma"]))
    apply_flux_rule(reference.transformer, loras["a"], 0.6)
    apply_flux_rule(reference.transformer, loras["b"], 0.8)
    expected = _out(reference.transformer)
    effect = (expected - base).abs().max().item()
    assert effect > 1e-3 and (_out(pipe.transformer) - expected).abs().max().item() < 1e-3 * effect


def test_default_targets_on_the_real_chroma_config_match_kohyas_module_count():
    from diffusers import ChromaTransformer2DModel

    with torch.device("meta"):
        model = ChromaTransformer2DModel(**CHROMA_TRANSFORMER_CONFIG)
    targeted = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(BLOCK_LINEARS, n)]
    assert len(targeted) == 19 * 12 + 38 * 5 == 418  # no modulation Linears: Chroma pruned them
    pairs = {(CHROMA.denoiser, n): (torch.zeros(1, 1), torch.zeros(2, 1)) for n in targeted}
    assert len(CHROMA.to_kohya_modules(pairs, 1.0, model.config)) == 19 * 8 + 38 * 2 == 228


def test_interrupted_then_resumed_chroma_run_equals_uninterrupted(tiny_models, tiny_examples, tmp_path):
    assert_same_run(*straight_and_resumed(tiny_models, tiny_examples, tmp_path, str(tiny_models["tiny-chroma"]),
                                          **SETTINGS, shuffle_tags=True))
