"""SDXL beside SD1.x: training with two text encoders, kohya SDXL names checked against readers we did not
write (diffusers' converter, the WebUI rule applied here), stacking, merge and single-file bases."""

from __future__ import annotations

import re

import pytest
import torch
from comfyui_rules import clip_key_map, not_loaded, text_encoder_modules
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig
from train_helpers import make_params, summary_for

from lora_pipeline.core.cache import DiskCache
from lora_pipeline.core.config import KOHYA_TE_TARGETS, KOHYA_UNET_TARGETS
from lora_pipeline.core.errors import ConfigError, DataError, LoraPipelineError
from lora_pipeline.demo.tiny_models import build_sdxl_architecture
from lora_pipeline.diffusion.families import SD1, SDXL, detect_family
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.lora_files import (
    build_kohya_file,
    kohya_modules,
    load_lora_file,
    save_diffusers_lora,
    save_lora_file,
    to_kohya_state_dict,
)
from lora_pipeline.diffusion.single_file import write_ldm_checkpoint
from lora_pipeline.diffusion.stack import load_stack, merge_into_base, pipeline_modules, set_weights
from lora_pipeline.diffusion.training import Example, train

# ----------------------------------------------------------------------------- the test's own kohya SDXL names
# Written from kohya's naming rule, independently of lora_pipeline.diffusion: SGM block numbers for the UNet's
# transformer blocks, lora_te1_/lora_te2_ + the text_model path for the text encoders.


def own_sdxl_names(components) -> dict[str, torch.nn.Module]:
    per = components.unet.config.layers_per_block + 1
    names = {}
    for path, module in components.unet.named_modules():
        if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path):
            sgm = f"input_blocks.{int(m[1]) * per + int(m[2]) + 1}.1.{m[3]}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", path):
            sgm = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path):
            sgm = f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}"
        else:
            continue
        names["lora_unet_" + sgm.replace(".", "_")] = module
    parts = Parts(components)
    for prefix, encoder in (("lora_te1_", parts.text_encoder), ("lora_te2_", parts.text_encoder_2)):
        for path, module in encoder.named_modules():
            if path.removeprefix("text_model.").startswith("encoder.layers."):
                names[prefix + "text_model_" + path.removeprefix("text_model.").replace(".", "_")] = module
    return names


def webui_merge_sdxl(components, kohya_state, strength=1.0) -> int:
    """W += strength * alpha / r * up @ down, the way WebUI and ComfyUI apply a LoRA."""
    names = own_sdxl_names(components)
    with torch.no_grad():
        for name, parts in kohya_modules(kohya_state).items():
            module = names[name]
            down, up = parts["down"].float(), parts["up"].float()
            delta = (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape)
            module.weight += strength * float(parts["alpha"]) / down.shape[0] * delta
    return len(kohya_modules(kohya_state))


class Parts:
    """Attribute access over a loaded pipeline or our components, for the comparisons below."""

    def __init__(self, obj):
        self.unet, self.text_encoder, self.vae = obj.unet, obj.text_encoder, obj.vae
        self.text_encoder_2 = getattr(obj, "text_encoder_2", None) or obj.text_encoders[1]
        self.tokenizer = getattr(obj, "tokenizer", None)


