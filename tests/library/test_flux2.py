"""Flux.2 as a family: training with flow matching on the tiny Flux.2 (Mistral3's layers 10/20/30 stacked, 32-channel
latents patchified to 128 and batch-normalised by the VAE's own statistics), the pipeline's own denoiser call and
latent normalisation against the family's, the kohya file (BFL names, the double blocks' q/k/v fused) read back by a
rule written here from diffusers' Flux.2 converters' tables, diffusers' own reader
(``Flux2Pipeline.load_lora_weights``: its kohya converter) on that file against our diffusers folder, downloaded
kohya, BFL and ai-toolkit files stacked, module counts on the real config, and an exact resume. diffusers' Flux.2
converters split ``qkv`` by thirds and hard-code no width: the tiny transformer does.
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
from lora_pipeline.demo.tiny_models import FLUX2_TRANSFORMER_CONFIG
from lora_pipeline.diffusion.families import FLUX, FLUX2, Conditioning, NoisedBatch, detect_family, lora_header_family
from lora_pipeline.diffusion.families.flux2 import BLOCK_LINEARS
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.lora_files import build_kohya_file, kohya_modules, save_diffusers_lora, save_lora_file
from lora_pipeline.diffusion.stack import load_stack, set_weights
from lora_pipeline.diffusion.training import train

SETTINGS = dict(max_steps=6, save_steps=2, lora_rank=4, alpha=2, learning_rate=5e-3, dropout=0.1,
                caption_dropout=0.2, lr_scheduler="cosine", lr_warmup_steps=2)

# The BFL module (after ``double_blocks.N.`` / ``single_blocks.N.``) -> the diffusers modules whose output rows it
# stacks, in order: this test's own table, from diffusers' _convert_non_diffusers_flux2_lora_to_diffusers.
DOUBLE = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn.proj": ("attn.to_out.0",),
          "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
          "txt_attn.proj": ("attn.to_add_out",), "img_mlp.0": ("ff.linear_in",), "img_mlp.2": ("ff.linear_out",),
          "txt_mlp.0": ("ff_context.linear_in",), "txt_mlp.2": ("ff_context.linear_out",)}
SINGLE = {"linear1": ("attn.to_qkv_mlp_proj",), "linear2": ("attn.to_out",)}


def bfl_table(transformer) -> dict[str, tuple[str, ...]]:
    """``{BFL module path: diffusers modules}`` for the blocks this transformer has."""
    table = {}
    for kind, original, rows in (("transformer_blocks", "double_blocks", DOUBLE),
                                 ("single_transformer_blocks", "single_blocks", SINGLE)):
        for index in range(len(getattr(transformer, kind))):
            for name, parts in rows.items():
                table[f"{original}.{index}.{name}"] = tuple(f"{kind}.{index}.{p}" for p in parts)
    return table


@torch.no_grad()
def apply_rule(transformer, modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]], strength: float):
    """The LoRA patch every reader applies: weight += strength * alpha / rank * up @ down, the rows of a fused module
    split over its diffusers parts in order (``qkv``: thirds). Names: kohya's (``lora_unet_`` + BFL path, ``.`` ->
    ``_``) or the BFL path itself."""
    table = bfl_table(transformer)
    by_kohya = {"lora_unet_" + path.replace(".", "_"): path for path in table}
    for name, (down, up, alpha) in modules.items():
        delta = strength * alpha / down.shape[0] * (up.float() @ down.float())
        rows = 0
        for path in table[by_kohya.get(name, name)]:
            layer = transformer.get_submodule(path)
            layer.weight += delta[rows:rows + layer.out_features].to(layer.weight.dtype)
            rows += layer.out_features
        assert rows == delta.shape[0], name


@pytest.fixture(scope="module")
def f2_trained(tiny_models, tiny_examples, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flux2")
    params = make_params(tiny_models, tmp, base_model=str(tiny_models["tiny-flux2"]), **SETTINGS)
    components = load_diffusion_model(params.base_model)
    result = train(components, tiny_examples, params, DiskCache(tmp / "cache"), dataset_hash="d")
    summary = summary_for(params, result.spec, family="flux2", unet_layout={}, recipe=FLUX2.recipe(params, None))
    return {"components": components, "result": result, "params": params, "tmp": tmp, "summary": summary}


@torch.no_grad()
def _out(transformer) -> torch.Tensor:
    """Two images at two times through the family's own call (packing, position ids, guidance 1)."""
    transformer.eval()
    generator, config = torch.Generator().manual_seed(0), transformer.config
    latents = torch.randn(2, config.in_channels, 4, 4, generator=generator)
    cond = Conditioning(torch.randn(2, 6, config.joint_attention_dim, generator=generator))
    return FLUX2.predict(transformer, NoisedBatch(latents, torch.tensor([0.3, 0.8]), latents), cond, None,
                         torch.float32)


