import re

import pytest
import torch
from comfyui_rules import clip_key_map, not_loaded, text_encoder_modules
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from train_helpers import model_outputs, webui_merge

from lora_pipeline.core.config import KOHYA_TE_TARGETS, KOHYA_UNET_TARGETS
from lora_pipeline.demo.tiny_models import build_sd15_architecture
from lora_pipeline.diffusion.families import SD1
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.lora_files import (
    build_kohya_file,
    kohya_modules,
    load_lora_file,
    lora_modules_from_state,
    save_diffusers_lora,
    save_lora_file,
    tensor_hash,
    to_kohya_state_dict,
    to_peft_state,
)

REQUIRED_HEADER = [
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_dropout", "ss_base_model_version",
    "ss_sd_model_name", "ss_num_train_images", "ss_num_epochs", "ss_steps", "ss_learning_rate", "ss_resolution",
    "ss_seed", "ss_tag_frequency", "ss_training_started_at", "ss_training_finished_at", "ss_output_name",
    "sshs_model_hash", "modelspec.architecture", "modelspec.title", "modelspec.date",
]


def test_kohya_file_reproduces_trained_outputs_under_the_webui_rule(trained, tmp_path):
    state, metadata = build_kohya_file(trained["result"].lora_state, trained["summary"], trained["summary"].unet_config(), "fp32", "t", "tiny")
    save_lora_file(tmp_path / "t.safetensors", state, metadata)
    loaded, header = load_lora_file(tmp_path / "t.safetensors")
    assert all(key.startswith(("lora_unet_", "lora_te_")) for key in loaded)
    assert any(key.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for key in loaded)
    base = load_diffusion_model(trained["params"].base_model)
    applied = webui_merge(base, loaded)
    assert applied == len(trained["result"].lora_state) // 2
    unet_out, te_out = model_outputs(base)
    assert (unet_out - trained["outputs"][0]).abs().max() < 1e-4
    assert (te_out - trained["outputs"][1]).abs().max() < 1e-4
    # and the LoRA really changes the model (so the comparison above can fail)
    untouched = model_outputs(load_diffusion_model(trained["params"].base_model))
    assert (untouched[0] - trained["outputs"][0]).abs().max() > 1e-3
    assert (untouched[1] - trained["outputs"][1]).abs().max() > 1e-3


