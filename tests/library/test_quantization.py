"""training.base_quantization (nf4: bitsandbytes, float8: torchao): the errors before anything loads (no CUDA, the
package missing, a CPU device, not bf16), in the loader, the preflight and set_up; and, on CPU, the quantization
itself and LoRA training on top of it on the tiny Flux.

Both libraries quantize and run on CPU too (bitsandbytes 0.50's CPU backend, torchao's Float8Tensor): the
training test quantizes with the very function the loader calls on CUDA (``quantize_denoiser``) and hands the
quantized base to ``train`` as the loader would, skipping only the CUDA gate. The CUDA runs themselves are in
benchmarks/gpu_check.py (``--only quantization``). The byte layouts that benchmarks/flux_memory.py counts for the
full Flux.1-dev are checked here against the tensors the libraries create."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import make_params, summary_for

from lora_pipeline.core.cache import DiskCache
from lora_pipeline.core.config import TrainingParams, parse_params
from lora_pipeline.core.errors import ConfigError
from lora_pipeline.diffusion.families import FLUX
from lora_pipeline.diffusion.loading import (
    check_base_quantization,
    load_diffusion_model,
    module_fingerprint,
    quantize_denoiser,
    quantized_with,
)
from lora_pipeline.diffusion.lora_files import kohya_modules, save_diffusers_lora, to_kohya_state_dict
from lora_pipeline.diffusion.training import train
from lora_pipeline.project.preflight import check_inputs

PACKAGES = {"nf4": "bitsandbytes", "float8": "torchao"}
FIX = "pip install 'lora_pipeline[quantization]'"

REPO_ROOT = Path(__file__).resolve().parents[2]


def _flux_memory():
    spec = importlib.util.spec_from_file_location("flux_memory", REPO_ROOT / "benchmarks" / "flux_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- the setting and its errors

def test_base_quantization_is_one_of_three():
    assert TrainingParams(base_model="m").base_quantization == "none"
    assert TrainingParams(base_model="m", base_quantization="nf4").base_quantization == "nf4"
    with pytest.raises(ConfigError) as raised:
        parse_params(TrainingParams, {"base_model": "m", "base_quantization": "int4"}, "training")
    assert "training.base_quantization" in str(raised.value) and "'none', 'nf4' or 'float8'" in str(raised.value)


@pytest.mark.parametrize("method", ["nf4", "float8"])
def test_no_cuda_stops_the_loader_before_anything_loads(method, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    missing = tmp_path / "no_such_model"  # the base is never looked at: resolving it would raise otherwise
    with pytest.raises(ConfigError) as raised:
        load_diffusion_model(str(missing), base_quantization=method)
    message = str(raised.value)
    assert message.startswith("training.base_quantization:") and method in message
    assert "this machine has no CUDA device" in message and FIX in message and "base_quantization: none" in message


@pytest.mark.parametrize("method", ["nf4", "float8"])
def test_a_missing_package_is_named_with_the_install_command(method, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine without the package
    monkeypatch.setitem(sys.modules, PACKAGES[method], None)  # import fails as if not installed
    with pytest.raises(ConfigError) as raised:
        check_base_quantization(method, "auto", "bf16")
    message = str(raised.value)
    assert f"{method} needs the {PACKAGES[method]} package" in message and FIX in message
    assert "no CUDA device" not in message and "mixed_precision is" not in message  # only the real reason


def test_a_cpu_device_and_fp32_are_refused_on_a_gpu_machine_too(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="training.device is cpu"):
        check_base_quantization("float8", "cpu", "bf16")
    with pytest.raises(ConfigError, match="training.mixed_precision is no"):
        check_base_quantization("nf4", "cuda", "no")
    check_base_quantization("none", "cpu", "no")  # nothing asked, nothing checked


def test_the_loader_loads_the_denoiser_in_bf16_and_quantizes_it_onto_cuda(tiny_models, monkeypatch):
    """The loader's own path on a GPU machine, up to the quantizer (recorded here instead of run: no CUDA)."""
    from lora_pipeline.diffusion import loading

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls = []
    monkeypatch.setattr(loading, "quantize_denoiser", lambda model, method, device: calls.append(
        (model, method, device)))
    components = load_diffusion_model(str(tiny_models["tiny-flux"]), base_quantization="nf4")
    assert calls == [(components.denoiser, "nf4", torch.device("cuda"))]
    assert {p.dtype for p in components.denoiser.parameters()} == {torch.bfloat16}  # no fp32 copy first
    assert {p.dtype for te in components.text_encoders for p in te.parameters()} == {torch.float32}  # as always
    assert components.vae.dtype == torch.float32