def test_flux2_is_detected_and_trains_the_block_linears(f2_trained, tiny_models):
    components, result = f2_trained["components"], f2_trained["result"]
    assert components.family is FLUX2 and detect_family(str(tiny_models["tiny-flux2"])) is FLUX2
    assert detect_family(str(tiny_models["tiny-flux"])) is FLUX
    assert FLUX2.recognises_pipeline_class("Flux2Pipeline") and not FLUX.recognises_pipeline_class("Flux2Pipeline", True)
    assert not FLUX2.recognises_pipeline_class("Flux2KleinPipeline", variants=True)  # Qwen3: not this family
    assert FLUX2.recognises_checkpoint(["double_stream_modulation_img.lin.weight", "double_blocks.0.img_attn.qkv.weight"])
    assert not FLUX.recognises_checkpoint(["double_stream_modulation_img.lin.weight",
                                           "double_blocks.0.img_attn.qkv.weight"])
    assert result.steps == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    trained = {k.split(".lora_")[0] for k in result.lora_state}
    assert {"transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.ff_context.linear_out",
            "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj"} <= trained
    assert not any("modulation" in k or "text_encoder" in k or "embedder" in k for k in trained)


def test_the_denoiser_call_and_latents_are_the_pipelines(tiny_models):
    """What Flux2Pipeline gives the transformer (sigma as the time, 4-axis ids, the guidance) against the family's
    training call on the same tokens; its Euler step integrates the output as the velocity; and its decode path
    (batch-norm undone, unpatchified) turns the family's training latents back into the VAE's."""
    from diffusers import Flux2Pipeline

    pipe = Flux2Pipeline.from_pretrained(str(tiny_models["tiny-flux2"]))
    seen, forward = [], pipe.transformer.forward

    def recording(**kwargs):
        seen.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})
        seen[-1]["out"] = forward(**kwargs)[0]
        return (seen[-1]["out"],)

    pipe.transformer.forward = recording
    latents = torch.randn(1, 128, 4, 4, generator=torch.Generator().manual_seed(1))
    start = latents.flatten(2).permute(0, 2, 1)  # the pipeline's packed tokens (B, h*w, 128)
    end = pipe(prompt="lorachar", height=64, width=64, sigmas=[0.7], guidance_scale=1.0, output_type="latent",
               latents=latents, max_sequence_length=FLUX2.mistral_length(pipe.tokenizer)).images
    call = seen[0]
    sigma = pipe.scheduler.sigmas[0].item()
    assert 0 < sigma < 1 and call["timestep"].item() == pytest.approx(sigma)
    assert torch.allclose(end, start - sigma * call["out"], atol=1e-5)  # x0 = x_sigma - sigma * (noise - x0)
    cond = Conditioning(call["encoder_hidden_states"])
    pred = FLUX2.predict(pipe.transformer, NoisedBatch(latents, torch.tensor([sigma]), latents), cond, None,
                         torch.float32)
    assert torch.allclose(pred, call["out"].permute(0, 2, 1).reshape(1, 128, 4, 4), atol=1e-5)
    # the prompt embedding the pipeline made is the family's encode_prompt
    own = FLUX2.encode_prompt([pipe.text_encoder], [pipe.tokenizer], ["lorachar"], torch.device("cpu"))
    assert torch.allclose(own.hidden, call["encoder_hidden_states"])
    # training latents, decoded the pipeline's way, are the VAE's own
    mean = torch.randn(32, 8, 8, generator=torch.Generator().manual_seed(2))
    normalised = FLUX2.sample_latents(mean, torch.zeros_like(mean), torch.Generator(), pipe.vae).unsqueeze(0)
    bn_std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    back = pipe._unpatchify_latents(normalised * bn_std + pipe.vae.bn.running_mean.view(1, -1, 1, 1))
    assert normalised.shape == (1, 128, 4, 4) and torch.allclose(back[0], mean, atol=1e-5)
    assert not torch.allclose(normalised, pipe._patchify_latents(mean.unsqueeze(0)), atol=1e-2)


def test_the_kohya_file_reproduces_the_trained_transformer_by_the_rule(f2_trained):
    from diffusers import Flux2Transformer2DModel

    components, result, summary = f2_trained["components"], f2_trained["result"], f2_trained["summary"]
    state, header = build_kohya_file(result.lora_state, summary, summary.unet_config(), "fp32", "t", "tiny")
    assert header["ss_base_model_version"] == "flux2" and header["modelspec.architecture"] == "flux-2-dev/lora"
    assert lora_header_family(header) is FLUX2
    modules = kohya_modules(state)
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_mlp_2",
            "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2"} <= modules.keys()
    assert len(modules) == 8 + 2 and not any("to_q" in name or "linear_in" in name for name in modules)
    base = Flux2Transformer2DModel.from_pretrained(f2_trained["params"].base_model, subfolder="transformer")
    before = _out(base)
    apply_rule(base, {n: (p["down"], p["up"], float(p["alpha"])) for n, p in modules.items()}, 1.0)
    trained = _out(components.denoiser)
    effect = (trained - before).abs().max().item()
    assert effect > 1e-4
    assert (_out(base) - trained).abs().max().item() < 1e-4 * max(1.0, effect)


