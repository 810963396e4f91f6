"""Downloaded Flux.1 LoRAs in every layout people share them in -- kohya, BFL/ComfyUI, diffusers/PEFT (with and
without the ``transformer.`` prefix), OneTrainer (legacy and OMI) -- stack (``<lora:a:0.6>, <lora:b:0.8>``) and merge on the tiny
Flux, each checked against a rule written here: ``W += w * alpha / r * up @ down`` on the original (BFL) modules,
whose fused rows (``qkv``, ``linear1``) this file cuts back to diffusers' modules with its own table; LoKr by
``kron(w1, w2) * alpha / r``. The project's name mapping is not used to build the expectations."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from train_helpers import flux_transformer_inputs

from lora_pipeline.core.errors import DataError
from lora_pipeline.diffusion.families import FLUX
from lora_pipeline.diffusion.lora_files import read_lora_modules
from lora_pipeline.diffusion.stack import load_stack, merge_into_base, pipeline_modules, set_weights

# BFL module -> the diffusers modules whose rows it stacks (the tiny Flux: 2 double and 2 single blocks).
BFL = {}
for _i in range(2):
    _b = f"transformer_blocks.{_i}."
    BFL[f"double_blocks.{_i}.img_attn.qkv"] = [_b + "attn.to_q", _b + "attn.to_k", _b + "attn.to_v"]
    BFL[f"double_blocks.{_i}.txt_attn.qkv"] = [_b + "attn.add_q_proj", _b + "attn.add_k_proj", _b + "attn.add_v_proj"]
    for _bfl, _ours in (("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
                        ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                        ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
                        ("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear")):
        BFL[f"double_blocks.{_i}.{_bfl}"] = [_b + _ours]
    _s = f"single_transformer_blocks.{_i}."
    BFL[f"single_blocks.{_i}.linear1"] = [_s + "attn.to_q", _s + "attn.to_k", _s + "attn.to_v", _s + "proj_mlp"]
    BFL[f"single_blocks.{_i}.linear2"] = [_s + "proj_out"]
    BFL[f"single_blocks.{_i}.modulation.lin"] = [_s + "norm.linear"]
CLIP_Q = "encoder.layers.0.self_attn.q_proj"  # transformers 5's CLIPTextModel path (WebUI keys add text_model.)
T5_Q = "encoder.block.0.layer.0.SelfAttention.q"  # transformers' T5EncoderModel path (kohya's lora_te3_ names)


def _pipe(tiny_models, **kwargs):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(str(tiny_models["tiny-flux"]), **kwargs)


def _g(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.2


def random_lora(pipe, seed: int, modules: dict[str, tuple[int, float]], block_diagonal: tuple[str, ...] = (),
                clip: tuple[int, float] | None = None, t5: tuple[int, float] | None = None) -> dict:
    """``{("transformer" | "clip" | "t5", BFL or own module): (down, up, alpha)}`` in fp16, as a downloaded file
    holds it: random downs and ups of rank r for BFL modules (a fused qkv trained as one module: a dense up), or
    -- ``block_diagonal`` -- q/k/v trained apart and saved fused as kohya does (downs stacked, ups block-diagonal,
    alpha times 3)."""
    weights = dict(pipe.transformer.named_modules())
    lora, n = {}, seed * 100
    for bfl, (rank, alpha) in modules.items():
        outs = [weights[p].out_features for p in BFL[bfl]]
        width = weights[BFL[bfl][0]].in_features
        if bfl in block_diagonal:
            downs = [_g(rank, width, seed=n + k) for k in range(len(outs))]
            ups = [_g(out, rank, seed=n + 10 + k) for k, out in enumerate(outs)]
            lora["transformer", bfl] = (torch.cat(downs).half(), torch.block_diag(*ups).half(), alpha * len(outs))
        else:
            lora["transformer", bfl] = (_g(rank, width, seed=n).half(), _g(sum(outs), rank, seed=n + 1).half(), alpha)
        n += 20
    for which, spec, encoder, path in (("clip", clip, pipe.text_encoder, CLIP_Q), ("t5", t5, pipe.text_encoder_2, T5_Q)):
        if spec:
            layer = encoder.get_submodule(path)
            lora[which, path] = (_g(spec[0], layer.in_features, seed=n).half(),
                                 _g(layer.out_features, spec[0], seed=n + 1).half(), spec[1])
            n += 2
    return lora


def apply_rule(pipe, lora: dict, weight: float) -> None:
    """WebUI / ComfyUI: ``W += weight * alpha / r * up @ down``, the fused rows cut back to diffusers' modules."""
    with torch.no_grad():
        for (where, name), (down, up, alpha) in lora.items():
            delta = weight * alpha / down.shape[0] * up.float() @ down.float()
            if where == "transformer":
                row = 0
                for path in BFL[name]:
                    w = pipe.transformer.get_submodule(path).weight
                    w += delta[row:row + w.shape[0]]
                    row += w.shape[0]
                assert row == delta.shape[0]
            else:
                (pipe.text_encoder if where == "clip" else pipe.text_encoder_2).get_submodule(name).weight += delta


