"""Qwen-Image as a family: training with flow matching on the tiny Qwen-Image (Qwen2.5-VL sequences of varying
length, the template's first tokens dropped, cached padded with a mask; a video VAE whose latents are normalised
per channel), the kohya file (musubi-tuner's names: diffusers' paths, which are the original checkpoint's) read back
by ComfyUI's rule written here from comfy/lora.py, diffusers' own reader (``QwenImagePipeline.load_lora_weights``:
its non-diffusers converter) on our kohya and ComfyUI files against our diffusers folder, downloaded kohya, ComfyUI,
ai-toolkit and SimpleTuner files stacked, module counts on the real config, the pipeline's own denoiser call and
latent normalisation, and an exact resume.
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
from lora_pipeline.demo.tiny_models import QWEN_IMAGE_TRANSFORMER_CONFIG
from lora_pipeline.diffusion.families import QWEN_IMAGE, detect_family, lora_header_family
from lora_pipeline.diffusion.families.qwen_image import BLOCK_LINEARS
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.lora_files import build_kohya_file, kohya_modules, save_diffusers_lora, save_lora_file
from lora_pipeline.diffusion.stack import load_stack, set_weights
from lora_pipeline.diffusion.training import train

SETTINGS = dict(max_steps=6, save_steps=2, lora_rank=4, alpha=2, learning_rate=5e-3, dropout=0.1,
                caption_dropout=0.2, lr_scheduler="cosine", lr_warmup_steps=2)


def comfy_key_map(transformer) -> dict[str, str]:
    """ComfyUI's LoRA key map for a Qwen-Image model, from comfy/lora.py (``model_lora_keys_unet``: for every
    ``diffusion_model.<p>.weight``, ``lora_unet_<p with . -> _>`` and ``diffusion_model.<p>``; for QwenImage also
    ``<p>``, ``transformer.<p>`` and ``lycoris_<p with . -> _>``) -> the module path ``p`` (this model's keys are the
    original checkpoint's: diffusers' paths)."""
    table = {}
    for key in transformer.state_dict():
        if key.endswith(".weight"):
            path = key[:-len(".weight")]
            for name in (f"lora_unet_{path.replace('.', '_')}", f"diffusion_model.{path}", path,
                         f"transformer.{path}", f"lycoris_{path.replace('.', '_')}"):
                table[name] = path
    return table


@torch.no_grad()
def apply_comfy_rule(transformer, modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]], strength: float):
    """ComfyUI's LoRA patch: weight += strength * alpha / rank * up @ down, one module each (nothing is fused)."""
    table = comfy_key_map(transformer)
    for name, (down, up, alpha) in modules.items():
        layer = transformer.get_submodule(table[name])
        layer.weight += (strength * alpha / down.shape[0] * (up.float() @ down.float())).to(layer.weight.dtype)


@pytest.fixture(scope="module")
def qi_trained(tiny_models, tiny_examples, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qwen_image")
    params = make_params(tiny_models, tmp, base_model=str(tiny_models["tiny-qwen-image"]), **SETTINGS)
    components = load_diffusion_model(params.base_model)
    result = train(components, tiny_examples, params, DiskCache(tmp / "cache"), dataset_hash="d")
    summary = summary_for(params, result.spec, family="qwen_image", unet_layout={},
                          recipe=QWEN_IMAGE.recipe(params, None))
    return {"components": components, "result": result, "params": params, "tmp": tmp, "summary": summary}


@torch.no_grad()
def _out(transformer) -> torch.Tensor:
    """Two packed 8x8-latent images at two times, with captions of different lengths (the second masked shorter),
    as QwenImagePipeline calls the transformer."""
    transformer.eval()
    generator, config = torch.Generator().manual_seed(0), transformer.config
    latents = torch.randn(2, 16, config.in_channels, generator=generator)
    captions = torch.randn(2, 12, config.joint_attention_dim, generator=generator)
    mask = torch.tensor([[True] * 12, [True] * 5 + [False] * 7])
    return transformer(hidden_states=latents, timestep=torch.tensor([0.3, 0.8]), encoder_hidden_states=captions,
                       encoder_hidden_states_mask=mask, img_shapes=[[(1, 4, 4)]] * 2, return_dict=False)[0]


def test_qwen_image_is_detected_and_trains_musubis_default_targets(qi_trained, tiny_models):
    components, result = qi_trained["components"], qi_trained["result"]
    assert components.family is QWEN_IMAGE and detect_family(str(tiny_models["tiny-qwen-image"])) is QWEN_IMAGE
    assert detect_family(str(tiny_models["tiny-z-image"])) is not QWEN_IMAGE
    assert result.steps == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    trained = {k.split(".lora_")[0].removeprefix("transformer.") for k in result.lora_state}
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.add_v_proj", "transformer_blocks.0.attn.to_add_out",
            "transformer_blocks.1.img_mlp.net.0.proj", "transformer_blocks.0.txt_mlp.net.2"} <= trained
    assert len(trained) == 2 * 12
    assert not any("_mod" in k or "text_encoder" in k or not k.startswith("transformer_blocks.") for k in trained)


