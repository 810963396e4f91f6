"""Downloaded LyCORIS files (LoCon, LoHa, LoKr, DoRA) in merge and in a stacked prompt, SD1.x and SDXL.

Each merge is checked against the published formula written out here, and against lycoris-lora's own
functions where that package is installed."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lora_pipeline.core.errors import DataError
from lora_pipeline.diffusion.families import SDXL
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.lora_files import read_lora_modules
from lora_pipeline.diffusion.stack import load_stack, merge_into_base, set_weights

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
CONV = "down_blocks.0.resnets.0.conv1"


def _weight(components, path: str) -> torch.Tensor:
    return components.unet.get_submodule(path).weight.detach().clone().float()


def _name(components, path: str) -> str:
    return components.family.kohya_name("unet", path, components.unet.config)


def _g(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape))) * 0.1


def lycoris_file(components, tmp_path) -> tuple:
    """One file with a module of each kind, and each module's ΔW at strength 1 computed by hand."""
    q, k, v = (_weight(components, f"{ATTN}.{x}") for x in ("to_q", "to_k", "to_v"))
    conv, out = _weight(components, CONV), _weight(components, f"{ATTN}.to_out.0")
    tensors, expected = {}, {}
    # LoHa on to_q: (w1a @ w1b) * (w2a @ w2b) * alpha / r
    n, r, alpha = _name(components, f"{ATTN}.to_q"), 2, 1.0
    w1a, w1b, w2a, w2b = _g(q.shape[0], r), _g(r, q.shape[1], seed=1), _g(q.shape[0], r, seed=2), _g(r, q.shape[1], seed=3)
    tensors.update({f"{n}.hada_w1_a": w1a, f"{n}.hada_w1_b": w1b, f"{n}.hada_w2_a": w2a, f"{n}.hada_w2_b": w2b,
                    f"{n}.alpha": torch.tensor(alpha)})
    expected[f"{ATTN}.to_q"] = (w1a @ w1b) * (w2a @ w2b) * alpha / r
    # LoKr on to_k: kron(w1, w2a @ w2b) * alpha / r (w1 whole, w2 low-rank)
    n, r, alpha = _name(components, f"{ATTN}.to_k"), 2, 4.0
    w1 = _g(2, 2, seed=4)
    w2a, w2b = _g(k.shape[0] // 2, r, seed=5), _g(r, k.shape[1] // 2, seed=6)
    tensors.update({f"{n}.lokr_w1": w1, f"{n}.lokr_w2_a": w2a, f"{n}.lokr_w2_b": w2b, f"{n}.alpha": torch.tensor(alpha)})
    expected[f"{ATTN}.to_k"] = torch.kron(w1, w2a @ w2b) * alpha / r
    # LoHa with Tucker cores on the 3x3 resnet conv (LoCon-style conv target)
    n, r = _name(components, CONV), 2
    t1, t2 = _g(r, r, 3, 3, seed=7), _g(r, r, 3, 3, seed=8)
    a1, b1, a2, b2 = _g(r, conv.shape[0], seed=9), _g(r, conv.shape[1], seed=10), _g(r, conv.shape[0], seed=11), \
        _g(r, conv.shape[1], seed=12)
    tensors.update({f"{n}.hada_t1": t1, f"{n}.hada_t2": t2, f"{n}.hada_w1_a": a1, f"{n}.hada_w1_b": b1,
                    f"{n}.hada_w2_a": a2, f"{n}.hada_w2_b": b2, f"{n}.alpha": torch.tensor(2.0)})
    rebuild = [torch.einsum("ijkl,jr,ip->prkl", t, b, a) for t, a, b in ((t1, a1, b1), (t2, a2, b2))]
    expected[CONV] = rebuild[0] * rebuild[1] * 2.0 / r
    # DoRA on to_v: m * (W + s*up@down) / ||W + s*up@down|| per output row
    n, r = _name(components, f"{ATTN}.to_v"), 2
    down, up = _g(r, v.shape[1], seed=13), _g(v.shape[0], r, seed=14)
    magnitude = v.norm(dim=1, keepdim=True) * 1.3
    tensors.update({f"{n}.lora_down.weight": down, f"{n}.lora_up.weight": up, f"{n}.alpha": torch.tensor(1.0),
                    f"{n}.dora_scale": magnitude})
    merged = v + up @ down * 1.0 / r
    expected[f"{ATTN}.to_v"] = magnitude * merged / merged.norm(dim=1, keepdim=True) - v
    # plain LoCon pair on to_out (a PEFT adapter in generation)
    n = _name(components, f"{ATTN}.to_out.0")
    down, up = _g(r, out.shape[1], seed=15), _g(out.shape[0], r, seed=16)
    tensors.update({f"{n}.lora_down.weight": down, f"{n}.lora_up.weight": up, f"{n}.alpha": torch.tensor(1.0)})
    expected[f"{ATTN}.to_out.0"] = up @ down / r
    path = tmp_path / "downloaded_lycoris.safetensors"
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path))
    return path, expected


def test_merge_follows_each_published_formula(tiny_models, tmp_path):
    components = load_diffusion_model(str(tiny_models["tiny-sd"]))
    path, expected = lycoris_file(components, tmp_path)
    base = {p: _weight(components, p) for p in expected}
    merge_into_base(components.modules(), components.family, [(path, 0.7)])
    for p, delta in expected.items():  # (DoRA's entry is W' - W: strength s moves the base by s * (W' - W))
        torch.testing.assert_close(_weight(components, p), base[p] + 0.7 * delta, atol=1e-5, rtol=1e-4)