def test_header_metadata_and_alpha(trained, tmp_path):
    state, metadata = build_kohya_file(trained["result"].lora_state, trained["summary"], trained["summary"].unet_config(), "fp16", "t", "tiny")
    save_lora_file(tmp_path / "t.safetensors", state, metadata)
    loaded, header = load_lora_file(tmp_path / "t.safetensors")
    for key in REQUIRED_HEADER:
        assert isinstance(header.get(key), str) and header[key], key
    assert header["ss_network_alpha"] == "8.0" and header["ss_network_dim"] == "4"
    assert header["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert '"sks": 8' in header["ss_tag_frequency"]
    assert header["sshs_model_hash"] == tensor_hash(loaded)
    alphas = [t for k, t in loaded.items() if k.endswith(".alpha")]
    assert alphas and all(t.ndim == 0 and float(t) == 8.0 for t in alphas)
    assert all(t.dtype == torch.float16 for t in loaded.values())
    assert not list(tmp_path.glob(".*tmp"))


def test_kohya_round_trip(trained, tiny_models):
    kohya = to_kohya_state_dict(trained["result"].lora_state, SD1, 8.0, None, dtype=torch.float32)
    base = load_diffusion_model(trained["params"].base_model)
    modules = lora_modules_from_state(kohya, {}, SD1, base.modules(), "round trip")
    assert {m.scale for m in modules} == {2.0}  # alpha 8 / rank 4, read back per module
    back = to_peft_state(modules, target_scale=2.0)
    assert back.keys() == trained["result"].lora_state.keys()
    assert all(torch.equal(back[k], trained["result"].lora_state[k]) for k in back)
    # folded to another scale, up @ down * scale is unchanged
    folded = to_peft_state(modules, target_scale=0.5)
    key = next(k for k in back if k.endswith("lora_B.weight"))
    assert torch.allclose(folded[key] * 0.5, back[key] * 2.0)


def _sd_pipeline(trained) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(trained["params"].base_model, safety_checker=None,
                                                   requires_safety_checker=False)


def test_diffusers_export_reloads_with_load_lora_weights(trained, tmp_path):
    folder = save_diffusers_lora(tmp_path / "diffusers", trained["result"].lora_state, trained["summary"])
    pipe = _sd_pipeline(trained)
    base = model_outputs(pipe)
    pipe.load_lora_weights(str(folder))
    unet_out, te_out = model_outputs(pipe)
    assert (unet_out - trained["outputs"][0]).abs().max() < 1e-4
    assert (te_out - trained["outputs"][1]).abs().max() < 1e-4
    assert (te_out - base[1]).abs().max() > 1e-3  # the text-encoder LoRA arrived from the text_model. names


def test_diffusers_file_names_its_text_encoder_as_comfyui_maps_clip_l(trained, tmp_path):
    """transformers 5's CLIPTextModel has no text_model. wrapper; the file must still carry it, or ComfyUI
    patches none of CLIP-L and logs every text-encoder key as not loaded."""
    folder = save_diffusers_lora(tmp_path / "diffusers", trained["result"].lora_state, trained["summary"])
    state, _ = load_lora_file(folder / "pytorch_lora_weights.safetensors")
    layers = trained["components"].text_encoder.config.num_hidden_layers
    trained_modules = {k.rsplit(".lora_", 1)[0] for k in trained["result"].lora_state if k.startswith("text_encoder.")}
    assert len(trained_modules) == 6 * layers  # every CLIP module of every layer was trained
    assert not_loaded(state, clip_key_map(clip_l_layers=layers)) == []
    assert len(text_encoder_modules(state)) == len(trained_modules)


def test_diffusers_reads_our_kohya_file_like_the_diffusers_folder(trained, tmp_path):
    """The fp16 kohya file through diffusers' own kohya converter gives the diffusers folder's outputs, text
    encoder included, within fp16 rounding (measured: 1.3e-4 of the LoRA's effect)."""
    state, metadata = build_kohya_file(trained["result"].lora_state, trained["summary"],
                                       trained["summary"].unet_config(), "fp16", "t", "tiny")
    save_lora_file(tmp_path / "t.safetensors", state, metadata)
    folder = save_diffusers_lora(tmp_path / "diffusers", trained["result"].lora_state, trained["summary"])
    base = model_outputs(_sd_pipeline(trained))
    from_kohya, from_folder = _sd_pipeline(trained), _sd_pipeline(trained)
    from_kohya.load_lora_weights(str(tmp_path / "t.safetensors"))
    from_folder.load_lora_weights(str(folder))
    for got, want, before, what in zip(model_outputs(from_kohya), model_outputs(from_folder), base, ("unet", "te")):
        effect = (want - before).abs().max()
        assert effect > 1e-3, what
        assert (got - want).abs().max() < 1e-3 * effect, what


@pytest.fixture(scope="module")
def sd15_lora_state():
    """The real SD1.5 architecture on the meta device (no weights), LoRA-injected with the kohya targets."""
    from peft.utils import get_peft_model_state_dict

    unet, text_encoder = build_sd15_architecture("meta")
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=KOHYA_UNET_TARGETS))
    text_encoder.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=KOHYA_TE_TARGETS))
    state = {f"unet.{k}": torch.zeros(v.shape) for k, v in get_peft_model_state_dict(unet).items()}
    state.update({f"text_encoder.{k}": torch.zeros(v.shape)
                  for k, v in get_peft_model_state_dict(text_encoder).items()})
    return unet, text_encoder, state


def test_sd15_module_names_are_valid_kohya_names(sd15_lora_state):
    unet, text_encoder, state = sd15_lora_state
    kohya = to_kohya_state_dict(state, SD1, 8.0, unet.config)
    modules = kohya_modules(kohya)
    unet_names = [n for n in modules if n.startswith("lora_unet_")]
    te_names = [n for n in modules if n.startswith("lora_te_")]
    assert len(unet_names) == 192 and len(te_names) == 72
    assert all(set(parts) == {"down", "up", "alpha"} for parts in modules.values())
    valid_unet = {"lora_unet_" + n.replace(".", "_") for n, _ in build_sd15_architecture("meta")[0].named_modules()}
    assert set(unet_names) <= valid_unet
    te_pattern = re.compile(r"^lora_te_text_model_encoder_layers_(\d|1[01])_(self_attn_(q|k|v|out)_proj|mlp_fc[12])$")
    assert all(te_pattern.match(name) for name in te_names)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in unet_names
    assert "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_0_proj" in unet_names
    assert "lora_unet_mid_block_attentions_0_proj_in" in unet_names
    proj_in = kohya["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]
    assert tuple(proj_in.shape) == (8, 320, 1, 1)  # SD1.5 proj_in is a 1x1 conv