def test_the_denoiser_call_is_the_pipelines(tiny_models):
    """What QwenImagePipeline gives the transformer at sigma (its time, the latents packed, img_shapes) and that it
    Euler-steps the output as it is, against the family's training call on the unpacked latents."""
    from diffusers import QwenImagePipeline

    from lora_pipeline.diffusion.families import Conditioning, NoisedBatch

    pipe = QwenImagePipeline.from_pretrained(str(tiny_models["tiny-qwen-image"]))
    seen, forward = [], pipe.transformer.forward

    def recording(**kwargs):
        seen.append({**kwargs, "out": forward(**kwargs)[0]})
        return (seen[-1]["out"],)

    pipe.transformer.forward = recording
    pipe(prompt="lorachar", height=64, width=64, sigmas=[0.7, 0.4], output_type="latent",
         generator=torch.Generator().manual_seed(0))
    call, after = seen
    sigma, next_sigma = pipe.scheduler.sigmas[0].item(), pipe.scheduler.sigmas[1].item()
    assert 0.5 < sigma < 1 and call["timestep"].item() == pytest.approx(sigma, abs=1e-6)
    assert call["img_shapes"] == [[(1, 4, 4)]]
    # the Euler step takes the output as it is: the velocity noise - x
    step = call["hidden_states"] + (next_sigma - sigma) * call["out"]
    assert torch.allclose(after["hidden_states"], step, atol=1e-5)
    latents = QwenImagePipeline._unpack_latents(call["hidden_states"], 64, 64, 8).squeeze(2)
    hidden = call["encoder_hidden_states"]
    cond = Conditioning(torch.cat([hidden, hidden.new_zeros(1, 3, hidden.shape[-1])], dim=1),
                        mask=torch.tensor([[1.0] * hidden.shape[1] + [0.0] * 3]))
    pred = QWEN_IMAGE.predict(pipe.transformer, NoisedBatch(latents, torch.tensor([sigma]), latents), cond, None,
                              torch.float32)
    assert torch.allclose(QwenImagePipeline._pack_latents(pred.unsqueeze(2), 1, 16, 8, 8), call["out"], atol=1e-5)


def test_latents_are_normalised_as_the_pipeline_decodes_them(tiny_models):
    """The pipeline decodes ``x / (1 / latents_std) + latents_mean``: a sampled latent of a zero-spread posterior
    mapped back that way is the posterior's mean."""
    from diffusers import AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage.from_pretrained(str(tiny_models["tiny-qwen-image"]), subfolder="vae")
    mean = torch.randn(16, 4, 4)
    latents = QWEN_IMAGE.sample_latents(mean, torch.zeros_like(mean), torch.Generator().manual_seed(0), vae)
    back = latents / (1.0 / torch.tensor(vae.config.latents_std).view(16, 1, 1)) + torch.tensor(
        vae.config.latents_mean).view(16, 1, 1)
    assert torch.allclose(back, mean, atol=1e-5) and not torch.allclose(latents, mean)


