"""Z-Image as a family: training with flow matching on the tiny Z-Image (Qwen3 sequences of varying length, cached
padded with a mask), the kohya file (the original checkpoint's names, q/k/v fused in ``attention.qkv``) read back
by ComfyUI's rule written here from comfy/lora.py and comfy/utils.py ``z_image_to_diffusers``, diffusers' own
reader (``ZImagePipeline.load_lora_weights``: its non-diffusers converter) on that file against our diffusers
folder, downloaded kohya, ComfyUI, ai-toolkit and musubi-tuner files stacked, module counts on the real config, and
an exact resume. diffusers' Z-Image converter splits ``qkv`` by thirds and hard-codes no width: the tiny one does.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file
from train_helpers import (
    assert_same_run,
    make_params,
    outputs_through_diffusers,
    random_lora_pair,
    straight_and_resumed,
    summary_for,
)

from lora_pipeline.core.cache import DiskCache
from lora_pipeline.demo.tiny_models import Z_IMAGE_TRANSFORMER_CONFIG
from lora_pipeline.diffusion.families import Z_IMAGE, detect_family, lora_header_family
from lora_pipeline.diffusion.families.z_image import BLOCK_LINEARS
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.lora_files import build_kohya_file, kohya_modules, save_diffusers_lora, save_lora_file
from lora_pipeline.diffusion.stack import load_stack, set_weights
from lora_pipeline.diffusion.training import train

SETTINGS = dict(max_steps=6, save_steps=2, lora_rank=4, alpha=2, learning_rate=5e-3, dropout=0.1,
                caption_dropout=0.2, lr_scheduler="cosine", lr_warmup_steps=2)

# The original Z-Image module (ComfyUI's model keys, after ``diffusion_model.``) -> the diffusers modules whose
# output rows it stacks, in order: this test's own table, from comfy/utils.py ``z_image_to_diffusers``.
ORIGINAL_TO_DIFFUSERS = {"attention.qkv": ("attention.to_q", "attention.to_k", "attention.to_v"),
                         "attention.out": ("attention.to_out.0",), "feed_forward.w1": ("feed_forward.w1",),
                         "feed_forward.w2": ("feed_forward.w2",), "feed_forward.w3": ("feed_forward.w3",),
                         "adaLN_modulation.0": ("adaLN_modulation.0",)}


def comfy_table(transformer) -> dict[str, tuple[str, ...]]:
    """``{kohya name: diffusers modules}`` as ComfyUI maps them (``lora_unet_`` + the original path, ``.`` -> ``_``)
    for the blocks this transformer has."""
    table = {}
    for kind in ("layers", "noise_refiner", "context_refiner"):
        for index in range(len(getattr(transformer, kind))):
            for original, parts in ORIGINAL_TO_DIFFUSERS.items():
                paths = tuple(f"{kind}.{index}.{p}" for p in parts)
                if all(p in dict(transformer.named_modules()) for p in paths):
                    table[f"lora_unet_{kind}_{index}_{original}".replace(".", "_")] = paths
    return table


@torch.no_grad()
def apply_comfy_rule(transformer, modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]], strength: float):
    """ComfyUI's LoRA patch: weight += strength * alpha / rank * up @ down, the rows of a fused module split over its
    diffusers parts in order (``qkv``: thirds)."""
    table = comfy_table(transformer)
    for name, (down, up, alpha) in modules.items():
        delta = strength * alpha / down.shape[0] * (up.float() @ down.float())
        rows = 0
        for path in table[name]:
            layer = transformer.get_submodule(path)
            layer.weight += delta[rows:rows + layer.out_features].to(layer.weight.dtype)
            rows += layer.out_features
        assert rows == delta.shape[0], name


@pytest.fixture(scope="module")
def z_trained(tiny_models, tiny_examples, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("z_image")
    params = make_params(tiny_models, tmp, base_model=str(tiny_models["tiny-z-image"]), **SETTINGS)
    components = load_diffusion_model(params.base_model)
    result = train(components, tiny_examples, params, DiskCache(tmp / "cache"), dataset_hash="d")
    summary = summary_for(params, result.spec, family="z_image", unet_layout={}, recipe=Z_IMAGE.recipe(params, None))
    return {"components": components, "result": result, "params": params, "tmp": tmp, "summary": summary}


@torch.no_grad()
def _out(transformer) -> torch.Tensor:
    """Two images at two times, with captions of different lengths (the second shorter), as ZImagePipeline calls."""
    transformer.eval()
    generator, config = torch.Generator().manual_seed(0), transformer.config
    latents = [torch.randn(config.in_channels, 1, 8, 8, generator=generator) for _ in range(2)]
    captions = [torch.randn(length, config.cap_feat_dim, generator=generator) for length in (12, 5)]
    return torch.stack(transformer(latents, torch.tensor([0.3, 0.8]), captions, return_dict=False)[0])


def test_z_image_is_detected_and_trains_musubis_default_targets(z_trained, tiny_models):
    components, result = z_trained["components"], z_trained["result"]
    assert components.family is Z_IMAGE and detect_family(str(tiny_models["tiny-z-image"])) is Z_IMAGE
    assert detect_family(str(tiny_models["tiny-chroma"])) is not Z_IMAGE
    assert result.steps == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    trained = {k.split(".lora_")[0] for k in result.lora_state}
    assert {"transformer.layers.0.attention.to_q", "transformer.layers.1.attention.to_out.0",
            "transformer.layers.1.feed_forward.w2"} <= trained
    assert not any("refiner" in k or "adaLN" in k or "text_encoder" in k for k in trained)


def test_the_denoiser_call_is_the_pipelines_reversed_time_and_negated_output(tiny_models):
    """What ZImagePipeline gives the transformer at sigma (its time) and does with its output (negates it into the
    velocity the Euler step integrates), against the family's training call."""
    from diffusers import ZImagePipeline

    from lora_pipeline.diffusion.families import Conditioning, NoisedBatch

    pipe = ZImagePipeline.from_pretrained(str(tiny_models["tiny-z-image"]))
    seen, forward = [], pipe.transformer.forward

    def recording(x, t, cap_feats, **kwargs):
        seen.append((t.clone(), forward(x, t, cap_feats, **kwargs)[0]))
        return (seen[-1][1],)

    pipe.transformer.forward = recording
    pipe(prompt="lorachar", height=64, width=64, sigmas=[0.7], guidance_scale=0.0, output_type="latent",
         generator=torch.Generator().manual_seed(0))
    sigma = pipe.scheduler.sigmas[0].item()  # 0.7 after the scheduler's shift
    assert 0.5 < sigma < 1 and seen[0][0].item() == pytest.approx(1 - sigma)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = Conditioning(torch.randn(1, 6, 32), mask=torch.tensor([[1.0] * 4 + [0.0] * 2]))
    raw = torch.stack(pipe.transformer.forward(list(latents.unsqueeze(2)), torch.tensor([1 - sigma]),
                                               [cond.hidden[0, :4]])[0]).squeeze(2)
    pred = Z_IMAGE.predict(pipe.transformer, NoisedBatch(latents, torch.tensor([sigma]), latents), cond, None,
                           torch.float32)
    assert seen[-1][0].item() == pytest.approx(1 - sigma) and torch.allclose(pred, -raw)