def test_preflight_names_the_subjects_setting(tiny_models):
    params = TrainingParams(base_model=str(tiny_models["tiny-flux"]), base_quantization="nf4", device="cpu",
                            mixed_precision="bf16")
    with pytest.raises(ConfigError) as raised:
        check_inputs({"aki.training": params})
    assert str(raised.value).startswith("aki.training.base_quantization: nf4 cannot be used here")
    assert "training.device is cpu" in str(raised.value)
    check_inputs({"aki.training": params.model_copy(update={"base_quantization": "none"})})


def test_set_up_refuses_before_quantizing_a_base_loaded_without_it(tiny_models, tiny_examples, tmp_path):
    components = load_diffusion_model(str(tiny_models["tiny-flux"]))
    params = make_params(tiny_models, tmp_path, base_model=str(tiny_models["tiny-flux"]), base_quantization="float8",
                         mixed_precision="bf16")
    with pytest.raises(ConfigError, match="training.base_quantization: float8 cannot be used here"):
        train(components, tiny_examples, params, DiskCache(tmp_path / "cache"), dataset_hash="d")
    assert quantized_with(components.denoiser) == "none"


# ----------------------------------------------------------------------------- quantized training on CPU

def _inputs(config, dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(2, 16, config.in_channels, generator=generator).to(dtype),
            "encoder_hidden_states": torch.randn(2, 12, config.joint_attention_dim, generator=generator).to(dtype),
            "pooled_projections": torch.randn(2, config.pooled_projection_dim, generator=generator).to(dtype),
            "timestep": torch.tensor([0.3, 0.8], dtype=dtype), "guidance": torch.tensor([1.0, 1.0], dtype=dtype),
            "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(12, 3)}


@torch.no_grad()
def _out(transformer, dtype) -> torch.Tensor:
    transformer = getattr(transformer, "module", transformer)
    transformer.eval()
    return transformer(**_inputs(transformer.config, dtype), return_dict=False)[0].float()


@pytest.mark.parametrize("method", ["nf4", "float8"])
def test_lora_trains_on_a_quantized_flux_and_exports(method, tiny_models, tiny_examples, tmp_path):
    from diffusers import FluxPipeline

    base = str(tiny_models["tiny-flux"])
    components = load_diffusion_model(base)
    plain_id = module_fingerprint(components.denoiser)
    quantize_denoiser(components.denoiser, method, "cpu")  # what the loader does on CUDA, after its CUDA gate
    to_q = components.denoiser.transformer_blocks[0].attn.to_q
    stored = {"nf4": "Params4bit", "float8": "Float8Tensor"}[method]
    assert type(to_q.weight).__name__ == stored and quantized_with(components.denoiser) == method
    again = load_diffusion_model(base)
    quantize_denoiser(again.denoiser, method, "cpu")
    assert module_fingerprint(components.denoiser) == module_fingerprint(again.denoiser) != plain_id
    quantized_before = _out(again.denoiser, torch.bfloat16)

    params = make_params(tiny_models, tmp_path, base_model=base, base_quantization=method, mixed_precision="bf16",
                         max_steps=6, lora_rank=4, alpha=2, learning_rate=3e-2)
    result = train(components, tiny_examples, params, DiskCache(tmp_path / "cache"), dataset_hash="d")

    assert result.steps == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    denoiser = getattr(components.denoiser, "module", components.denoiser)
    wrapper = {"nf4": "Linear4bit", "float8": "TorchaoLoraLinear"}[method]
    to_q = denoiser.transformer_blocks[0].attn.to_q
    assert type(to_q).__name__ == wrapper and type(to_q.base_layer.weight).__name__ == stored  # PEFT on top
    assert denoiser.gradient_checkpointing  # on by default under a quantized base
    assert all(v.dtype == torch.float32 for v in result.lora_state.values())
    assert all(v.abs().max() > 0 for k, v in result.lora_state.items() if "lora_B" in k)  # every up moved off 0

    kohya = to_kohya_state_dict(result.lora_state, FLUX, params.alpha, None, torch.float32)
    modules = kohya_modules(kohya)
    assert "lora_unet_double_blocks_0_img_attn_qkv" in modules and "lora_unet_single_blocks_1_linear1" in modules
    assert all(torch.isfinite(t).all() for t in kohya.values())

    # The LoRA learnt on the quantized base, loaded by diffusers onto the full-precision base (what a user does
    # with the file), changes that base's output as it changed the quantized one's, up to the quantization error.
    # (A large learning rate: the effect must stand well above bf16's rounding of the outputs, ~2% of it here.
    # Measured: nf4 0.12, float8 0.036 of the effect.)
    effect_quantized = _out(components.denoiser, torch.bfloat16) - quantized_before
    summary = summary_for(params, result.spec, family="flux")
    folder = save_diffusers_lora(tmp_path / "lora", result.lora_state, summary)
    pipe = FluxPipeline.from_pretrained(base)
    before = _out(pipe.transformer, torch.float32)
    pipe.load_lora_weights(str(folder))
    effect_full = _out(pipe.transformer, torch.float32) - before
    size = effect_full.abs().max().item()
    assert size > 0.1 * before.abs().max().item()
    relative = (effect_quantized - effect_full).abs().max().item() / size
    assert relative < {"nf4": 0.25, "float8": 0.1}[method], relative


def test_an_explicit_false_keeps_checkpointing_off_with_a_warning(tiny_models, tiny_examples, tmp_path, caplog):
    components = load_diffusion_model(str(tiny_models["tiny-flux"]))
    quantize_denoiser(components.denoiser, "float8", "cpu")
    params = make_params(tiny_models, tmp_path, base_model=str(tiny_models["tiny-flux"]), base_quantization="float8",
                         mixed_precision="bf16", max_steps=1, gradient_checkpointing=False)
    with caplog.at_level("WARNING", logger="lora_pipeline.diffusion.training"):
        train(components, tiny_examples, params, DiskCache(tmp_path / "cache"), dataset_hash="d")
    assert not getattr(components.denoiser, "module", components.denoiser).gradient_checkpointing
    assert "Set gradient_checkpointing: true if the step runs out of memory" in caplog.text


def test_a_quantized_base_needs_bf16(tiny_models, tiny_examples, tmp_path):
    components = load_diffusion_model(str(tiny_models["tiny-flux"]))
    quantize_denoiser(components.denoiser, "nf4", "cpu")
    params = make_params(tiny_models, tmp_path, base_model=str(tiny_models["tiny-flux"]), max_steps=1)
    with pytest.raises(ConfigError, match="Set mixed_precision: bf16"):
        train(components, tiny_examples, params, DiskCache(tmp_path / "cache"), dataset_hash="d")


# ----------------------------------------------------------------------------- benchmarks/flux_memory.py's counts

def _stored_bytes(model: torch.nn.Module) -> int:
    """What a (quantized) model holds: plain parameters, Float8Tensor's data and scales, bitsandbytes' packed codes
    and every tensor of its quant state (nested state included)."""
    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            flatten = getattr(type(obj), "__tensor_flatten__", None)
            if flatten is not None:
                for inner in flatten(obj)[0]:
                    yield from tensors(getattr(obj, inner))
            else:
                yield obj
            state = getattr(obj, "quant_state", None)
            if state is not None:
                yield from tensors(state)
        elif type(obj).__name__ == "QuantState":
            for value in vars(obj).values():
                if isinstance(value, torch.Tensor) or type(value).__name__ == "QuantState":
                    yield from tensors(value)

    return sum(t.numel() * t.element_size() for p in model.parameters() for t in tensors(p))


@pytest.mark.parametrize("method", ["nf4", "float8"])
def test_flux_memory_counts_the_bytes_the_libraries_store(method):
    from diffusers import FluxTransformer2DModel

    flux_memory = _flux_memory()
    torch.manual_seed(0)
    # odd sizes: partial 64-blocks and a partial 256-block of absmax values
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                   attention_head_dim=40, num_attention_heads=3, joint_attention_dim=50,
                                   pooled_projection_dim=30, guidance_embeds=True, axes_dims_rope=(8, 16, 16))
    expected = flux_memory.frozen_bytes(model)
    assert expected["bf16"] == 2 * sum(p.numel() for p in model.parameters())
    quantize_denoiser(model, method, "cpu")
    assert _stored_bytes(model) == expected[method]