def _rows(pipe, bfl: str, up: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A fused module's up cut into its diffusers modules' rows."""
    sizes = [pipe.transformer.get_submodule(p).out_features for p in BFL[bfl]]
    return list(zip(BFL[bfl], torch.split(up, sizes)))


def write(pipe, lora: dict, layout: str, path) -> str:
    """The LoRA in ``layout``, with this file's own naming of each trainer's keys."""
    state: dict[str, torch.Tensor] = {}

    def put(name, down, up, alpha, a="lora_down.weight", b="lora_up.weight"):
        state[f"{name}.{a}"], state[f"{name}.{b}"] = down, up
        if alpha is not None:
            state[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float16)

    for (where, name), (down, up, alpha) in lora.items():
        clip_flat = "text_model_" + name.replace(".", "_")
        if layout == "kohya":
            prefix = {"transformer": "lora_unet_", "clip": "lora_te1_", "t5": "lora_te3_"}[where]
            put(prefix + (clip_flat if where == "clip" else name.replace(".", "_")), down, up, alpha)
        elif layout in ("bfl", "bfl_down_up"):
            keys = ("lora_A.weight", "lora_B.weight") if layout == "bfl" else ("lora_down.weight", "lora_up.weight")
            prefix = {"transformer": "diffusion_model.", "clip": "text_encoders.clip_l.transformer.text_model.",
                      "t5": "text_encoders.t5xxl.transformer."}[where]
            put(prefix + name, down, up, alpha, *keys)
        elif layout == "onetrainer":  # diffusers modules, . -> _, fused ones given per part (same down, its rows)
            if where == "transformer":
                for part, rows in _rows(pipe, name, up):
                    put("lora_transformer_" + part.replace(".", "_"), down, rows.contiguous(), alpha)
            else:
                put(("lora_te1_" + clip_flat) if where == "clip" else "lora_te2_" + name.replace(".", "_"),
                    down, up, alpha)
        elif layout == "omi":  # OneTrainer now: BFL names, a fused module's parts numbered (qkv.0 is to_q)
            if where == "transformer":
                parts = _rows(pipe, name, up)
                for k, (_, rows) in enumerate(parts):
                    put(f"transformer.{name}" + (f".{k}" if len(parts) > 1 else ""), down, rows.contiguous(), alpha)
            else:
                put(("clip_l.text_model." if where == "clip" else "t5.") + name, down, up, alpha)
        elif layout == "peft":  # diffusers' save_lora_weights: no alpha, alpha / r folded into lora_B (fp32)
            scale = alpha / down.shape[0]
            if where == "transformer":
                for part, rows in _rows(pipe, name, up):
                    put("transformer." + part, down.float(), rows.float() * scale, None, "lora_A.weight",
                        "lora_B.weight")
            elif where == "clip":
                put("text_encoder.text_model." + name, down.float(), up.float() * scale, None, "lora_A.weight",
                    "lora_B.weight")
        elif layout == "peft_bare":  # a PEFT state dict of the transformer saved as is: no prefix, with .alpha
            for part, rows in _rows(pipe, name, up):
                put(part, down, rows.contiguous(), alpha, "lora_A.weight", "lora_B.weight")
        else:
            raise AssertionError(layout)
    save_file({k: v.clone().contiguous() for k, v in state.items()}, str(path))  # (parts share a down)
    return str(path)


@torch.no_grad()
def outputs(pipe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The transformer's output and both text encoders' hidden states for fixed inputs."""
    ids = torch.arange(3, 13).reshape(1, 10)
    return (pipe.transformer(**flux_transformer_inputs(pipe.transformer), return_dict=False)[0],
            pipe.text_encoder(ids).last_hidden_state,
            pipe.text_encoder_2(ids)[0])


def assert_same(got, want, base, parts=(0, 1, 2), tolerance: float = 1e-3) -> None:
    """Each output equals the expected one within ``tolerance`` of what the LoRA changes (which must be visible)."""
    for k in parts:
        effect = (want[k] - base[k]).abs().max().item()
        assert effect > 1e-3, f"output {k}: the LoRA changes nothing"
        assert (got[k] - want[k]).abs().max().item() < tolerance * effect, f"output {k}"


MODULES_A = {"double_blocks.0.img_attn.qkv": (4, 2.5), "double_blocks.1.txt_attn.qkv": (2, 1.0),
             "single_blocks.0.linear1": (4, 8.0), "double_blocks.0.img_mlp.0": (3, 1.5),
             "single_blocks.1.linear2": (2, 4.0), "double_blocks.1.txt_mod.lin": (2, 0.5)}


def test_a_kohya_flux_lora_in_fp16_stacks_by_the_webui_rule(tiny_models, tmp_path):
    pipe = _pipe(tiny_models)
    base = outputs(pipe)
    lora = random_lora(pipe, 1, MODULES_A, block_diagonal=("double_blocks.1.txt_attn.qkv",), clip=(2, 3.0),
                       t5=(2, 1.0))
    path = write(pipe, lora, "kohya", tmp_path / "kohya.safetensors")
    load_stack(pipe, FLUX, {"a": path})
    set_weights(pipe, {"a": 0.7})
    stacked = outputs(pipe)

    reference = _pipe(tiny_models)
    apply_rule(reference, lora, 0.7)
    assert_same(stacked, outputs(reference), base)  # the transformer, CLIP (adapter) and T5 (weight patch)
    set_weights(pipe, {})
    for got, want in zip(outputs(pipe), base):
        assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("layout", ["bfl", "bfl_down_up", "peft", "peft_bare", "onetrainer", "omi"])
def test_every_layout_patches_the_transformer_as_the_kohya_file_does(tiny_models, tmp_path, layout):
    pipe = _pipe(tiny_models)
    base = outputs(pipe)
    lora = random_lora(pipe, 2, MODULES_A, block_diagonal=("double_blocks.0.img_attn.qkv",),
                       clip=None if layout == "peft_bare" else (2, 3.0),
                       t5=None if layout.startswith("peft") else (2, 1.0))
    load_stack(pipe, FLUX, {"kohya": write(pipe, lora, "kohya", tmp_path / "kohya.safetensors"),
                            "other": write(pipe, lora, layout, tmp_path / f"{layout}.safetensors")})
    set_weights(pipe, {"kohya": 0.8})
    as_kohya = outputs(pipe)
    set_weights(pipe, {"other": 0.8})
    as_other = outputs(pipe)
    parts = (0,) if layout == "peft_bare" else (0, 1) if layout == "peft" else (0, 1, 2)
    assert_same(as_other, as_kohya, base, parts)
    reference = _pipe(tiny_models)
    apply_rule(reference, lora, 0.8)
    assert_same(as_other, outputs(reference), base, parts)
    if layout == "peft":  # diffusers' own loader reads this layout too: the same transformer
        independent = _pipe(tiny_models)
        independent.load_lora_weights(str(tmp_path / "peft.safetensors"), adapter_name="x")
        independent.set_adapters(["x"], [0.8])
        assert_same(outputs(independent), as_other, base, (0,))


def test_two_files_of_different_layouts_stack_and_merge_as_the_sum_of_their_deltas(tiny_models, tmp_path):
    pipe = _pipe(tiny_models)
    base = outputs(pipe)
    a = random_lora(pipe, 3, MODULES_A, clip=(2, 3.0))
    b = random_lora(pipe, 4, {"double_blocks.0.img_attn.qkv": (2, 4.0), "single_blocks.1.linear1": (3, 1.0),
                              "double_blocks.1.img_attn.proj": (2, 2.0)}, t5=(2, 2.0))
    files = {"a": write(pipe, a, "kohya", tmp_path / "a.safetensors"),
             "b": write(pipe, b, "bfl", tmp_path / "b.safetensors")}
    load_stack(pipe, FLUX, files)
    set_weights(pipe, {"a": 0.6, "b": 0.8})  # <lora:a:0.6>, <lora:b:0.8>
    stacked = outputs(pipe)
    reference = _pipe(tiny_models)
    apply_rule(reference, a, 0.6)
    apply_rule(reference, b, 0.8)
    expected = outputs(reference)
    assert_same(stacked, expected, base)

    merged = _pipe(tiny_models)
    merge_into_base(pipeline_modules(merged, FLUX), FLUX, [(files["a"], 0.6), (files["b"], 0.8)])
    assert_same(outputs(merged), expected, base)

    set_weights(pipe, {"b": 0.8})  # the next prompt without a
    only_b = _pipe(tiny_models)
    apply_rule(only_b, b, 0.8)
    assert_same(outputs(pipe), outputs(only_b), base, (0, 2))


def test_lokr_modules_on_a_fused_and_a_plain_module(tiny_models, tmp_path):
    pipe = _pipe(tiny_models)
    qkv = [pipe.transformer.get_submodule(p).weight.detach().clone() for p in BFL["double_blocks.0.img_attn.qkv"]]
    linear2 = pipe.transformer.get_submodule(BFL["single_blocks.1.linear2"][0]).weight.detach().clone()
    h, width = qkv[0].shape
    # BFL layout on the fused qkv: kron(w1, w2_a @ w2_b) * alpha / r, r = w2_b's rows
    w1, w2a, w2b = _g(3, 2, seed=1), _g(h, 2, seed=2), _g(2, width // 2, seed=3)
    qkv_delta = torch.kron(w1, w2a @ w2b) * 4.0 / 2
    # OneTrainer layout on a plain module, both factors whole: scale 1
    v1, v2 = _g(2, 4, seed=4), _g(linear2.shape[0] // 2, linear2.shape[1] // 4, seed=5)
    linear2_delta = torch.kron(v1, v2)
    path = tmp_path / "lokr.safetensors"
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1": w1,
               "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2_a": w2a,
               "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2_b": w2b,
               "diffusion_model.double_blocks.0.img_attn.qkv.alpha": torch.tensor(4.0),
               "lora_transformer_single_transformer_blocks_1_proj_out.lokr_w1": v1,
               "lora_transformer_single_transformer_blocks_1_proj_out.lokr_w2": v2}, str(path))
    base_out = outputs(pipe)[0]
    load_stack(pipe, FLUX, {"lokr": path})
    set_weights(pipe, {"lokr": 0.7})
    expected = torch.cat(qkv) + 0.7 * qkv_delta
    got = torch.cat([pipe.transformer.get_submodule(p).weight for p in BFL["double_blocks.0.img_attn.qkv"]])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)  # ΔW over qkv, cut into to_q/to_k/to_v
    torch.testing.assert_close(pipe.transformer.get_submodule(BFL["single_blocks.1.linear2"][0]).weight,
                               linear2 + 0.7 * linear2_delta, atol=1e-5, rtol=1e-4)
    stacked = outputs(pipe)[0]
    assert (stacked - base_out).abs().max() > 1e-3

    merged = _pipe(tiny_models)
    merge_into_base(pipeline_modules(merged, FLUX), FLUX, [(path, 0.7)])
    assert torch.allclose(outputs(merged)[0], stacked, atol=1e-5)
    set_weights(pipe, {})
    for p, original in zip(BFL["double_blocks.0.img_attn.qkv"], qkv):
        assert torch.equal(pipe.transformer.get_submodule(p).weight, original)