def test_the_same_deltas_as_lycoris_lora(tiny_models, tmp_path):
    pytest.importorskip("lycoris")
    from lycoris.functional import general, loha, lokr

    components = load_diffusion_model(str(tiny_models["tiny-sd"]))
    path, _ = lycoris_file(components, tmp_path)
    modules = {m.path: m for m in read_lora_modules(path, components.family, components.modules())}
    t = modules[f"{ATTN}.to_q"].tensors
    theirs = loha.diff_weight(t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], None, None,
                              gamma=float(t["alpha"]) / 2, backend="torch")
    torch.testing.assert_close(modules[f"{ATTN}.to_q"].diff(theirs.shape), theirs)
    t = modules[f"{ATTN}.to_k"].tensors
    theirs = lokr.kron_weight(t["lokr_w1"], None, None, None, t["lokr_w2_a"], t["lokr_w2_b"], None,
                              scale=float(t["alpha"]) / 2, backend="torch")
    torch.testing.assert_close(modules[f"{ATTN}.to_k"].diff(theirs.shape), theirs)
    conv = _weight(components, CONV)
    t = modules[CONV].tensors
    theirs = loha.diff_weight(t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], t["hada_t1"],
                              t["hada_t2"], gamma=1.0, backend="torch")
    torch.testing.assert_close(modules[CONV].diff(conv.shape), theirs)
    v = _weight(components, f"{ATTN}.to_v")
    dora = modules[f"{ATTN}.to_v"]
    theirs = general._weight_decompose(v + dora.diff(v.shape), dora.tensors["dora_scale"], 1, True)
    torch.testing.assert_close(v + dora.delta(1.0, v), theirs, atol=1e-5, rtol=1e-4)


def test_a_lycoris_file_stacks_in_a_prompt_and_unloads(tiny_models, tmp_path):
    components = load_diffusion_model(str(tiny_models["tiny-sd"]))
    path, expected = lycoris_file(components, tmp_path)
    pipe = components.pipeline()
    base = {p: _weight(components, p) for p in expected}
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 77, components.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_out = pipe.unet(sample, 10, hidden).sample
    load_stack(pipe, components.family, {"downloaded": path})
    set_weights(pipe, {"downloaded": 0.6})
    with torch.no_grad():
        stacked = pipe.unet(sample, 10, hidden).sample
    for p in (f"{ATTN}.to_q", f"{ATTN}.to_k", CONV):  # patched layers: base + 0.6 ΔW
        torch.testing.assert_close(pipe.unet.get_submodule(p).weight.float(), base[p] + 0.6 * expected[p],
                                   atol=1e-5, rtol=1e-4)
    # the whole prompt equals a model with the file merged at 0.6
    reference = load_diffusion_model(str(tiny_models["tiny-sd"]))
    merge_into_base(reference.modules(), reference.family, [(path, 0.6)])
    with torch.no_grad():
        torch.testing.assert_close(stacked, reference.unet(sample, 10, hidden).sample, atol=1e-5, rtol=1e-4)
    set_weights(pipe, {})  # the next prompt without it: the base weights exactly
    for p in (f"{ATTN}.to_q", f"{ATTN}.to_k", CONV, f"{ATTN}.to_v"):
        assert torch.equal(pipe.unet.get_submodule(p).weight.float(), base[p])
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(sample, 10, hidden).sample, base_out)


def test_sdxl_names_work_for_lycoris_modules(tiny_models, tmp_path):
    components = load_diffusion_model(str(tiny_models["tiny-sdxl"]))
    assert components.family is SDXL
    path = "down_blocks.1.resnets.0.conv1"
    weight = _weight(components, path)
    name = _name(components, path)
    assert name.startswith("lora_unet_input_blocks_")  # the SGM name WebUI and ComfyUI use
    w1 = _g(2, 1, seed=20)
    w2 = _g(weight.shape[0] // 2, weight.shape[1], 3, 3, seed=21)
    file = tmp_path / "sdxl_lokr.safetensors"
    save_file({f"{name}.lokr_w1": w1, f"{name}.lokr_w2": w2}, str(file))
    merge_into_base(components.modules(), components.family, [(file, 1.0)])
    expected = torch.kron(w1.unsqueeze(-1).unsqueeze(-1), w2)  # whole factors: scale 1
    torch.testing.assert_close(_weight(components, path), weight + expected, atol=1e-5, rtol=1e-4)


def test_unsupported_lycoris_kinds_are_named(tiny_models, tmp_path):
    components = load_diffusion_model(str(tiny_models["tiny-sd"]))
    file = tmp_path / "oft.safetensors"
    save_file({f"{_name(components, f'{ATTN}.to_q')}.oft_blocks": torch.zeros(4, 8, 8)}, str(file))
    with pytest.raises(DataError, match="OFT weight"):
        read_lora_modules(file, components.family, components.modules())


def test_a_lycoris_file_cannot_seed_training(tiny_models, tmp_path):
    from lora_pipeline.diffusion.lora_files import to_peft_state

    components = load_diffusion_model(str(tiny_models["tiny-sd"]))
    path, _ = lycoris_file(components, tmp_path)
    with pytest.raises(DataError, match="only a plain LoRA can seed training"):
        to_peft_state(read_lora_modules(path, components.family, components.modules()))