def test_flux_memory_replaces_only_its_section(tmp_path):
    flux_memory = _flux_memory()
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n| a | 1 |\n")
    flux_memory.write_section(results, "## Flux.1 memory\n\nold\n")
    assert results.read_text() == "# Benchmark results\n\n| a | 1 |\n\n## Flux.1 memory\n\nold\n"
    results.write_text(results.read_text() + "\n## Later\n\nkept\n")
    flux_memory.write_section(results, "## Flux.1 memory\n\nnew\n")
    assert results.read_text() == "# Benchmark results\n\n| a | 1 |\n\n## Flux.1 memory\n\nnew\n\n## Later\n\nkept\n"


def test_flux1_dev_figures_from_the_config():
    flux_memory = _flux_memory()
    model = flux_memory.meta_transformer()
    frozen, lora = flux_memory.frozen_bytes(model), flux_memory.lora_bytes(model, 16)
    assert frozen["params"] == 11_901_408_320 and lora["lora_modules"] == 494  # Flux.1-dev's 11.9 B; kohya's 494
    assert frozen["nf4"] < frozen["nf4_fp32_absmax"] < frozen["float8"] < frozen["bf16"]
    assert 0.5 < frozen["nf4"] / frozen["params"] < 0.52 and 1.0 < frozen["float8"] / frozen["params"] < 1.01


