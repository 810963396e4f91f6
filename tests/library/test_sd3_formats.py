"""Downloaded SD3.5 LoRAs -- kohya's (``lora_unet_joint_blocks_…``), ComfyUI's original names
(``diffusion_model.joint_blocks.…``), OneTrainer's (``lora_transformer_`` + the diffusers path) and diffusers'
(``transformer.…``, alpha folded) -- stack (``<lora:a:0.6>, <lora:b:0.8>``) and merge on the tiny SD3.5 exactly as
ComfyUI's MMDiT rule (tests/comfyui_rules.py, written from ``mmdit_to_diffusers``) says."""

from __future__ import annotations

import torch
from comfyui_rules import apply_mmdit_rule, mmdit_parts
from safetensors.torch import save_file

from lora_pipeline.diffusion.families import SD3
from lora_pipeline.diffusion.stack import load_stack, merge_into_base, pipeline_modules, set_weights

# kohya module -> (rank, alpha): fused qkvs, the dual attention, plain modules and the last block's modulation
MODULES = {"lora_unet_joint_blocks_0_x_block_attn_qkv": (4, 2.0), "lora_unet_joint_blocks_1_context_block_attn_qkv":
           (2, 4.0), "lora_unet_joint_blocks_0_x_block_attn2_proj": (2, 1.0), "lora_unet_joint_blocks_0_x_block_mlp_fc1":
           (3, 3.0), "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1": (2, 2.0)}


def _pipe(tiny_models):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(str(tiny_models["tiny-sd3"]))


def _random_lora(transformer, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for name, (rank, alpha) in MODULES.items():
        paths, _ = mmdit_parts(transformer, name)
        width = transformer.get_submodule(paths[0]).in_features
        out = sum(transformer.get_submodule(p).out_features for p in paths)
        lora[name] = (torch.randn(rank, width, generator=generator).half() * 0.2,
                      torch.randn(out, rank, generator=generator).half() * 0.2, alpha)
    return lora


def _write(transformer, lora: dict, layout: str, path) -> str:
    """The LoRA in ``layout``, named by this file's own rules."""
    state = {}
    for name, (down, up, alpha) in lora.items():
        if layout == "kohya":
            entries = [(name, down, up, alpha, "lora_down.weight", "lora_up.weight")]
        elif layout == "comfyui":
            block, rest = name.removeprefix("lora_unet_joint_blocks_").split("_", 1)
            dotted = rest.replace("x_block_", "x_block.").replace("context_block_", "context_block.")
            dotted = dotted.replace("attn2_", "attn2.").replace("attn_", "attn.").replace("mlp_", "mlp.")
            dotted = dotted.replace("adaLN_modulation_1", "adaLN_modulation.1")
            entries = [(f"diffusion_model.joint_blocks.{block}.{dotted}", down, up, alpha, "lora_A.weight",
                        "lora_B.weight")]
        else:  # the diffusers layout: one module per diffusers Linear, the fused up cut by rows, swap undone
            paths, swapped = mmdit_parts(transformer, name)
            if swapped:
                up = torch.cat(up.chunk(2)[::-1])
            rows = torch.split(up, [transformer.get_submodule(p).out_features for p in paths])
            if layout == "onetrainer":
                entries = [("lora_transformer_" + p.replace(".", "_"), down, r, alpha, "lora_down.weight",
                            "lora_up.weight") for p, r in zip(paths, rows)]
            else:  # diffusers' save_lora_weights: no alpha, alpha / r folded into lora_B
                entries = [("transformer." + p, down.float(), r.float() * alpha / down.shape[0], None,
                            "lora_A.weight", "lora_B.weight") for p, r in zip(paths, rows)]
        for key, d, u, a, down_name, up_name in entries:
            state[f"{key}.{down_name}"], state[f"{key}.{up_name}"] = d.clone(), u.clone().contiguous()
            if a is not None:
                state[f"{key}.alpha"] = torch.tensor(a, dtype=torch.float16)
    save_file(state, str(path))
    return str(path)


@torch.no_grad()
def _out(transformer) -> torch.Tensor:
    generator, config = torch.Generator().manual_seed(0), transformer.config
    return transformer(hidden_states=torch.randn(2, 16, 8, 8, generator=generator),
                       encoder_hidden_states=torch.randn(2, 12, config.joint_attention_dim, generator=generator),
                       pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=generator),
                       timestep=torch.tensor([300.0, 800.0]), return_dict=False)[0]


def _same(got, want, base) -> None:
    effect = (want - base).abs().max().item()
    assert effect > 1e-3
    assert (got - want).abs().max().item() < 1e-3 * effect


def test_every_layout_stacks_and_merges_by_comfyuis_mmdit_rule(tiny_models, tmp_path):
    pipe = _pipe(tiny_models)
    base = _out(pipe.transformer)
    lora = _random_lora(pipe.transformer, 1)
    files = {layout: _write(pipe.transformer, lora, layout, tmp_path / f"{layout}.safetensors")
             for layout in ("kohya", "comfyui", "onetrainer", "diffusers")}
    load_stack(pipe, SD3, files)
    reference = _pipe(tiny_models)
    apply_mmdit_rule(reference.transformer, {k: (d, u, a) for k, (d, u, a) in lora.items()}, 0.7)
    expected = _out(reference.transformer)
    for layout in files:
        set_weights(pipe, {layout: 0.7})
        _same(_out(pipe.transformer), expected, base)

    other = _random_lora(pipe.transformer, 2)
    files["b"] = _write(pipe.transformer, other, "comfyui", tmp_path / "b.safetensors")
    load_stack(pipe, SD3, {"kohya": files["kohya"], "b": files["b"]})
    set_weights(pipe, {"kohya": 0.6, "b": 0.8})  # <lora:kohya:0.6>, <lora:b:0.8>
    both = _pipe(tiny_models)
    apply_mmdit_rule(both.transformer, lora, 0.6)
    apply_mmdit_rule(both.transformer, other, 0.8)
    _same(_out(pipe.transformer), _out(both.transformer), base)
    merged = _pipe(tiny_models)
    merge_into_base(pipeline_modules(merged, SD3), SD3, [(files["kohya"], 0.6), (files["b"], 0.8)])
    _same(_out(merged.transformer), _out(both.transformer), base)


def test_a_prompt_refuses_loras_of_another_family_and_names_each(tiny_models, tmp_path):
    import pytest

    from lora_pipeline.core.errors import LoraPipelineError

    pipe = _pipe(tiny_models)
    own = _write(pipe.transformer, _random_lora(pipe.transformer, 1), "kohya", tmp_path / "own.safetensors")
    foreign = {}
    for name, architecture in (("sdxl_style", "stable-diffusion-xl-v1-base/lora"), ("flux_face", "flux-1-dev/lora")):
        save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1), "lora_unet_x.lora_up.weight": torch.zeros(1, 1)},
                  str(tmp_path / f"{name}.safetensors"), metadata={"modelspec.architecture": architecture})
        foreign[name] = str(tmp_path / f"{name}.safetensors")
    with pytest.raises(LoraPipelineError, match=r"sdxl_style \(SDXL\), flux_face \(Flux.1\).*SD3.5"):
        load_stack(pipe, SD3, {"own": own, **foreign})
    assert not getattr(pipe.transformer, "peft_config", None)  # nothing was loaded, not even the fitting one
