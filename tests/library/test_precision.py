"""fp16 and bf16 on every family: samples after reduced-precision training, generation and merge with bases saved
in fp16/bf16, a failed sample that costs nothing, and the CPU-precision warning. (CUDA: benchmarks/gpu_check.py.)"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from train_helpers import make_params, summary_for

from lora_pipeline.core import trainer
from lora_pipeline.core.cache import DiskCache
from lora_pipeline.core.config import (
    EvaluationParams,
    ExportParams,
    GenerationParams,
    MergeParams,
    PromptSpec,
    TrainingParams,
)
from lora_pipeline.core.spec import DatasetInfo, LoraFile
from lora_pipeline.core.trainer import cpu_runs_natively, throughput, warn_slow_cpu_precision
from lora_pipeline.diffusion import training
from lora_pipeline.diffusion.generation import render
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.training import train
from lora_pipeline.pipelines.export.nodes import export_kohya

FAMILIES = {"tiny-sd": "sd1", "tiny-sdxl": "sdxl"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
CASES = [(model, mixed) for model in FAMILIES for mixed in DTYPES]


def decoder_input_dtypes(vae) -> list[torch.dtype]:
    """The dtypes the VAE decoder's first convolution receives (filled as the VAE decodes)."""
    seen: list[torch.dtype] = []
    vae.decoder.conv_in.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    return seen


def assert_picture(image, size=(64, 64)) -> None:
    pixels = np.asarray(image, dtype=float)
    assert image.size == size
    assert pixels.std() > 1.0  # not one flat colour (NaN latents decode to black)


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{p}" for m, p in CASES])
def reduced_run(request, tiny_models, tiny_examples, tmp_path_factory):
    """Two steps in fp16 or bf16 (UNet and text encoder LoRA), with a sample prompt."""
    model, mixed = request.param
    tmp = tmp_path_factory.mktemp(f"{model}-{mixed}")
    params = make_params(tiny_models, tmp, base_model=str(tiny_models[model]), max_steps=2, mixed_precision=mixed,
                         train_text_encoder=True, sample_prompts=["sks, red circle"], sample_inference_steps=2,
                         sample_size=64, output_name=f"{FAMILIES[model]}_{mixed}")
    components = load_diffusion_model(params.base_model)
    decoded = decoder_input_dtypes(components.vae)
    result = train(components, tiny_examples[:6], params, DiskCache(tmp / "cache"), dataset_hash="d")
    return {"components": components, "result": result, "params": params, "decoded": decoded, "model": model,
            "mixed": mixed, "tmp": tmp}


def test_reduced_precision_training_renders_its_samples(reduced_run):
    """The issue: fp16 training crashed in render_samples when the fp32 VAE met the fp16 latents."""
    result = reduced_run["result"]
    assert result.sample_error is None
    assert np.isfinite(result.losses).all()
    [sample] = result.samples
    assert_picture(sample)
    assert reduced_run["components"].unet.dtype == DTYPES[reduced_run["mixed"]]  # it did sample in that precision
    assert reduced_run["decoded"] == [torch.float32]  # and the VAE decoded in its own fp32


@pytest.mark.parametrize("model,mixed", CASES)
def test_render_takes_a_reduced_precision_unet_beside_an_fp32_vae(tiny_models, model, mixed):
    """Generation's render with the UNet and text encoders in fp16/bf16 and the VAE kept in fp32 (as SDXL needs)."""
    components = load_diffusion_model(str(tiny_models[model]))
    for module in (components.unet, *components.text_encoders):
        module.to(DTYPES[mixed])
    pipe = components.pipeline()
    pipe.set_progress_bar_config(disable=True)
    decoded = decoder_input_dtypes(pipe.vae)
    assert_picture(render(pipe, "sks, red circle", PromptSpec(prompt="-", steps=2, width=64, height=64), 0))
    assert decoded == [torch.float32]


