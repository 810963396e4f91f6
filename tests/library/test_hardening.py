"""A new user's first week: wrong files where a LoRA should be, unknown groups, paths checked before any node,
a WebUI folder with the user's own files, a byte-reproducible diffusers file, the tracking store's place."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_pipeline.core.config import ExportParams, GenerationParams, TrainingParams, validate_all
from lora_pipeline.core.errors import ConfigError, DataError
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.lora_files import load_lora_file, project_identity, read_lora_modules, webui_copy_path
from lora_pipeline.project.preflight import check_inputs


def test_a_unet_file_is_not_taken_for_a_lora(tiny_models, tmp_path):
    components = load_diffusion_model(str(tiny_models["tiny-sd"]))
    unet_file = next((tiny_models["tiny-sd"] / "unet").glob("*.safetensors"))
    with pytest.raises(DataError, match="is not a LoRA.*full model"):
        read_lora_modules(unet_file, components.family, components.modules())
    pickled = tmp_path / "old_lora.pt"
    torch.save({"x": torch.zeros(1)}, pickled)
    with pytest.raises(DataError, match="old_lora.pt is a pickled .pt file"):
        load_lora_file(pickled)
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(DataError, match="broken.safetensors is not a readable .safetensors"):
        load_lora_file(garbage)


def test_a_lora_of_another_base_is_called_that_not_a_rank_problem(tiny_models, trained, tmp_path):
    from lora_pipeline.core.errors import LoraPipelineError
    from lora_pipeline.diffusion.lora_files import to_peft_state
    from lora_pipeline.diffusion.training import inject_lora, load_lora_state, lora_spec

    components = load_diffusion_model(str(tiny_models["tiny-sd"]))
    params = trained["params"]
    inject_lora(components, lora_spec(params, components.family))
    state = {k: v for k, v in trained["result"].lora_state.items()}
    key = next(k for k in state if k.endswith("lora_A.weight"))
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 3)  # same rank, other layer width
    with pytest.raises(LoraPipelineError, match="another base model") as info:
        load_lora_state(components, state, "init_lora x")
    assert "lora_rank" not in str(info.value)
    assert to_peft_state  # (the converter is shared with generation)


def test_an_unknown_parameter_group_is_an_error():
    with pytest.raises(ConfigError, match="trainning: unknown parameter group; did you mean 'training'"):
        validate_all({"trainning": {"lora_rank": 4}, "training": {"base_model": "x"}})


def test_paths_are_checked_before_any_node(tiny_models, tmp_path):
    unet_file = next((tiny_models["tiny-sd"] / "unet").glob("*.safetensors"))
    with pytest.raises(ConfigError, match=r"aki\.training\.base_model: Model 'models/missing' not found"):
        check_inputs({"aki.training": TrainingParams(base_model="models/missing")})
    with pytest.raises(ConfigError, match="aki.training.init_lora: .* is not a LoRA"):
        check_inputs({"aki.training": TrainingParams(base_model=str(tiny_models["tiny-sd"]), init_lora=str(unet_file))})
    with pytest.raises(ConfigError, match="lora_dirs: folder /no/such/Lora does not exist"):
        check_inputs({"generation": GenerationParams(base_model=str(tiny_models["tiny-sd"]),
                                                     lora_dirs=["data/07_model_output", "/no/such/Lora"])})
    with pytest.raises(ConfigError, match="webui_lora_dir: folder /no/webui does not exist"):
        check_inputs({"aki.export": ExportParams(webui_lora_dir="/no/webui")})
    check_inputs({"generation": GenerationParams(base_model=str(tiny_models["tiny-sd"]))})  # defaults are fine


def test_webui_copy_never_overwrites_the_users_own_file(tmp_path):
    users = tmp_path / "aki.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(users), metadata={"ss_output_name": "aki"})
    here = project_identity(tmp_path / "project")
    target, note = webui_copy_path(tmp_path, "aki", "0123456789abcdef", here)
    assert target.name == "aki-01234567.safetensors" and "left alone" in note
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(users),
              metadata={"ss_output_name": "aki", "lora_pipeline.subject": "aki", "lora_pipeline.project": here})
    assert webui_copy_path(tmp_path, "aki", "0123456789abcdef", here) == (users, None)  # an earlier export of ours


def test_webui_copy_never_overwrites_another_checkouts_subject_of_the_same_name(tmp_path):
    theirs = tmp_path / "aki.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(theirs),
              metadata={"lora_pipeline.subject": "aki", "lora_pipeline.project": project_identity(tmp_path / "a")})
    target, note = webui_copy_path(tmp_path, "aki", "0123456789abcdef", project_identity(tmp_path / "b"))
    assert target.name == "aki-01234567.safetensors" and "another lora-pipeline project" in note
    assert project_identity(tmp_path / "a") == project_identity(tmp_path / "x" / ".." / "a")  # one checkout, one id


SAVE_DIFFUSERS = """
import sys, torch
from safetensors.torch import load_file
from lora_pipeline.core.spec import ImageTrainingSummary
from lora_pipeline.diffusion.lora_files import save_diffusers_lora
summary = ImageTrainingSummary.model_validate_json(open(sys.argv[1]).read())
save_diffusers_lora(sys.argv[3], load_file(sys.argv[2]), summary)
"""


@pytest.mark.slow
def test_the_diffusers_file_is_byte_reproducible_across_processes(trained, tmp_path):
    from safetensors.torch import save_file as save

    state_file, summary_file = tmp_path / "state.safetensors", tmp_path / "summary.json"
    save(trained["result"].lora_state, str(state_file))
    summary_file.write_text(trained["summary"].model_dump_json())
    outputs = []
    for seed in ("1", "2", "3"):
        out = tmp_path / f"out{seed}"
        subprocess.run([sys.executable, "-c", SAVE_DIFFUSERS, str(summary_file), str(state_file), str(out)], check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, timeout=300)
        outputs.append((out / "pytorch_lora_weights.safetensors").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]


def test_the_tracking_store_sits_at_the_project_root(tmp_path, monkeypatch):
    from lora_pipeline.settings import project_root

    (tmp_path / "pyproject.toml").write_text("[tool.kedro]\npackage_name = 'x'\n")
    (tmp_path / "data" / "01_raw").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "data" / "01_raw")
    assert project_root() == Path(tmp_path).resolve().as_posix()


def test_an_unknown_or_planned_family_stops_before_the_first_node_with_the_key_and_the_families(tiny_models):
    from lora_pipeline.core.config import TrainingParams
    from lora_pipeline.project.preflight import check_inputs

    for name, says in (("sd4", "not supported; use auto, sd1, sdxl, flux, sd3, chroma"), ("wan", "is planned")):
        params = TrainingParams(base_model=str(tiny_models["tiny-sd"]), base_model_family=name)
        with pytest.raises(ConfigError, match=rf"demo\.training\.base_model_family: .*{says}"):
            check_inputs({"demo.training": params})
