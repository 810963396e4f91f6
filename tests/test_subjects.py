"""subjects.yml: each subject's parameters are the shared groups + what the subject implies + its overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_pipeline.core.config import SubjectParams, parse_subjects, validate_all
from lora_pipeline.core.errors import ConfigError
from lora_pipeline.project.subjects import SubjectsConfigLoader, run_env, subject_catalog, subject_parameters

SHARED = {
    "captioning": {"backend": "sidecar", "trigger": "sks", "template": "{trigger}, {caption}"},
    "normalization": {"resolution": 512, "prompt": {"trigger": "sks", "keep_tokens": 1}},
    "training": {"base_model": "base-sd", "lora_rank": 8, "sample_prompts": ["{trigger}, portrait of {subject}"]},
    "export": {"precision": "fp16"},
    "evaluation": {"eval_prompts": ["{trigger}, portrait"]},
}


def test_subject_parameters_merge_shared_implied_and_overrides():
    subject = SubjectParams(trigger="aki", base_model="xl-base", training={"lora_rank": 16},
                            normalization={"prompt": {"keep_tokens": 2}})
    params = subject_parameters(SHARED, "aki", subject)
    assert params["training"]["output_name"] == "aki" and params["training"]["lora_rank"] == 16
    assert params["training"]["base_model"] == "xl-base" and params["normalization"]["base_model"] == "xl-base"
    assert params["training"]["sample_prompts"] == ["aki, portrait of aki"]
    assert params["normalization"]["prompt"] == {"trigger": "aki", "keep_tokens": 2}  # deep merge keeps the rest
    assert params["captioning"]["trigger"] == "aki" and params["evaluation"]["eval_prompts"] == ["aki, portrait"]
    assert params["normalization"]["subject"] == "aki"
    assert SHARED["training"]["lora_rank"] == 8  # the shared groups are not modified
    # without a trigger of its own the subject keeps the shared one
    plain = subject_parameters(SHARED, "bg", SubjectParams())
    assert plain["captioning"]["trigger"] == "sks" and plain["training"]["base_model"] == "base-sd"
    assert validate_all({**SHARED, "aki": params}, {"aki": subject})["aki.training"].lora_rank == 16


def test_subject_errors_name_the_subject_and_the_key():
    with pytest.raises(ConfigError, match="subjects.aki.trainig: unknown parameter; did you mean 'training'"):
        parse_subjects({"subjects": {"aki": {"trainig": {}}}})
    with pytest.raises(ConfigError, match="'red-jacket' must start with a letter"):
        parse_subjects({"subjects": {"red-jacket": {}}})
    with pytest.raises(ConfigError, match="lists no subjects"):
        parse_subjects({"subjects": {}})
    bad = subject_parameters(SHARED, "aki", SubjectParams(training={"lora_rank": 0}))
    with pytest.raises(ConfigError, match=r"subject 'aki' in conf/\*/subjects.yml:\n  - aki.training.lora_rank"):
        validate_all({**SHARED, "aki": bad}, {"aki": None})


def test_subject_with_images_elsewhere_gets_explicit_raw_entries():
    entries = subject_catalog("aki", SubjectParams(images="/art/aki", reviewed_captions="/art/aki.csv"))
    assert entries["aki.raw_images"]["path"] == "/art/aki"
    assert entries["aki.reviewed_captions"]["filepath"] == "/art/aki.csv"
    assert subject_catalog("bg", SubjectParams()) == {}


def test_config_loader_expands_subjects_from_yaml(tmp_path):
    for env in ("base", "local"):
        (tmp_path / env).mkdir()
    (tmp_path / "base" / "parameters_training.yml").write_text("training:\n  base_model: sd\n  lora_rank: 8\n")
    (tmp_path / "base" / "subjects.yml").write_text(
        "subjects:\n  aki:\n    trigger: aki\n    training: {lora_rank: 4}\n  city: {}\n")
    loader = SubjectsConfigLoader(conf_source=str(tmp_path), base_env="base", default_run_env="local")
    params = loader["parameters"]
    assert list(loader.subjects()) == ["aki", "city"]
    assert params["aki"]["training"]["lora_rank"] == 4 and params["city"]["training"]["lora_rank"] == 8
    assert params["training"]["lora_rank"] == 8


def test_the_registry_reads_the_subjects_of_the_sessions_environment(tmp_path, monkeypatch):
    from lora_pipeline.project import subjects

    for env, names in (("base", "aki: {}"), ("demo", "demo_one: {}"), ("staging", "staged: {}")):
        (tmp_path / env).mkdir()
        (tmp_path / env / "subjects.yml").write_text(f"subjects:\n  {names}\n")
    monkeypatch.setattr(subjects, "_session_env", None)
    monkeypatch.setenv("KEDRO_ENV", "staging")  # no session yet: Kedro's variable
    assert run_env() == "staging" and list(subjects.project_subjects(tmp_path)) == ["staged"]
    # what KedroSession does for `kedro run --env demo`: build its config loader, then read the pipelines
    SubjectsConfigLoader(conf_source=str(tmp_path), env="demo", base_env="base", default_run_env="local")
    assert run_env() == "demo" and list(subjects.project_subjects(tmp_path)) == ["demo_one"]


def test_one_subject_per_gpu_in_subjects_order():
    from lora_pipeline.core.trainer import gpu_for

    positions = [subject_parameters(SHARED, name, SubjectParams(), i)["training"]["gpu"]
                 for i, name in enumerate(("aki", "jacket", "city"))]
    assert positions == [0, 1, 2]
    assert [gpu_for(p, 2, distributed=False) for p in positions] == [0, 1, 0]  # round robin over 2 GPUs
    assert gpu_for(1, 1, distributed=False) is None  # one GPU (or CPU): the default device
    assert gpu_for(3, 4, distributed=True) is None  # accelerate launch assigns GPUs per process itself


def test_the_fingerprint_is_written_and_read_through_the_catalog(tmp_path):
    """``<subject>.subject_inputs`` is a catalog entry (the project's factory), not a path in the code."""
    import yaml
    from kedro.io import DataCatalog

    from lora_pipeline.core.spec import SubjectInputs
    from lora_pipeline.project.hooks import SubjectFingerprintHook
    from lora_pipeline.project.subjects import recorded_fingerprint

    conf = yaml.safe_load((Path(__file__).parents[1] / "conf/base/catalog.yml").read_text())
    entry = conf["{subject}.subject_inputs"]
    assert entry["metadata"]["kedro-viz"]["layer"] == "models"
    factory = {**entry, "filepath": str(tmp_path / "subject_inputs/{subject}.json")}
    catalog = DataCatalog.from_config({"{subject}.subject_inputs": factory})
    assert recorded_fingerprint(catalog, "aki") is None  # never trained here
    hook = SubjectFingerprintHook()
    hook._pending = {"aki": "abc"}
    hook.after_pipeline_run({}, None, catalog)
    recorded = recorded_fingerprint(catalog, "aki")
    assert isinstance(recorded, SubjectInputs) and recorded.fingerprint == "abc" and recorded.trained_at
    assert (tmp_path / "subject_inputs" / "aki.json").is_file()
    (tmp_path / "subject_inputs" / "aki.json").write_text("not json")
    assert recorded_fingerprint(catalog, "aki") is None  # unreadable: the subject counts as changed
