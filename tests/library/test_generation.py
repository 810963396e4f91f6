import pytest
from PIL import Image

from lora_pipeline.core.config import GenerationParams, PromptSpec
from lora_pipeline.core.errors import ConfigError
from lora_pipeline.core.spec import LoraFile
from lora_pipeline.diffusion.generation import contact_sheet, read_prompts_file, webui_parameters
from lora_pipeline.diffusion.prompts import LoraRef
from lora_pipeline.pipelines.generation import nodes

DEFAULTS = PromptSpec(prompt="-", steps=10, width=64, height=64)


def test_prompts_yaml_and_csv(tmp_path):
    yml = tmp_path / "p.yml"
    yml.write_text('- "a cat <lora:x:0.5>"\n- {prompt: "a dog", seed: 3, count: 2}\n', encoding="utf-8")
    specs = read_prompts_file(yml, DEFAULTS)
    assert [s.prompt for s in specs] == ["a cat <lora:x:0.5>", "a dog"]
    assert specs[0].steps == 10 and specs[1].seed == 3 and specs[1].count == 2
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,seed,width\na cat,1,64\na dog,2,63\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"p.csv, line 3: width: Input should be a multiple of 8"):
        read_prompts_file(csv, DEFAULTS)
    with pytest.raises(ConfigError, match="not found"):
        read_prompts_file(tmp_path / "missing.yml", DEFAULTS)


def test_webui_parameters_text():
    text = webui_parameters("a cat", PromptSpec(prompt="x", negative_prompt="blurry", steps=20, guidance=7.5,
                                                width=512, height=768), 42, "sd15", [LoraRef("hero", 0.6)])
    assert text == ("a cat <lora:hero:0.6>\nNegative prompt: blurry\n"
                    "Steps: 20, CFG scale: 7.5, Seed: 42, Size: 512x768, Model: sd15")


def test_contact_sheet_layout():
    sheet = contact_sheet([Image.new("RGB", (64, 64))] * 5, thumbnail=32)
    assert sheet.size == (96, 64)


def test_unknown_lora_fails_before_any_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(nodes, "load_diffusion_model", lambda *a, **k: pytest.fail("must not load a model"))
    params = GenerationParams(base_model="x", prompt="a cat <lora:nope:0.5>", lora_dirs=[str(tmp_path)])
    with pytest.raises(ConfigError, match="Unknown LoRA 'nope'"):
        nodes.generate_images(params, LoraFile({}))
