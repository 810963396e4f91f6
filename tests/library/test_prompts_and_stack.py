import pytest
import torch
from diffusers import StableDiffusionPipeline
from train_helpers import model_outputs, random_kohya_lora, webui_merge

from lora_pipeline.core.errors import ConfigError
from lora_pipeline.diffusion.families import SD1
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.lora_files import save_lora_file
from lora_pipeline.diffusion.prompts import LoraRef, lora_index, parse_prompt, resolve_loras
from lora_pipeline.diffusion.stack import load_stack, merge_into_base, pipeline_modules, set_weights


@pytest.mark.parametrize(
    "prompt, text, refs",
    [
        ("sks, portrait <lora:hero:0.6>, <lora:bg:0.8>", "sks, portrait", [("hero", 0.6), ("bg", 0.8)]),
        ("<lora:hero> a cat", "a cat", [("hero", 1.0)]),
        ("a cat <lora:hero:-0.5>", "a cat", [("hero", -0.5)]),
        ("<lora:my style v1.5:0.7> castle", "castle", [("my style v1.5", 0.7)]),
        ("no tags at all", "no tags at all", []),
    ],
)
def test_parse_prompt(prompt, text, refs):
    clean, found = parse_prompt(prompt)
    assert clean == text and found == [LoraRef(n, w) for n, w in refs]


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("<lora:hero:abc>", "'abc' .* is not a number"),
        ("<lora::0.5>", "Empty LoRA name"),
        ("<lora:hero:0.5 a cat", "Malformed LoRA tag"),
        ("<lora:hero:0.5>, <lora:hero:0.8>", "appears twice"),
    ],
)
def test_parse_prompt_errors(prompt, message):
    with pytest.raises(ConfigError, match=message):
        parse_prompt(prompt)


def test_resolve_prefers_project_exports_and_suggests_close_names(tmp_path):
    exports, webui = tmp_path / "exports", tmp_path / "webui"
    for version in ("2026-01-01T00.00.00.000Z", "2026-02-01T00.00.00.000Z"):
        (exports / "hero.safetensors" / version).mkdir(parents=True)
        (exports / "hero.safetensors" / version / "hero.safetensors").write_bytes(b"x")
    (webui / "sub").mkdir(parents=True)
    (webui / "hero.safetensors").write_bytes(b"y")
    (webui / "sub" / "forest bg.safetensors").write_bytes(b"z")
    diffusers_copy = exports / "hero_diffusers" / "2026-02-01T00.00.00.000Z" / "hero_diffusers"
    diffusers_copy.mkdir(parents=True)
    (diffusers_copy / "pytorch_lora_weights.safetensors").write_bytes(b"d")
    (webui / "from-hub").mkdir()
    (webui / "from-hub" / "pytorch_lora_weights.safetensors").write_bytes(b"h")  # a user's own: still indexed
    index = lora_index([exports, webui])
    assert index["hero"].parent.name == "2026-02-01T00.00.00.000Z"
    assert index["forest bg"].name == "forest bg.safetensors"
    assert index["pytorch_lora_weights"].parent.name == "from-hub"  # not the export's diffusers copy
    with pytest.raises(ConfigError, match=r"Unknown LoRA 'heroo'.*'hero'.*Searched: .*exports, .*webui"):
        resolve_loras([LoraRef("heroo", 1.0)], [exports, webui])


@pytest.fixture
def two_loras(tiny_models, tmp_path):
    base = load_diffusion_model(str(tiny_models["tiny-sd"]))
    files = {}
    for name, rank, alpha, seed in (("char", 4, 8.0, 1), ("bg", 2, 1.0, 2)):
        files[name] = tmp_path / f"{name}.safetensors"
        save_lora_file(files[name], random_kohya_lora(base, rank, alpha, seed), {})
    return files


def _pipe(tiny_models):
    return StableDiffusionPipeline.from_pretrained(str(tiny_models["tiny-sd"]), safety_checker=None,
                                                   requires_safety_checker=False)