def test_diffusers_reader_on_the_kohya_file_equals_our_diffusers_folder(f2_trained):
    from diffusers import Flux2Pipeline

    components, result, summary = f2_trained["components"], f2_trained["result"], f2_trained["summary"]
    state, header = build_kohya_file(result.lora_state, summary, summary.unet_config(), "fp32", "t", "tiny")
    kohya_path = f2_trained["tmp"] / "f2_kohya.safetensors"
    save_lora_file(kohya_path, state, header)
    folder = save_diffusers_lora(f2_trained["tmp"] / "f2_diffusers", result.lora_state, summary)
    outputs = outputs_through_diffusers(Flux2Pipeline, f2_trained["params"].base_model, {"kohya": kohya_path, "diffusers": folder}, _out)
    trained = _out(components.denoiser)
    assert torch.allclose(outputs["diffusers"], trained, atol=1e-5)
    assert torch.allclose(outputs["kohya"], outputs["diffusers"], atol=1e-5)


def test_downloaded_kohya_bfl_and_ai_toolkit_loras_stack_by_the_rule(tiny_models, tmp_path):
    from diffusers import Flux2Pipeline

    pipe = Flux2Pipeline.from_pretrained(str(tiny_models["tiny-flux2"]))
    base = _out(pipe.transformer)
    generator, table = torch.Generator().manual_seed(3), bfl_table(pipe.transformer)
    # a: kohya-style (musubi-tuner) fused qkv and linear1; b: BFL names under diffusion_model., lora_A / lora_B
    rule = {"a": {"lora_unet_" + p.replace(".", "_"): random_lora_pair(pipe.transformer, table[p], 2, generator)
                  for p in ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1")},
            "b": {p: random_lora_pair(pipe.transformer, table[p], 2, generator)
                  for p in ("double_blocks.0.txt_attn.qkv", "double_blocks.0.img_mlp.2", "single_blocks.0.linear2")}}
    # c: ai-toolkit's expanded diffusers paths under diffusion_model., one module each
    c = {"diffusion_model.transformer_blocks.0.attn.to_k": "transformer_blocks.0.attn.to_k",
         "diffusion_model.transformer_blocks.0.ff_context.linear_in": "transformer_blocks.0.ff_context.linear_in"}
    c_pairs = {name: random_lora_pair(pipe.transformer, (path,), 2, generator) for name, path in c.items()}
    state_a = {f"{n}.{k}": v for n, (d, u, a) in rule["a"].items()
               for k, v in (("lora_down.weight", d), ("lora_up.weight", u), ("alpha", torch.tensor(a).half()))}
    state_b = {f"diffusion_model.{n}.{k}": v for n, (d, u, a) in rule["b"].items()
               for k, v in (("lora_A.weight", d), ("lora_B.weight", u), ("alpha", torch.tensor(a).half()))}
    state_c = {f"{n}.{k}": v for n, (d, u, a) in c_pairs.items()
               for k, v in (("lora_A.weight", d), ("lora_B.weight", u), ("alpha", torch.tensor(a).half()))}
    for file, state in (("a", state_a), ("b", state_b), ("c", state_c)):
        save_file(state, tmp_path / f"{file}.safetensors")
    load_stack(pipe, FLUX2, {f: str(tmp_path / f"{f}.safetensors") for f in "abc"})
    set_weights(pipe, {"a": 0.6, "b": 0.8, "c": 0.5})
    reference = Flux2Pipeline.from_pretrained(str(tiny_models["tiny-flux2"]))
    apply_rule(reference.transformer, rule["a"], 0.6)
    apply_rule(reference.transformer, rule["b"], 0.8)
    with torch.no_grad():
        for name, (d, u, a) in c_pairs.items():
            reference.transformer.get_submodule(c[name]).weight += 0.5 * a / d.shape[0] * (u.float() @ d.float())
    expected = _out(reference.transformer)
    effect = (expected - base).abs().max().item()
    assert effect > 1e-3 and (_out(pipe.transformer) - expected).abs().max().item() < 1e-3 * effect


def test_default_targets_on_the_real_flux2_config_and_their_kohya_modules():
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        model = Flux2Transformer2DModel(**FLUX2_TRANSFORMER_CONFIG)
    targeted = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(BLOCK_LINEARS, n)]
    # 8 double blocks x (q, k, v, out, add q/k/v, add out, ff in/out, ff_context in/out); 48 single x 2
    assert len(targeted) == 8 * 12 + 48 * 2 == 192
    blocks = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "blocks." in n}
    assert blocks == set(targeted)  # every block Linear (modulation is shared, outside the blocks)
    pairs = {(FLUX2.denoiser, n): (torch.zeros(1, 1), torch.zeros(2, 1)) for n in targeted}
    assert len(FLUX2.to_kohya_modules(pairs, 1.0, model.config)) == 8 * 8 + 48 * 2 == 160  # q/k/v fused