def test_prompts_of_different_lengths_are_cached_padded_with_their_mask(z_trained):
    components = z_trained["components"]
    from diffusers import ZImagePipeline

    texts = ["lorachar, red circle on a white background", "cat"]
    cond = Z_IMAGE.encode_prompt([components.text_encoders[0]], [components.tokenizers[0]], texts, torch.device("cpu"))
    pipe = ZImagePipeline(scheduler=None, vae=None, text_encoder=components.text_encoders[0],
                          tokenizer=components.tokenizers[0], transformer=None)
    own, _ = pipe.encode_prompt(list(texts), device="cpu", do_classifier_free_guidance=False,
                                max_sequence_length=cond.hidden.shape[1])
    assert cond.mask.sum(dim=1).tolist() == [len(s) for s in own] and len(own[0]) > len(own[1])
    for index, sequence in enumerate(own):
        assert torch.equal(cond.hidden[index][cond.mask[index]], sequence)
        assert not cond.hidden[index][~cond.mask[index]].any()


def test_the_kohya_file_reproduces_the_trained_transformer_by_comfyuis_rule(z_trained):
    from diffusers import ZImageTransformer2DModel

    components, result, summary = z_trained["components"], z_trained["result"], z_trained["summary"]
    state, header = build_kohya_file(result.lora_state, summary, summary.unet_config(), "fp32", "t", "tiny")
    assert header["ss_base_model_version"] == "z_image" and header["modelspec.architecture"] == "Z-Image/lora"
    assert lora_header_family(header) is Z_IMAGE
    modules = kohya_modules(state)
    assert {"lora_unet_layers_0_attention_qkv", "lora_unet_layers_1_attention_out",
            "lora_unet_layers_0_feed_forward_w3"} <= modules.keys()
    assert not any("to_q" in name or "to_out" in name for name in modules)
    base = ZImageTransformer2DModel.from_pretrained(z_trained["params"].base_model, subfolder="transformer")
    before = _out(base)
    apply_comfy_rule(base, {n: (p["down"], p["up"], float(p["alpha"])) for n, p in modules.items()}, 1.0)
    trained = _out(components.denoiser)
    effect = (trained - before).abs().max().item()
    assert effect > 1e-4
    assert (_out(base) - trained).abs().max().item() < 1e-4 * max(1.0, effect)