@torch.no_grad()
def sdxl_outputs(obj) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """UNet (with pooled + time-id conditioning), TE1 and TE2 outputs on fixed inputs."""
    components = Parts(obj)
    for module in (components.unet, components.text_encoder, components.text_encoder_2):
        getattr(module, "module", module).eval()
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    hidden = torch.randn(2, 77, components.unet.config.cross_attention_dim, generator=generator)
    pooled = torch.randn(2, components.text_encoder_2.config.projection_dim, generator=generator)
    time_ids = torch.tensor([[100.0, 80, 0, 8, 64, 64], [64.0, 64, 0, 0, 64, 64]])
    unet = components.unet(sample, torch.tensor([10, 500]), hidden,
                           added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    ids = torch.tensor([[49406, 300, 301, 302, 49407] + [49407] * 72])
    ids = ids.clamp(max=components.text_encoder.config.vocab_size - 1)
    second = components.text_encoder_2(ids, output_hidden_states=True).hidden_states[-2]
    return unet, components.text_encoder(ids)[0], second


@pytest.fixture(scope="module")
def sdxl_trained(tiny_models, tiny_examples, tmp_path_factory):
    """A tiny SDXL LoRA on the UNet and both text encoders, alpha (8) != rank (4)."""
    tmp = tmp_path_factory.mktemp("sdxl")
    examples = [Example(e.path, e.text, e.width, e.height, e.sha256, original_size=(e.width + 40, e.height + 20),
                        crop_top_left=(10, 20)) for e in tiny_examples]
    params = make_params(tiny_models, tmp, base_model=str(tiny_models["tiny-sdxl"]), train_text_encoder=True,
                         max_steps=6, text_encoder_lr=1e-3, learning_rate=5e-3)
    components = load_diffusion_model(params.base_model)
    result = train(components, examples, params, DiskCache(tmp / "cache"), dataset_hash="d")
    summary = summary_for(params, result.spec, unet_layout={
        "layers_per_block": components.unet.config.layers_per_block, "up_block_types": list(components.unet.config.up_block_types)})
    state, metadata = build_kohya_file(result.lora_state, summary, summary.unet_config(), "fp32", "xl", "tiny-sdxl")
    save_lora_file(tmp / "xl.safetensors", state, metadata)
    folder = save_diffusers_lora(tmp / "xl_diffusers", result.lora_state, summary)
    return {"components": components, "result": result, "params": params, "summary": summary,
            "outputs": sdxl_outputs(components), "kohya": tmp / "xl.safetensors", "diffusers": folder, "tmp": tmp}


def test_sdxl_training_lowers_loss_and_trains_both_text_encoders(sdxl_trained):
    result = sdxl_trained["result"]
    assert result.spec.family == "sdxl"
    assert {k.split(".")[0] for k in result.lora_state} == {"unet", "text_encoder", "text_encoder_2"}
    assert sum(result.losses[-2:]) < sum(result.losses[:2])


def test_sdxl_kohya_file_names_header_and_the_webui_rule(sdxl_trained, tiny_models):
    state, header = load_lora_file(sdxl_trained["kohya"])
    names = set(kohya_modules(state))
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2" in names
    assert any(n.startswith("lora_unet_output_blocks_") for n in names)
    assert not any("down_blocks" in n or "up_blocks" in n or "mid_block" in n for n in names)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in names
    assert header["ss_base_model_version"] == "sdxl_base_v1-0"
    assert header["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert header["ss_network_alpha"] == "8.0" and header["ss_network_dim"] == "4"

    base = load_diffusion_model(str(tiny_models["tiny-sdxl"]))
    untouched = sdxl_outputs(base)
    assert webui_merge_sdxl(base, state) == len(sdxl_trained["result"].lora_state) // 2
    merged = sdxl_outputs(base)
    for got, want, before, what in zip(merged, sdxl_trained["outputs"], untouched, ("unet", "te1", "te2")):
        assert (got - want).abs().max() < 1e-4, what
        assert (before - want).abs().max() > 1e-3, what  # the LoRA changes each part, so the check can fail


def test_diffusers_reads_the_kohya_file_like_the_diffusers_folder(sdxl_trained, tiny_models):
    """diffusers' own converter for non-diffusers SDXL LoRAs (SGM names) is a reader we did not write."""
    folder = str(tiny_models["tiny-sdxl"])
    from_kohya = StableDiffusionXLPipeline.from_pretrained(folder)
    base_unet = sdxl_outputs(from_kohya)[0]
    from_kohya.load_lora_weights(str(sdxl_trained["kohya"]))
    from_folder = StableDiffusionXLPipeline.from_pretrained(folder)
    from_folder.load_lora_weights(str(sdxl_trained["diffusers"]))
    kohya_unet, folder_unet = sdxl_outputs(from_kohya)[0], sdxl_outputs(from_folder)[0]
    assert (kohya_unet - folder_unet).abs().max() < 1e-5
    assert (kohya_unet - base_unet).abs().max() > 1e-3
    # the diffusers folder reproduces the trained model, text encoders included
    for got, want in zip(sdxl_outputs(from_folder), sdxl_trained["outputs"]):
        assert (got - want).abs().max() < 1e-4


def test_diffusers_reads_the_fp16_kohya_file_text_encoders_included(sdxl_trained, tiny_models):
    """The exported (fp16) kohya file through diffusers' load_lora_weights: UNet, te1 and te2 attention and MLP
    LoRA all arrive; outputs match the diffusers folder's within fp16 rounding (measured on the tiny SDXL:
    1.2e-4 of the LoRA's effect at most; 1.2e-3 on a full-size SDXL)."""
    folder = str(tiny_models["tiny-sdxl"])
    summary, state = sdxl_trained["summary"], sdxl_trained["result"].lora_state
    kohya, metadata = build_kohya_file(state, summary, summary.unet_config(), "fp16", "xl", "tiny-sdxl")
    save_lora_file(sdxl_trained["tmp"] / "xl_fp16.safetensors", kohya, metadata)
    base = sdxl_outputs(StableDiffusionXLPipeline.from_pretrained(folder))
    from_kohya, from_folder = (StableDiffusionXLPipeline.from_pretrained(folder) for _ in range(2))
    from_kohya.load_lora_weights(str(sdxl_trained["tmp"] / "xl_fp16.safetensors"))
    from_folder.load_lora_weights(str(sdxl_trained["diffusers"]))
    for got, want, before, what in zip(sdxl_outputs(from_kohya), sdxl_outputs(from_folder), base,
                                       ("unet", "te1", "te2")):
        effect = (want - before).abs().max()
        assert effect > 1e-3, what
        assert (got - want).abs().max() < 1e-3 * effect, what


def test_diffusers_file_names_both_text_encoders_as_comfyui_maps_clip_l_and_clip_g(sdxl_trained):
    """te1 is a CLIPTextModel (no text_model. wrapper in transformers 5), te2 a CLIPTextModelWithProjection (with
    one): the file names both text_encoder(_2).text_model.encoder.layers.N..., the only spelling ComfyUI maps."""
    state, _ = load_lora_file(sdxl_trained["diffusers"] / "pytorch_lora_weights.safetensors")
    components = sdxl_trained["components"]
    layers = [encoder.config.num_hidden_layers for encoder in components.text_encoders]
    trained = {k.rsplit(".lora_", 1)[0] for k in sdxl_trained["result"].lora_state if k.startswith("text_encoder")}
    assert len(trained) == 6 * sum(layers)  # every CLIP module of both encoders was trained
    assert not_loaded(state, clip_key_map(clip_l_layers=layers[0], clip_g_layers=layers[1])) == []
    modules = text_encoder_modules(state)
    assert len(modules) == len(trained)
    assert {m.split(".")[0] for m in modules} == {"text_encoder", "text_encoder_2"}


def random_kohya_sdxl_lora(components, rank: int, alpha: float, seed: int) -> dict[str, torch.Tensor]:
    """An SDXL LoRA written the way kohya's sd-scripts names and stores it: fp16, alpha != rank."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in own_sdxl_names(components).items():
        if not isinstance(module, torch.nn.Linear) or not name.endswith(("to_q", "to_v", "ff_net_2", "proj_in",
                                                                           "q_proj", "out_proj", "fc1")):
            continue
        out_features, in_features = module.weight.shape
        state[f"{name}.lora_down.weight"] = (torch.randn(rank, in_features, generator=generator) * 0.1).half()
        state[f"{name}.lora_up.weight"] = (torch.randn(out_features, rank, generator=generator) * 0.1).half()
        state[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    return state


def test_downloaded_kohya_sdxl_lora_stacks_and_merges_by_the_webui_rule(tiny_models, tmp_path):
    folder = str(tiny_models["tiny-sdxl"])
    reference = load_diffusion_model(folder)
    files = {"char": tmp_path / "char.safetensors", "bg": tmp_path / "bg.safetensors"}
    save_lora_file(files["char"], random_kohya_sdxl_lora(reference, 4, 2.0, 1), {})
    save_lora_file(files["bg"], random_kohya_sdxl_lora(reference, 8, 16.0, 2), {})
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    base = sdxl_outputs(pipe)
    load_stack(pipe, SDXL, files)
    set_weights(pipe, {"char": 0.6, "bg": -0.3})
    stacked = sdxl_outputs(pipe)
    webui_merge_sdxl(reference, load_lora_file(files["char"])[0], 0.6)
    webui_merge_sdxl(reference, load_lora_file(files["bg"])[0], -0.3)
    expected = sdxl_outputs(reference)
    for got, want, before in zip(stacked, expected, base):
        assert (got - want).abs().max() < 1e-3  # fp16 LoRA weights, fp32 model
        assert (got - before).abs().max() > 1e-3
    merged = StableDiffusionXLPipeline.from_pretrained(folder)
    merge_into_base(pipeline_modules(merged, SDXL), SDXL, [(files["char"], 0.6), (files["bg"], -0.3)])
    for got, want in zip(sdxl_outputs(merged), expected):
        assert (got - want).abs().max() < 1e-4


def test_sd1_lora_on_an_sdxl_base_is_refused_with_the_reason(tiny_models, trained, tmp_path):
    state, metadata = build_kohya_file(trained["result"].lora_state, trained["summary"],
                                       trained["summary"].unet_config(), "fp16", "t", "tiny")
    save_lora_file(tmp_path / "sd1.safetensors", state, metadata)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_models["tiny-sdxl"]))
    with pytest.raises(LoraPipelineError, match=r"another model family than the base \(SDXL\): sd1 \(SD1.x\)"):
        load_stack(pipe, SDXL, {"sd1": tmp_path / "sd1.safetensors"})  # its header says so
    save_lora_file(tmp_path / "bare.safetensors", state, {})
    with pytest.raises(DataError, match="is it an SD1.x LoRA"):  # no header: its module names say so
        load_stack(pipe, SDXL, {"bare": tmp_path / "bare.safetensors"})


def test_single_file_sdxl_base_loads_the_same_weights(tiny_models, tmp_path):
    folder = str(tiny_models["tiny-sdxl"])
    reference = StableDiffusionXLPipeline.from_pretrained(folder)
    checkpoint = write_ldm_checkpoint(reference, tmp_path / "tiny_sdxl_base.safetensors", SDXL)
    assert detect_family(checkpoint) is SDXL and detect_family(folder) is SDXL
    with pytest.raises(ValueError, match="single_file_config"):
        load_diffusion_model(str(checkpoint))
    loaded = load_diffusion_model(str(checkpoint), single_file_config=folder)
    assert loaded.family is SDXL
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        expected = getattr(reference, name).state_dict()
        got = getattr(loaded, "text_encoders")[1].state_dict() if name == "text_encoder_2" else getattr(
            loaded, name).state_dict()
        assert expected.keys() == got.keys(), name
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"{name}.{key}"


def test_family_is_detected_and_a_wrong_choice_is_named(tiny_models):
    assert detect_family(tiny_models["tiny-sd"]) is SD1
    with pytest.raises(ConfigError, match="Stable Diffusion XL model; set base_model_family: auto"):
        load_diffusion_model(str(tiny_models["tiny-sdxl"]), family="sd1")
    with pytest.raises(ConfigError, match="flux"):
        load_diffusion_model(str(tiny_models["tiny-sd"]), family="flux")


def test_real_sdxl_configs_give_kohyas_module_counts():
    """SDXL base's UNet and both text encoders on the meta device: our default targets name exactly the
    modules kohya's sd-scripts reports for SDXL (722 UNet, 72 + 192 text-encoder modules)."""
    from peft.utils import get_peft_model_state_dict

    unet, te1, te2 = build_sdxl_architecture("meta")
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=KOHYA_UNET_TARGETS))
    te1.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=KOHYA_TE_TARGETS))
    te2.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=KOHYA_TE_TARGETS))
    state = {}
    for prefix, model in (("unet", unet), ("text_encoder", te1), ("text_encoder_2", te2)):
        state.update({f"{prefix}.{k}": torch.zeros(v.shape) for k, v in get_peft_model_state_dict(model).items()})
    names = set(kohya_modules(to_kohya_state_dict(state, SDXL, 8.0, unet.config)))
    counts = {prefix: sum(n.startswith(prefix) for n in names) for prefix in ("lora_unet_", "lora_te1_", "lora_te2_")}
    assert counts == {"lora_unet_": 722, "lora_te1_": 72, "lora_te2_": 192}
    assert "lora_unet_input_blocks_7_1_transformer_blocks_9_attn2_to_k" in names
    assert "lora_unet_output_blocks_5_1_proj_out" in names