def test_stacked_loras_match_the_webui_rule(tiny_models, two_loras):
    from lora_pipeline.diffusion.lora_files import load_lora_file

    pipe = _pipe(tiny_models)
    base_out = model_outputs(pipe)
    load_stack(pipe, SD1, two_loras)
    set_weights(pipe, {"char": 0.6, "bg": 0.8})
    stacked = model_outputs(pipe)

    reference = load_diffusion_model(str(tiny_models["tiny-sd"]))
    webui_merge(reference, load_lora_file(two_loras["char"])[0], 0.6)
    webui_merge(reference, load_lora_file(two_loras["bg"])[0], 0.8)
    expected = model_outputs(reference)
    assert (stacked[0] - expected[0]).abs().max() < 1e-4
    assert (stacked[1] - expected[1]).abs().max() < 1e-4  # text-encoder attention included
    assert (stacked[1] - base_out[1]).abs().max() > 1e-3

    set_weights(pipe, {"char": 0.0, "bg": 0.0})
    zero = model_outputs(pipe)
    assert torch.allclose(zero[0], base_out[0], atol=1e-6) and torch.allclose(zero[1], base_out[1], atol=1e-6)
    set_weights(pipe, {})
    assert torch.allclose(model_outputs(pipe)[0], base_out[0], atol=1e-6)


def test_merge_equals_base_plus_lora(tiny_models, two_loras):
    pipe = _pipe(tiny_models)
    load_stack(pipe, SD1, two_loras)
    set_weights(pipe, {"char": 0.6, "bg": 0.8})
    with_adapters = model_outputs(pipe)
    merged = _pipe(tiny_models)
    merge_into_base(pipeline_modules(merged, SD1), SD1, [(two_loras["char"], 0.6), (two_loras["bg"], 0.8)])
    fused = model_outputs(merged)
    assert (fused[0] - with_adapters[0]).abs().max() < 1e-4
    assert (fused[1] - with_adapters[1]).abs().max() < 1e-4


def test_lora_name_at_version_pins_an_export(tmp_path):
    from lora_pipeline.diffusion.prompts import LoraRef, export_version, parse_prompt, resolve_loras

    for version in ("2026-01-01T00.00.00.000Z", "2026-02-01T00.00.00.000Z"):
        target = tmp_path / "hero.safetensors" / version / "hero.safetensors"
        target.parent.mkdir(parents=True)
        save_lora_file(target, {"lora_unet_x.alpha": torch.tensor(1.0)}, {})
    text, refs = parse_prompt("a knight <lora:hero@2026-01-01T00.00.00.000Z:0.6>, <lora:hero:0.2>")
    assert refs == [LoraRef("hero@2026-01-01T00.00.00.000Z", 0.6), LoraRef("hero", 0.2)]
    files = resolve_loras(refs, [tmp_path])
    assert export_version(files["hero@2026-01-01T00.00.00.000Z"]) == "2026-01-01T00.00.00.000Z"
    assert export_version(files["hero"]) == "2026-02-01T00.00.00.000Z"  # the newest
    with pytest.raises(ConfigError, match="no exported version '2026-09-09T00.00.00.000Z'.*2026-01-01.*2026-02-01"):
        resolve_loras([LoraRef("hero@2026-09-09T00.00.00.000Z", 1.0)], [tmp_path])


def test_comparison_grid_covers_every_pair_of_three_subjects(tiny_models, two_loras, tmp_path):
    from lora_pipeline.core.config import PromptSpec
    from lora_pipeline.diffusion.generation import comparison_grid

    base = load_diffusion_model(str(tiny_models["tiny-sd"]))
    files = {**two_loras, "city": tmp_path / "city.safetensors"}
    save_lora_file(files["city"], random_kohya_lora(base, 2, 4.0, 3), {})
    pipe = _pipe(tiny_models)
    pipe.set_progress_bar_config(disable=True)
    load_stack(pipe, SD1, files)
    spec = PromptSpec(prompt="a city <lora:char:0.6> <lora:bg:0.8> <lora:city:0.5>", steps=2, width=64, height=64)
    refs = parse_prompt(spec.prompt)[1]
    grid = comparison_grid(pipe, spec, refs, [0.0, 1.0], thumbnail=32)
    # 3 rows of single LoRAs (2 weights), 1 row of the 3 pairs, 1 row with all: 5 rows, 3 columns
    assert grid.width == 3 * 32 and grid.height % 5 == 0 and grid.height // 5 > 32  # 5 rows of 32 px cells + label