def save_base(tiny_models, model: str, dtype: torch.dtype, folder):
    """The tiny base as a diffusers folder saved in ``dtype`` (as the merge stage writes it, or an fp16 hub folder)."""
    load_diffusion_model(str(tiny_models[model])).pipeline().to(dtype=dtype).save_pretrained(folder)
    return folder


def metadata_of(examples):
    """The normalization stage's metadata table for these examples."""
    import pandas as pd

    return pd.DataFrame({"file_name": [ex.path.name for ex in examples], "text": [ex.text for ex in examples],
                         "width": [ex.width for ex in examples], "height": [ex.height for ex in examples]})


def run_summary(run, **overrides):
    components = run["components"]
    return summary_for(run["params"], run["result"].spec, family=components.family.name,
                       unet_layout={"layers_per_block": components.unet.config.layers_per_block,
                                    "up_block_types": list(components.unet.config.up_block_types)}, **overrides)


def export_to_library(run, library) -> dict:
    return export_kohya(LoraFile(run["result"].lora_state), run_summary(run),
                        ExportParams(precision="fp16", webui_lora_dir=str(library)))


def merge_into(folder, merge: dict, generation: dict) -> str:
    """The merge node's two outputs, saved as the catalog saves them; the diffusers folder's path."""
    from lora_pipeline.datasets import CheckpointDataset, PretrainedFolderDataset
    from lora_pipeline.pipelines.merge.nodes import merge_loras

    model, checkpoint = merge_loras(MergeParams(**merge), GenerationParams(**generation))
    PretrainedFolderDataset(str(folder)).save(model)
    CheckpointDataset(f"{folder}.safetensors").save(checkpoint)
    return str(folder)


def test_generation_and_merge_work_on_bases_saved_in_reduced_precision(reduced_run, tiny_models, tmp_path,
                                                                       monkeypatch):
    """transformers 5 loads a text encoder saved in fp16/bf16 in that dtype, diffusers the UNet in fp32: the
    generation stage failed on such a base ("mat1 and mat2 must have the same dtype"), which includes the merge
    stage's own fp16 output."""
    from lora_pipeline.pipelines.generation.nodes import generate_images

    name = reduced_run["params"].output_name
    export_to_library(reduced_run, tmp_path / "Lora")
    base = save_base(tiny_models, reduced_run["model"], DTYPES[reduced_run["mixed"]], tmp_path / "base")
    generation = {"base_model": str(base), "lora_dirs": [str(tmp_path / "Lora")], "device": "cpu",
                  "prompt": f"sks, red circle <lora:{name}:1.0>", "comparison_weights": [1.0], "thumbnail": 32,
                  "defaults": {"prompt": "-", "steps": 2, "width": 64, "height": 64}}
    images, _, _ = generate_images(GenerationParams(**generation), LoraFile({}))
    assert_picture(next(iter(images.values())))

    merged = merge_into(tmp_path / "merged" / "m", {"loras": [{"name": name, "weight": 1.0}], "output_name": "m",
                                                    "precision": "fp16"}, generation)
    assert (tmp_path / "merged" / "m.safetensors").is_file()
    images, _, _ = generate_images(
        GenerationParams(**{**generation, "base_model": merged, "prompt": "sks, red circle"}), LoraFile({}))
    assert_picture(next(iter(images.values())))


def test_an_fp32_merge_of_a_reduced_precision_base_adds_the_lora_in_fp32(reduced_run, tiny_models, tmp_path,
                                                                         monkeypatch):
    """The text encoder of a bf16/fp16 base arrives in that dtype; W + delta rounded there would lose most of
    a small LoRA's change before the fp32 file is written."""
    from lora_pipeline.diffusion.stack import merge_into_base

    name = reduced_run["params"].output_name
    export_to_library(reduced_run, tmp_path / "Lora")
    base = save_base(tiny_models, reduced_run["model"], DTYPES[reduced_run["mixed"]], tmp_path / "base")
    generation = {"base_model": str(base), "lora_dirs": [str(tmp_path / "Lora")]}
    merged = load_diffusion_model(merge_into(tmp_path / "merged" / "m", {"loras": [{"name": name, "weight": 1.0}],
                                                                         "output_name": "m", "precision": "fp32"},
                                             generation))
    expected = load_diffusion_model(str(base))
    for module in expected.modules().values():
        module.float()
    merge_into_base(expected.modules(), expected.family, [(tmp_path / "Lora" / f"{name}.safetensors", 1.0)])
    original = load_diffusion_model(str(base)).text_encoder.state_dict()
    for key, weight in merged.text_encoder.state_dict().items():
        assert weight.dtype == torch.float32
        assert torch.equal(weight, expected.text_encoder.state_dict()[key]), key
    assert any(not torch.equal(w, original[k].float()) for k, w in merged.text_encoder.state_dict().items())