def test_an_unknown_layout_is_refused_with_its_keys_and_the_layouts_accepted(tiny_models, tmp_path):
    pipe = _pipe(tiny_models)
    path = tmp_path / "mystery.safetensors"
    save_file({"model.blocks.0.attention.wq.lora_A.weight": torch.zeros(2, 64),
               "model.blocks.0.attention.wq.lora_B.weight": torch.zeros(64, 2)}, str(path))
    with pytest.raises(DataError) as info:
        load_stack(pipe, FLUX, {"mystery": path})
    message = str(info.value)
    assert "model.blocks.0.attention.wq.lora_A.weight" in message and "layout" in message
    for accepted in ("lora_unet_", "diffusion_model.", "transformer.", "lora_transformer_"):
        assert accepted in message


def test_t5_modules_apply_when_they_resolve_and_are_named_when_they_do_not(tiny_models, tmp_path):
    pipe = _pipe(tiny_models)
    bad = tmp_path / "t5_other.safetensors"
    save_file({"lora_te3_encoder_block_7_layer_0_SelfAttention_q.lora_down.weight": torch.zeros(2, 32),
               "lora_te3_encoder_block_7_layer_0_SelfAttention_q.lora_up.weight": torch.zeros(32, 2),
               "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(2, 64),
               "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(64, 2)}, str(bad))
    with pytest.raises(DataError, match=r"text_encoder_2 .*lora_te3_encoder_block_7_layer_0_SelfAttention_q"):
        read_lora_modules(bad, FLUX, pipeline_modules(pipe, FLUX))
    good = random_lora(pipe, 5, {}, t5=(2, 1.0))
    path = write(pipe, good, "kohya", tmp_path / "t5.safetensors")
    modules = read_lora_modules(path, FLUX, pipeline_modules(pipe, FLUX))
    assert [(m.component, m.path) for m in modules] == [("text_encoder_2", T5_Q)]
    without_t5 = _pipe(tiny_models, text_encoder_2=None, tokenizer_2=None)
    with pytest.raises(DataError, match="loaded without text_encoder_2.*lora_te3_encoder_block_0"):
        read_lora_modules(path, FLUX, pipeline_modules(without_t5, FLUX))
