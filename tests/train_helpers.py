"""Helpers shared by the training and export tests."""

from __future__ import annotations

import torch

from lora_pipeline.core.config import TrainingParams
from lora_pipeline.diffusion.lora_files import kohya_modules


def make_params(tiny_models, tmp_path, **overrides) -> TrainingParams:
    values = dict(base_model=str(tiny_models["tiny-sd"]), device="cpu", lora_rank=4, alpha=8, batch_size=2,
                  max_steps=6, learning_rate=1e-3, checkpoint_dir=str(tmp_path / "checkpoints"), resume="none",
                  output_name="test_lora")
    values.update(overrides)
    return TrainingParams(**values)


def unet_inputs(components, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    hidden = torch.randn(2, 77, components.unet.config.cross_attention_dim, generator=generator)
    return sample, torch.tensor([10, 500]), hidden


def te_inputs(components):
    return components.tokenizer(["sks, red circle", "a photo of a dog"], padding="max_length", max_length=77,
                                return_tensors="pt").input_ids


@torch.no_grad()
def model_outputs(components) -> tuple[torch.Tensor, torch.Tensor]:
    unet = getattr(components.unet, "module", components.unet)
    unet.eval()
    components.text_encoder.eval()
    return unet(*unet_inputs(components)).sample, components.text_encoder(te_inputs(components))[0]


def webui_merge(base, kohya_state, strength=1.0):
    """Apply a kohya file the way WebUI/ComfyUI do: W += strength * alpha / r * up @ down.

    Written independently of the project's converters: module names are derived here from the base model.
    """
    names = {"lora_unet_" + n.replace(".", "_"): m for n, m in base.unet.named_modules() if n}
    names.update({"lora_te_text_model_" + n.replace(".", "_"): m for n, m in base.text_encoder.named_modules() if n})
    applied = 0
    with torch.no_grad():
        for name, parts in kohya_modules(kohya_state).items():
            module = names[name]
            down, up = parts["down"].float(), parts["up"].float()
            scale = strength * float(parts["alpha"]) / down.shape[0]
            delta = (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape)
            module.weight += scale * delta
            applied += 1
    return applied


def random_kohya_lora(components, rank: int, alpha: float, seed: int,
                      unet_targets=("to_q", "to_v", "ff.net.2", "proj_in"),
                      te_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1")) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors written the way kohya's sd-scripts names them (what users download)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    modules = [("lora_unet_" + n.replace(".", "_"), m) for n, m in components.unet.named_modules()
               if n.split(".")[-1] in unet_targets or any(n.endswith(t) for t in unet_targets)]
    modules += [("lora_te_text_model_" + n.replace(".", "_"), m) for n, m in components.text_encoder.named_modules()
                if n.split(".")[-1] in te_targets]
    for name, module in modules:
        weight = module.weight
        down_shape = (rank, weight.shape[1], *weight.shape[2:])
        up_shape = (weight.shape[0], rank, *([1] * (weight.ndim - 2)))
        state[f"{name}.lora_down.weight"] = torch.randn(down_shape, generator=generator) * 0.1
        state[f"{name}.lora_up.weight"] = torch.randn(up_shape, generator=generator) * 0.1
        state[f"{name}.alpha"] = torch.tensor(alpha)
    return state


SD1_UNET_LAYOUT = {"layers_per_block": 1, "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}


def summary_for(params: TrainingParams, spec=None, family: str = "sd1", **overrides):
    """An ImageTrainingSummary as the training node writes it, for export tests that skip the node."""
    from lora_pipeline.core.spec import ImageTrainingSummary, LoraSpec

    if spec is None:
        targets = {"unet": list(params.unet_targets)}
        if params.train_text_encoder:
            targets["text_encoder"] = list(params.text_encoder_targets)
        spec = LoraSpec(family=family, rank=params.lora_rank, alpha=params.alpha, dropout=params.dropout,
                        targets=targets)
    values = dict(spec=spec, base_model=params.base_model, output_name=params.output_name, steps=8, epochs=2,
                  seed=params.seed, learning_rate=params.learning_rate, text_encoder_lr=params.text_encoder_lr,
                  dataset_hash="d", started_at="t0", finished_at="t1", num_images=8, resolution=[96, 64],
                  trigger="sks", tag_frequency={"sks": 8}, unet_layout=SD1_UNET_LAYOUT)
    values.update(overrides)
    return ImageTrainingSummary(**values)


def run_dir(subject_folder):
    """The one run folder (``run-<signature>``) under a subject's checkpoint folder."""
    from pathlib import Path

    runs = sorted(Path(subject_folder).glob("run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def flux_transformer_inputs(transformer, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fixed inputs for a (tiny) FluxTransformer2DModel: 16 image and 12 text tokens, two sigmas, guidance 1 (a
    Chroma transformer: without the pooled CLIP embedding and the guidance)."""
    generator, config = torch.Generator().manual_seed(seed), transformer.config
    inputs = {"hidden_states": torch.randn(2, 16, config.in_channels, generator=generator),
              "encoder_hidden_states": torch.randn(2, 12, config.joint_attention_dim, generator=generator)}
    if "pooled_projection_dim" in config:
        inputs["pooled_projections"] = torch.randn(2, config.pooled_projection_dim, generator=generator)
        inputs["guidance"] = torch.tensor([1.0, 1.0])
    return {**inputs, "timestep": torch.tensor([0.3, 0.8]), "img_ids": torch.zeros(16, 3),
            "txt_ids": torch.zeros(12, 3)}


def real_width_flux(tiny_flux, target, transformer_class: str = "FluxTransformer2DModel"):
    """The tiny Flux (or Chroma) folder with a transformer of Flux.1-dev's width (3072 hidden: 24 heads of 128,
    12288 MLP) and one double and one single block (~530M parameters): what diffusers' Flux converters need,
    which hard-code Flux.1's widths."""
    import shutil

    import diffusers

    cls = getattr(diffusers, transformer_class)
    shutil.copytree(tiny_flux, target, ignore=shutil.ignore_patterns("transformer"))
    tiny = cls.load_config(tiny_flux / "transformer")
    torch.manual_seed(0)
    width = dict(num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
                 axes_dims_rope=[16, 56, 56])
    wide = cls(**{**{k: v for k, v in tiny.items() if not k.startswith("_")}, **width})
    wide.save_pretrained(target / "transformer")
    return target


def straight_and_resumed(tiny_models, examples, tmp_path, base_model: str, **settings):
    """The same run twice: straight through, and interrupted at step 3 (after checkpoint 2) then resumed with
    ``resume: latest``. ``settings`` need ``save_steps=2``; returns both results."""
    from lora_pipeline.core.cache import DiskCache
    from lora_pipeline.core.checkpoints import list_checkpoints
    from lora_pipeline.diffusion.loading import load_diffusion_model
    from lora_pipeline.diffusion.training import train

    def interrupt(step, _components):
        if step == 3:  # Ctrl-C between checkpoint 2 and checkpoint 4
            raise KeyboardInterrupt

    def run(folder, step_callback=None, **overrides):
        params = make_params(tiny_models, folder, base_model=base_model, **{**settings, **overrides})
        return train(load_diffusion_model(params.base_model), examples, params, DiskCache(folder / "cache"),
                     dataset_hash="d", step_callback=step_callback)

    straight = run(tmp_path / "straight")
    try:
        run(tmp_path / "resumed", step_callback=interrupt)
        raise AssertionError("the run was not interrupted")
    except KeyboardInterrupt:
        pass
    kept = list_checkpoints(run_dir(tmp_path / "resumed" / "checkpoints" / "test_lora"))
    assert [p.name for p in kept] == ["checkpoint-0000002"]
    resumed = run(tmp_path / "resumed", resume="latest")
    assert resumed.resumed_from.endswith("checkpoint-0000002")
    return straight, resumed


def assert_same_run(straight, resumed) -> None:
    """The resumed run ends tensor for tensor where the straight one does, with the same losses after step 2."""
    assert straight.losses[2:] == resumed.losses
    assert straight.lora_state.keys() == resumed.lora_state.keys()
    for key, tensor in straight.lora_state.items():
        assert torch.equal(tensor, resumed.lora_state[key]), key
    assert any(tensor.abs().max() > 0 for key, tensor in straight.lora_state.items() if ".lora_B." in key)


def random_lora_pair(transformer, paths, rank: int, generator, alpha: float = 3.0):
    """A downloaded-looking fp16 LoRA pair over the stacked outputs of ``paths`` (one module, or a fused one's parts):
    ``(down, up, alpha)``."""
    paths = (paths,) if isinstance(paths, str) else tuple(paths)
    width = transformer.get_submodule(paths[0]).in_features
    out = sum(transformer.get_submodule(p).out_features for p in paths)
    return (torch.randn(rank, width, generator=generator).half() * 0.2,
            torch.randn(out, rank, generator=generator).half() * 0.2, alpha)


def outputs_through_diffusers(pipeline_class, base_model: str, sources: dict, out) -> dict:
    """``{name: transformer output}`` after diffusers' own ``load_lora_weights`` of each LoRA source (a file in any
    layout diffusers converts, or our diffusers folder) on a fresh pipeline; each must change the output."""
    outputs = {}
    for name, source in sources.items():
        pipe = pipeline_class.from_pretrained(base_model)
        before = out(pipe.transformer)
        pipe.load_lora_weights(str(source))
        outputs[name] = out(pipe.transformer)
        assert (outputs[name] - before).abs().max() > 1e-4, name
    return outputs