def test_evaluation_scores_a_lora_on_a_base_saved_in_reduced_precision(reduced_run, tiny_models, tiny_examples,
                                                                        tmp_path):
    """Denoising loss and CLIP figures (which render images) on an fp16/bf16-saved base."""
    from lora_pipeline.datasets.image_folder import ImageFolder
    from lora_pipeline.pipelines.evaluation.nodes import evaluate_lora

    examples = tiny_examples[:6]
    base = save_base(tiny_models, reduced_run["model"], DTYPES[reduced_run["mixed"]], tmp_path / "base")
    lora = export_to_library(reduced_run, tmp_path / "Lora")
    metadata = metadata_of(examples)
    params = EvaluationParams(clip_model=str(tiny_models["tiny-clip"]), eval_prompts=["sks, red circle"],
                              eval_steps=2, eval_size=64, timesteps=[500], device="cpu")
    _, _, figures = evaluate_lora(ImageFolder(examples[0].path.parent, [ex.path.name for ex in examples]), metadata,
                                  DiskCache(tmp_path / "cache"), lora, run_summary(reduced_run, base_model=str(base)),
                                  params, TrainingParams(base_model=str(base)))
    assert {"loss_train_base", "loss_train_lora", "clip_score_lora", "style_similarity_lora"} <= figures.keys()
    assert np.isfinite(list(figures.values())).all()
    assert figures["loss_train_lora"] != figures["loss_train_base"]


# ----------------------------------------------------------------------------- a failed sample costs nothing

def failing_samples(*_args, **_kwargs):
    raise RuntimeError("Input type (c10::Half) and bias type (float) should be the same")


def test_a_failing_sample_still_returns_and_checkpoints_the_trained_lora(tiny_models, tiny_examples, tmp_path,
                                                                        monkeypatch, caplog):
    params = make_params(tiny_models, tmp_path / "plain", max_steps=3)
    plain = train(load_diffusion_model(params.base_model), tiny_examples, params, DiskCache(tmp_path / "cache"),
                  dataset_hash="d")
    monkeypatch.setattr(training, "render_samples", failing_samples)
    sampled = params.model_copy(update={"checkpoint_dir": str(tmp_path / "sampled"), "sample_prompts": ["sks"],
                                        "sample_every_steps": 1})
    seen = []
    with caplog.at_level(logging.ERROR, logger="lora_pipeline.diffusion.training"):
        result = train(load_diffusion_model(params.base_model), tiny_examples, sampled,
                       DiskCache(tmp_path / "cache"), dataset_hash="d", on_samples=lambda *a: seen.append(a))
    assert result.steps == 3 and not result.samples and not seen
    assert result.lora_state.keys() == plain.lora_state.keys()
    assert all(torch.equal(result.lora_state[k], plain.lora_state[k]) for k in plain.lora_state)
    assert "bias type (float)" in result.sample_error
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]  # once, not once per step
    message = record.getMessage()
    assert "step 1" in message and "bias type (float)" in message and "--pipelines generation" in message
    assert list((tmp_path / "sampled").rglob("checkpoint-0000003"))