def test_prompts_of_different_lengths_are_cached_padded_with_their_mask(qi_trained):
    components = qi_trained["components"]
    from diffusers import QwenImagePipeline

    texts = ["lorachar, red circle on a white background", "cat"]
    cond = QWEN_IMAGE.encode_prompt([components.text_encoders[0]], [components.tokenizers[0]], texts,
                                    torch.device("cpu"))
    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=components.text_encoders[0],
                             tokenizer=components.tokenizers[0], transformer=None)
    assert cond.hidden.shape[1] == QWEN_IMAGE.qwen_length(components.tokenizers[0])
    for index, text in enumerate(texts):  # one prompt at a time: the pipeline's own unpadded sequence
        own, mask = pipe.encode_prompt([text], device="cpu", max_sequence_length=cond.hidden.shape[1])
        assert mask is None and int(cond.mask[index].sum()) == own.shape[1]
        assert torch.allclose(cond.hidden[index][cond.mask[index]], own[0], atol=1e-6)
        assert not cond.hidden[index][~cond.mask[index]].any()
    assert cond.mask[0].sum() > cond.mask[1].sum()


def test_the_kohya_file_reproduces_the_trained_transformer_by_comfyuis_rule(qi_trained):
    from diffusers import QwenImageTransformer2DModel

    components, result, summary = qi_trained["components"], qi_trained["result"], qi_trained["summary"]
    state, header = build_kohya_file(result.lora_state, summary, summary.unet_config(), "fp32", "t", "tiny")
    assert header["ss_base_model_version"] == "qwen_image" and header["modelspec.architecture"] == "Qwen-Image/lora"
    assert lora_header_family(header) is QWEN_IMAGE
    modules = kohya_modules(state)
    assert {"lora_unet_transformer_blocks_0_attn_to_q", "lora_unet_transformer_blocks_1_attn_to_add_out",
            "lora_unet_transformer_blocks_0_img_mlp_net_0_proj"} <= modules.keys() and len(modules) == 24
    base = QwenImageTransformer2DModel.from_pretrained(qi_trained["params"].base_model, subfolder="transformer")
    before = _out(base)
    apply_comfy_rule(base, {n: (p["down"], p["up"], float(p["alpha"])) for n, p in modules.items()}, 1.0)
    trained = _out(components.denoiser)
    effect = (trained - before).abs().max().item()
    assert effect > 1e-4
    assert (_out(base) - trained).abs().max().item() < 1e-4 * max(1.0, effect)


def test_diffusers_reader_on_our_kohya_and_comfyui_files_equals_our_diffusers_folder(qi_trained):
    from diffusers import QwenImagePipeline

    components, result, summary = qi_trained["components"], qi_trained["result"], qi_trained["summary"]
    state, header = build_kohya_file(result.lora_state, summary, summary.unet_config(), "fp32", "t", "tiny")
    kohya_path = qi_trained["tmp"] / "qi_kohya.safetensors"
    save_lora_file(kohya_path, state, header)
    # the same modules as ComfyUI's own saves name them: diffusion_model.<path>.lora_A / lora_B, alpha kept
    from diffusers import QwenImageTransformer2DModel

    table = comfy_key_map(QwenImageTransformer2DModel.from_pretrained(qi_trained["params"].base_model,
                                                                      subfolder="transformer"))
    comfy = {}
    for name, parts in kohya_modules(state).items():
        path = "diffusion_model." + table[name]
        comfy.update({f"{path}.lora_A.weight": parts["down"], f"{path}.lora_B.weight": parts["up"],
                      f"{path}.alpha": parts["alpha"]})
    comfy_path = qi_trained["tmp"] / "qi_comfy.safetensors"
    save_file(comfy, comfy_path)
    folder = save_diffusers_lora(qi_trained["tmp"] / "qi_diffusers", result.lora_state, summary)
    outputs = outputs_through_diffusers(QwenImagePipeline, qi_trained["params"].base_model, {"kohya": kohya_path, "comfy": comfy_path, "diffusers": folder}, _out)
    trained = _out(components.denoiser)
    assert torch.allclose(outputs["diffusers"], trained, atol=1e-5)
    assert torch.allclose(outputs["kohya"], outputs["diffusers"], atol=1e-5)
    assert torch.allclose(outputs["comfy"], outputs["diffusers"], atol=1e-5)