def test_generation_stage_renders_sdxl_with_a_stacked_lora(tiny_models, sdxl_trained, tmp_path):
    """The generation node on an SDXL base: the LoRA tag resolves, changes the image, and PNG info is written."""
    import numpy as np

    from lora_pipeline.core.config import GenerationParams
    from lora_pipeline.core.spec import LoraFile
    from lora_pipeline.pipelines.generation import nodes

    library = tmp_path / "Lora"
    library.mkdir()
    (library / "xl.safetensors").write_bytes(sdxl_trained["kohya"].read_bytes())
    params = {"base_model": str(tiny_models["tiny-sdxl"]), "lora_dirs": [str(library)], "device": "cpu",
              "prompt": "sks, red circle <lora:xl:1.0>", "comparison_weights": [0.0, 1.0], "thumbnail": 32,
              "defaults": {"prompt": "-", "steps": 2, "width": 64, "height": 64, "seed": 3}}
    images, sheet, grid = nodes.generate_images(GenerationParams(**params), LoraFile({}))
    [(name, image)] = images.items()
    assert image.size == (64, 64) and "<lora:xl:1>" in image.info["parameters"]
    without = nodes.generate_images(GenerationParams(**{**params, "prompt": "sks, red circle"}), LoraFile({}))[0]
    assert np.abs(np.asarray(image, float) - np.asarray(next(iter(without.values())), float)).max() > 0
    assert grid.size[0] == 2 * 32


@pytest.mark.parametrize("new_alpha", [8.0, 1.0])
def test_init_lora_from_the_sdxl_kohya_file_reproduces_the_trained_model(sdxl_trained, tiny_models, tmp_path,
                                                                        new_alpha):
    """A retrain (init_lora) at another alpha starts exactly where the exported LoRA left off."""
    from lora_pipeline.diffusion.lora_files import read_lora_modules, to_peft_state
    from lora_pipeline.diffusion.training import inject_lora, load_lora_state, lora_spec

    params = sdxl_trained["params"].model_copy(update={"alpha": new_alpha})
    components = load_diffusion_model(params.base_model)
    spec = lora_spec(params, components.family)
    init = to_peft_state(read_lora_modules(sdxl_trained["kohya"], components.family, components.modules()), target_scale=spec.scale)
    inject_lora(components, spec)
    load_lora_state(components, init, "init")
    for got, want in zip(sdxl_outputs(components), sdxl_trained["outputs"]):
        assert (got - want).abs().max() < 1e-4