def test_the_training_node_outputs_and_exports_the_lora_when_sampling_fails(tiny_models, tiny_examples,
                                                                           tmp_path, monkeypatch):
    import mlflow

    from lora_pipeline.datasets.image_folder import ImageFolder
    from lora_pipeline.pipelines.training.nodes import train_lora

    monkeypatch.setattr(training, "render_samples", failing_samples)
    folder = tiny_examples[0].path.parent
    metadata = metadata_of(tiny_examples)
    params = make_params(tiny_models, tmp_path, max_steps=2, sample_prompts=["sks"])
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        # its own experiment: an experiment id another test made active belongs to another store
        with mlflow.start_run(experiment_id=mlflow.create_experiment("precision")) as run:
            weights, summary = train_lora(ImageFolder(folder, [ex.path.name for ex in tiny_examples]), metadata,
                                          DatasetInfo(trigger="sks"), DiskCache(tmp_path / "cache"), params)
            exported = export_kohya(weights, summary, ExportParams(precision="fp16",
                                                                   webui_lora_dir=str(tmp_path / "Lora")))
        tags = mlflow.get_run(run.info.run_id).data.tags
    finally:
        mlflow.set_tracking_uri(previous)
    assert weights.state and summary.steps == 2
    assert (tmp_path / "Lora" / "test_lora.safetensors").is_file() and exported.state
    assert "bias type (float)" in tags["lora.test_lora.sample_error"]


# ----------------------------------------------------------------------------- reduced precision on a CPU

@pytest.mark.parametrize("mixed,flags,native", [
    ("no", set(), True),
    ("bf16", {"avx2", "fma"}, False),  # the machine: emulated bf16, 0.2 GFLOP/s
    ("fp16", {"avx2", "fma"}, False),
    ("bf16", {"avx512f", "avx512_bf16"}, True),
    ("bf16", {"amx_bf16", "amx_tile"}, True),
    ("fp16", {"avx512f", "avx512_bf16"}, False),  # bf16 instructions do not make fp16 fast
    ("fp16", {"avx512_fp16"}, True),
    ("bf16", {"asimd", "bf16"}, True),  # ARM (Graviton 3, Neoverse V1)
])
def test_native_cpu_precision_is_read_from_the_cpu_flags(mixed, flags, native):
    assert cpu_runs_natively(mixed, flags) is native


def test_reduced_precision_on_a_cpu_without_native_support_is_named_before_training(
        tiny_models, tiny_examples, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(trainer, "cpu_features", lambda: {"avx2", "fma"})
    params = make_params(tiny_models, tmp_path, max_steps=1, mixed_precision="bf16")
    def warnings_so_far() -> list[str]:
        return [r.getMessage() for r in caplog.records if "no native bf16" in r.getMessage()]

    at_first_step = []
    with caplog.at_level(logging.WARNING, logger="lora_pipeline.core.trainer"):
        train(load_diffusion_model(params.base_model), tiny_examples, params, DiskCache(tmp_path / "cache"),
              dataset_hash="d", step_callback=lambda *_: at_first_step.append(warnings_so_far()))
    [[warning]] = at_first_step  # said once, before the first step ended
    assert "training.mixed_precision: bf16" in warning and 'mixed_precision: "no"' in warning
    assert warn_slow_cpu_precision("bf16", {"avx512_bf16"}) is False


def test_throughput_below_one_per_second_reads_as_seconds_each():
    assert throughput(12.34, "img") == "12.3 img/s"
    assert throughput(0.25, "img") == "4.0 s/img"  # was "0.0 img/s" at 0.04
    assert throughput(0.04, "img") == "25.0 s/img"
    assert throughput(0.0, "img") == "- img/s"  # nothing measured yet: no speed of zero on the first step


def test_gradient_checkpointing_uses_the_current_apis_without_a_deprecation_warning(tiny_models, tiny_examples,
                                                                                     tmp_path):
    params = make_params(tiny_models, tmp_path, max_steps=1, gradient_checkpointing=True, train_text_encoder=True)
    components = load_diffusion_model(params.base_model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(components, tiny_examples, params, DiskCache(tmp_path / "cache"), dataset_hash="d")
    assert not [w for w in caught if "checkpointing_enable" in str(w.message)]
    assert components.unet.is_gradient_checkpointing and components.text_encoder.is_activation_checkpointing