def test_diffusers_reader_on_the_kohya_file_equals_our_diffusers_folder(z_trained):
    from diffusers import ZImagePipeline

    components, result, summary = z_trained["components"], z_trained["result"], z_trained["summary"]
    state, header = build_kohya_file(result.lora_state, summary, summary.unet_config(), "fp32", "t", "tiny")
    kohya_path = z_trained["tmp"] / "z_kohya.safetensors"
    save_lora_file(kohya_path, state, header)
    folder = save_diffusers_lora(z_trained["tmp"] / "z_diffusers", result.lora_state, summary)
    outputs = outputs_through_diffusers(ZImagePipeline, z_trained["params"].base_model, {"kohya": kohya_path, "diffusers": folder}, _out)
    trained = _out(components.denoiser)
    assert torch.allclose(outputs["diffusers"], trained, atol=1e-5)
    assert torch.allclose(outputs["kohya"], outputs["diffusers"], atol=1e-5)


def test_downloaded_kohya_comfyui_ai_toolkit_and_musubi_loras_stack_by_the_rule(tiny_models, tmp_path):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(str(tiny_models["tiny-z-image"]))
    base = _out(pipe.transformer)
    generator, table = torch.Generator().manual_seed(3), comfy_table(pipe.transformer)
    # a: kohya / musubi's ComfyUI conversion (fused qkv); b: ComfyUI's dotted original names, lora_A / lora_B
    rule = {"a": {n: random_lora_pair(pipe.transformer, table[n], 2, generator) for n in
                  ("lora_unet_layers_0_attention_qkv", "lora_unet_noise_refiner_0_adaLN_modulation_0")},
            "b": {n: random_lora_pair(pipe.transformer, table[n], 2, generator) for n in
                  ("lora_unet_layers_1_attention_out", "lora_unet_context_refiner_0_feed_forward_w3")}}
    # c: ai-toolkit's diffusion_model.<diffusers path> and musubi's own lora_unet_<diffusers path>, one module each
    split = {"diffusion_model.layers.1.attention.to_k": "layers.1.attention.to_k",
             "lora_unet_layers_0_attention_to_v": "layers.0.attention.to_v"}
    c = {name: random_lora_pair(pipe.transformer, (path,), 2, generator) for name, path in split.items()}
    state_a = {f"{n}.{k}": v for n, (d, u, a) in rule["a"].items()
               for k, v in (("lora_down.weight", d), ("lora_up.weight", u), ("alpha", torch.tensor(a).half()))}
    state_b = {}
    for name, (d, u, a) in rule["b"].items():
        original = re.sub(r"^lora_unet_(layers|noise_refiner|context_refiner)_(\d+)_", r"diffusion_model.\1.\2.", name)
        original = original.replace("attention_out", "attention.out").replace("feed_forward_w3", "feed_forward.w3")
        state_b.update({f"{original}.lora_A.weight": d, f"{original}.lora_B.weight": u,
                        f"{original}.alpha": torch.tensor(a).half()})
    state_c = {}
    for name, (d, u, a) in c.items():
        down, up = ("lora_A", "lora_B") if name.startswith("diffusion_model.") else ("lora_down", "lora_up")
        state_c.update({f"{name}.{down}.weight": d, f"{name}.{up}.weight": u, f"{name}.alpha": torch.tensor(a).half()})
    for file, state in (("a", state_a), ("b", state_b), ("c", state_c)):
        save_file(state, tmp_path / f"{file}.safetensors")
    load_stack(pipe, Z_IMAGE, {f: str(tmp_path / f"{f}.safetensors") for f in "abc"})
    set_weights(pipe, {"a": 0.6, "b": 0.8, "c": 0.5})
    reference = ZImagePipeline.from_pretrained(str(tiny_models["tiny-z-image"]))
    apply_comfy_rule(reference.transformer, rule["a"], 0.6)
    apply_comfy_rule(reference.transformer, rule["b"], 0.8)
    with torch.no_grad():
        for name, (d, u, a) in c.items():
            reference.transformer.get_submodule(split[name]).weight += 0.5 * a / d.shape[0] * (u.float() @ d.float())
    expected = _out(reference.transformer)
    effect = (expected - base).abs().max().item()
    assert effect > 1e-3 and (_out(pipe.transformer) - expected).abs().max().item() < 1e-3 * effect


def test_default_targets_on_the_real_z_image_config_match_musubis_module_count():
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        model = ZImageTransformer2DModel(**Z_IMAGE_TRANSFORMER_CONFIG)
    targeted = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(BLOCK_LINEARS, n)]
    assert len(targeted) == 30 * 7 == 210  # q, k, v, out, w1, w2, w3 of each main layer
    pairs = {(Z_IMAGE.denoiser, n): (torch.zeros(1, 1), torch.zeros(2, 1)) for n in targeted}
    assert len(Z_IMAGE.to_kohya_modules(pairs, 1.0, model.config)) == 30 * 5 == 150  # qkv fused


def test_interrupted_then_resumed_z_image_run_equals_uninterrupted(tiny_models, tiny_examples, tmp_path):
    assert_same_run(*straight_and_resumed(tiny_models, tiny_examples, tmp_path, str(tiny_models["tiny-z-image"]),
                                          **SETTINGS, shuffle_tags=True))