NEWER_FAMILIES = ("tiny-sd3", "tiny-chroma", "tiny-z-image", "tiny-qwen-image", "tiny-flux2")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["nf4", "float8"])
@pytest.mark.parametrize("model", NEWER_FAMILIES)
def test_base_quantization_trains_every_transformer_family(model, method, tiny_models, tiny_examples, tmp_path):
    """The same quantized-base path for the other transformer families (one loader, one trainer): the frozen
    block Linears stored quantized, PEFT's LoRA on top, a few bf16 steps, every up weight trained, the kohya file
    written with the family's names."""
    base = str(tiny_models[model])
    components = load_diffusion_model(base)
    quantize_denoiser(components.denoiser, method, "cpu")  # what the loader does on CUDA, after its CUDA gate
    params = make_params(tiny_models, tmp_path, base_model=base, base_quantization=method, mixed_precision="bf16",
                         max_steps=3, lora_rank=4, alpha=2, learning_rate=1e-2)
    result = train(components, tiny_examples, params, DiskCache(tmp_path / "cache"), dataset_hash="d")
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    denoiser = getattr(components.denoiser, "module", components.denoiser)
    stored = {"nf4": "Params4bit", "float8": "Float8Tensor"}[method]
    wrapped = [m for m in denoiser.modules() if hasattr(m, "base_layer")]
    assert wrapped and all(type(m.base_layer.weight).__name__ == stored for m in wrapped)
    # every up weight moved off zero, but for the last block's text stream, whose output nothing reads (its
    # modules get no gradient in any trainer: SD3's add_q_proj, Qwen-Image's text attention output and MLP)
    still_zero = [k for k, v in result.lora_state.items() if "lora_B" in k and not v.abs().max() > 0]
    last = f".transformer_blocks.{getattr(denoiser.config, 'num_layers', 0) - 1}."
    assert all(last in k and any(t in k for t in ("add_q_proj", "to_add_out", "txt_mlp", "ff_context"))
               for k in still_zero), still_zero
    family = components.family
    kohya = to_kohya_state_dict(result.lora_state, family, params.alpha, denoiser.config, torch.float32)
    assert kohya and all(k.startswith(family.kohya_denoiser_prefix) for k in kohya)
    assert all(torch.isfinite(t).all() for t in kohya.values())