def _state(modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]], down: str, up: str) -> dict:
    return {f"{n}.{k}": v for n, (d, u, a) in modules.items()
            for k, v in ((f"{down}.weight", d), (f"{up}.weight", u), ("alpha", torch.tensor(a).half()))}


def test_downloaded_kohya_comfyui_ai_toolkit_and_simpletuner_loras_stack_by_the_rule(tiny_models, tmp_path):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(str(tiny_models["tiny-qwen-image"]))
    base, generator = _out(pipe.transformer), torch.Generator().manual_seed(3)
    # a: musubi-tuner / kohya, a modulation and an embedder too; b: ComfyUI / ai-toolkit's diffusion_model. names;
    # c: SimpleTuner's lycoris_ names and the bare path (ComfyUI's generic format)
    names = {"a": {"lora_unet_transformer_blocks_0_attn_to_q": "transformer_blocks.0.attn.to_q",
                   "lora_unet_transformer_blocks_1_img_mod_1": "transformer_blocks.1.img_mod.1",
                   "lora_unet_txt_in": "txt_in"},
             "b": {"diffusion_model.transformer_blocks.1.attn.add_k_proj": "transformer_blocks.1.attn.add_k_proj",
                   "diffusion_model.transformer_blocks.0.txt_mlp.net.2": "transformer_blocks.0.txt_mlp.net.2"},
             "c": {"lycoris_transformer_blocks_0_attn_to_out_0": "transformer_blocks.0.attn.to_out.0",
                   "transformer_blocks.1.img_mlp.net.0.proj": "transformer_blocks.1.img_mlp.net.0.proj"}}
    lora = {f: {n: random_lora_pair(pipe.transformer, p, 2, generator) for n, p in table.items()} for f, table in names.items()}
    for file, (down, up) in (("a", ("lora_down", "lora_up")), ("b", ("lora_A", "lora_B")),
                             ("c", ("lora_down", "lora_up"))):
        save_file(_state(lora[file], down, up), tmp_path / f"{file}.safetensors")
    load_stack(pipe, QWEN_IMAGE, {f: str(tmp_path / f"{f}.safetensors") for f in "abc"})
    weights = {"a": 0.6, "b": 0.8, "c": 0.5}
    set_weights(pipe, weights)
    reference = QwenImagePipeline.from_pretrained(str(tiny_models["tiny-qwen-image"]))
    for file, weight in weights.items():
        apply_comfy_rule(reference.transformer, lora[file], weight)
    expected = _out(reference.transformer)
    effect = (expected - base).abs().max().item()
    assert effect > 1e-3 and (_out(pipe.transformer) - expected).abs().max().item() < 1e-3 * effect


def test_default_targets_on_the_real_qwen_image_config_match_musubis_module_count():
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**QWEN_IMAGE_TRANSFORMER_CONFIG)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    targeted = [n for n in linears if re.fullmatch(BLOCK_LINEARS, n)]
    # musubi: every Linear of the 60 QwenImageTransformerBlocks (14 each) but img_mod.1 and txt_mod.1
    assert len([n for n in linears if n.startswith("transformer_blocks.")]) == 60 * 14
    assert len(targeted) == 60 * 12 == 720
    pairs = {(QWEN_IMAGE.denoiser, n): (torch.zeros(1, 1), torch.zeros(2, 1)) for n in targeted}
    names = QWEN_IMAGE.to_kohya_modules(pairs, 1.0, model.config)
    assert len(names) == 720 and "lora_unet_transformer_blocks_59_txt_mlp_net_0_proj" in names


def test_interrupted_then_resumed_qwen_image_run_equals_uninterrupted(tiny_models, tiny_examples, tmp_path):
    assert_same_run(*straight_and_resumed(tiny_models, tiny_examples, tmp_path, str(tiny_models["tiny-qwen-image"]),
                                          **SETTINGS, shuffle_tags=True))