def test_interrupted_then_resumed_flux2_run_equals_uninterrupted(tiny_models, tiny_examples, tmp_path):
    assert_same_run(*straight_and_resumed(tiny_models, tiny_examples, tmp_path, str(tiny_models["tiny-flux2"]),
                                          **SETTINGS, shuffle_tags=True))


def test_an_unknown_layout_and_a_flux1_lora_are_refused_by_name(tiny_models, tmp_path):
    """A file in no layout this reads names its keys and the layouts accepted; a Flux.1 LoRA (same BFL names, but
    per-block modulation Linears that Flux.2 does not have) names the module that has no layer here."""
    from diffusers import Flux2Pipeline

    from lora_pipeline.core.errors import DataError

    pipe = Flux2Pipeline.from_pretrained(str(tiny_models["tiny-flux2"]))
    mystery = tmp_path / "mystery.safetensors"
    save_file({"model.blocks.0.attention.wq.lora_A.weight": torch.zeros(2, 32),
               "model.blocks.0.attention.wq.lora_B.weight": torch.zeros(32, 2)}, str(mystery))
    with pytest.raises(DataError) as info:
        load_stack(pipe, FLUX2, {"mystery": mystery})
    message = str(info.value)
    assert "model.blocks.0.attention.wq.lora_A.weight" in message and "Flux.2" in message
    assert "lora_unet_" in message and "diffusion_model." in message
    flux1 = tmp_path / "flux1.safetensors"
    save_file({"lora_unet_double_blocks_0_img_mod_lin.lora_down.weight": torch.zeros(2, 32),
               "lora_unet_double_blocks_0_img_mod_lin.lora_up.weight": torch.zeros(192, 2)}, str(flux1))
    with pytest.raises(DataError, match="lora_unet_double_blocks_0_img_mod_lin"):
        load_stack(pipe, FLUX2, {"flux1": flux1})


# The transformer in BFL's flux2-dev layout, this test's own table (from diffusers' single-file converter's key maps):
# BFL name -> diffusers name outside the blocks, and within a double / single block.
BFL_PLAIN = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
             "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
             "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
             "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
             "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
             "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
             "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
             "single_stream_modulation.lin": "single_stream_modulation.linear"}
BFL_DOUBLE_NORMS = {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
                    "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"}
BFL_SINGLE_NORMS = {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}


def bfl_checkpoint(transformer) -> dict[str, torch.Tensor]:
    """``flux2-dev.safetensors``'s layout: every weight (Flux.2 has no biases), q/k/v fused, norms as ``.scale``,
    the final adaLN's (scale, shift) swapped to BFL's (shift, scale)."""
    ours = transformer.state_dict()
    out = {f"{bfl}.weight": ours[f"{name}.weight"] for bfl, name in BFL_PLAIN.items()}
    scale, shift = ours["norm_out.linear.weight"].chunk(2)
    out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
    for path, parts in bfl_table(transformer).items():
        out[f"{path}.weight"] = torch.cat([ours[f"{p}.weight"] for p in parts])
    for kind, original, norms in (("transformer_blocks", "double_blocks", BFL_DOUBLE_NORMS),
                                  ("single_transformer_blocks", "single_blocks", BFL_SINGLE_NORMS)):
        for index in range(len(getattr(transformer, kind))):
            for bfl, name in norms.items():
                out[f"{original}.{index}.{bfl}.scale"] = ours[f"{kind}.{index}.{name}.weight"]
    assert sum(t.numel() for t in out.values()) == sum(t.numel() for t in ours.values())  # nothing left out
    return {k: v.contiguous() for k, v in out.items()}


def test_a_bfl_flux2_transformer_file_loads_as_the_base_with_single_file_config(tiny_models, tmp_path):
    from diffusers import Flux2Transformer2DModel

    folder = tiny_models["tiny-flux2"]
    original = Flux2Transformer2DModel.from_pretrained(folder, subfolder="transformer")
    checkpoint = tmp_path / "flux2-dev.safetensors"
    save_file(bfl_checkpoint(original), checkpoint)
    assert detect_family(checkpoint) is FLUX2  # not Flux.1, whose double_blocks it shares
    components = load_diffusion_model(str(checkpoint), single_file_config=str(folder))
    assert components.family is FLUX2 and components.vae is not None
    loaded, expected = components.denoiser.state_dict(), original.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
